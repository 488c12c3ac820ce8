// Command agent runs on every node: it loads Portico's datapath, attaches it, and keeps it
// equal to the cluster's Services and EndpointSlices. Only wiring lives here.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	crmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/portico-dev/portico/internal/agent"
	"github.com/portico-dev/portico/internal/datapath"
	"github.com/portico-dev/portico/internal/l7"
	"github.com/portico-dev/portico/internal/speaker"
	"github.com/portico-dev/portico/internal/version"
)

func main() {
	var o agent.Options
	flag.StringVar(&o.NodeName, "node-name", os.Getenv("NODE_NAME"), "The Node this agent programs (default $NODE_NAME).")
	devices := flag.String("devices", "", "Comma-separated interfaces external traffic arrives on (NodePort, externalIPs, LoadBalancer addresses); none: only clients on the node are served.")
	cgroupRoot := flag.String("cgroup-root", "/sys/fs/cgroup", "cgroup v2 directory whose processes get their Service connections translated at the socket layer.")
	bpffs := flag.String("bpffs", "/sys/fs/bpf", "bpffs mount; maps and links are pinned under <bpffs>/portico/<node>, so forwarding goes on while the agent restarts.")
	maglevSize := flag.Uint("maglev-table-size", 16381, "Maglev table size (a prime) for Services that use Maglev.")
	var size datapath.Options
	flag.Func("service-map-size", "Entries of each IP family's service map: a frontend takes one, plus one per backend (default 2097152: 10,000 dual-stack LoadBalancer Services x 3 ports x 10 endpoints; docs/datapath.md). A node's pinned maps keep the size they were made with.",
		uintFlag(&size.ServiceEntries))
	flag.Func("backend-map-size", "Entries of each IP family's backend map: one per distinct endpoint address, port and protocol (default 524288).", uintFlag(&size.Backends))
	flag.StringVar(&o.DaemonSet, "daemonset", "", "Name of the agents' DaemonSet in the --lease-namespace: when the agent stops and it is gone or being deleted, Portico is being removed, and the agent removes its programs and pins from the node (docs/datapath.md). Empty: pins always stay.")
	flag.Func("conntrack-size", "Flow entries of the packet layer, two per flow (default 131072).", uintFlag(&size.ConntrackSize))
	flag.StringVar(&o.ProxyName, "service-proxy-name", "", "Serve only Services labelled service.kubernetes.io/service-proxy-name with this value (empty: only Services without the label).")
	flag.StringVar(&o.MetricsAddr, "metrics-bind-address", ":9090", "Address of the Prometheus metrics endpoint; 0 turns it off.")
	flag.BoolVar(&o.Profiling, "profiling", false, "Serve Go's /debug/pprof/ on the metrics endpoint.")
	l2 := speaker.Options{}
	announceL2 := flag.Bool("l2-announce", true, "Answer ARP and NDP for the LoadBalancer addresses this node wins (docs/l2.md).")
	l2Port := flag.Uint("l2-port", 7947, "UDP port of the agents' heartbeats, the same on every node; it must be open between nodes.")
	flag.DurationVar(&l2.Interval, "l2-heartbeat-interval", 100*time.Millisecond, "How often agents heartbeat each other.")
	flag.DurationVar(&l2.DeadAfter, "l2-dead-after", 400*time.Millisecond, "How long an agent may stay silent before its peers take its addresses over.")
	flag.DurationVar(&l2.RestartHold, "l2-restart-hold", 15*time.Second, "How long peers keep this node's addresses when its agent stops to restart (a rolling update; not when its --daemonset is being deleted), so that addresses do not move; while it is away nobody answers ARP/NDP for them, and established flows go on. 0: peers take over at once.")
	l2Key := flag.String("l2-heartbeat-key-file", "", "File holding the key (at least 16 bytes) that signs and checks the agents' heartbeats, the same on every node; empty: heartbeats are not signed, and anyone on the segment can keep a dead node alive.")
	l2Next := flag.String("l2-heartbeat-next-key-file", "", "File holding a second key heartbeats may be signed with, while the cluster changes keys (docs/l2.md); a file that does not exist is no key.")
	l7Ports := flag.String("l7-ports", "14000-14999", "Ports the L7 proxy's listeners take on the node's addresses, first-last (one per Service port and family with an L7Policy); empty: no L7 proxy.")
	flag.StringVar(&o.LeaseNamespace, "lease-namespace", os.Getenv("POD_NAMESPACE"), "Namespace of the agent's Lease, the operator's --agent-namespace (default $POD_NAMESPACE; empty: no Lease, and the operator cannot tell when this agent dies).")
	flag.DurationVar(&o.LeaseDuration, "lease-duration", 40*time.Second, "How long the agent's Lease lasts unrenewed; it renews every quarter of it.")
	flag.StringVar(&o.ProbeAddr, "health-probe-bind-address", ":9091", "Address of the /healthz and /readyz endpoints.")
	zo := zap.Options{}
	zo.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zo)))
	log := ctrl.Log.WithName("setup")
	fail := func(err error, msg string, kv ...any) {
		log.Error(err, msg, kv...)
		os.Exit(1)
	}

	size.PinDir, size.MaglevTableSize = filepath.Join(*bpffs, "portico", o.NodeName), uint32(*maglevSize)
	dp, err := datapath.Load(size)
	if err != nil {
		fail(err, "Failed to load the datapath")
	}
	if rebuilt := dp.Rebuilt(); len(rebuilt) > 0 {
		log.Info("This agent lays these maps out differently from the node's pinned ones: it builds them anew, and the previous programs serve until its first sync has filled them", "maps", rebuilt)
	}
	got := dp.Capacity()
	log.Info("Loaded the datapath", "serviceEntries", got.ServiceEntries, "backends", got.Backends, "conntrack", got.Conntrack)
	crmetrics.Registry.MustRegister(newConntrackCollector(dp, got.Conntrack))
	differs := func(asked, got uint32) bool { return asked != 0 && asked != got }
	if differs(size.ServiceEntries, got.ServiceEntries) || differs(size.Backends, got.Backends) || differs(size.ConntrackSize, got.Conntrack) {
		log.Info("The node's pinned maps keep the sizes they were made with; uninstall Portico from the node to change them",
			"serviceMapSize", size.ServiceEntries, "backendMapSize", size.Backends, "conntrackSize", size.ConntrackSize)
	}
	if err := dp.AttachCgroup(*cgroupRoot); err != nil {
		fail(err, "Failed to attach to the cgroup", "cgroup", *cgroupRoot)
	}
	for _, name := range strings.FieldsFunc(*devices, func(r rune) bool { return r == ',' }) {
		iface, err := net.InterfaceByName(name)
		if err != nil {
			fail(err, "No such device", "device", name)
		}
		if err := dp.AttachInterface(iface.Index); err != nil {
			fail(err, "Failed to attach to the device", "device", name)
		}
	}
	o.MaglevTableSize = uint32(*maglevSize)
	if *announceL2 {
		l2.Port = uint16(*l2Port)
		if *l2Key != "" {
			if l2.Key, err = readKey(*l2Key); err != nil {
				fail(err, "Bad heartbeat key")
			}
		}
		if *l2Next != "" {
			if l2.Next, err = readKey(*l2Next); err != nil && !errors.Is(err, fs.ErrNotExist) {
				fail(err, "Bad next heartbeat key")
			}
		}
		o.L2 = &l2
	}
	if *l7Ports != "" {
		var ports l7.Options
		if _, err := fmt.Sscanf(*l7Ports, "%d-%d", &ports.FirstPort, &ports.LastPort); err != nil || ports.FirstPort == 0 || ports.LastPort < ports.FirstPort {
			fail(fmt.Errorf("--l7-ports %q: want first-last, such as 14000-14999", *l7Ports), "Bad flag")
		}
		o.L7 = &ports
	}
	o.Version = version.Get()
	mgr, err := agent.NewManager(ctrl.GetConfigOrDie(), dp, o)
	if err != nil {
		fail(err, "Failed to set up the agent")
	}
	log.Info("Starting the agent", "node", o.NodeName, "devices", *devices, "cgroup", *cgroupRoot)
	err = mgr.Start(ctrl.SetupSignalHandler())
	if err != nil {
		_ = dp.Close()
		fail(err, "The agent stopped with an error")
	}
	stop(log, mgr.GetAPIReader(), dp, o.DaemonSet, o.LeaseNamespace)
}

// stop closes the datapath: pins stay, and the node keeps forwarding with the last state
// while the agent is away (a restart, a rolling update). When the agents' DaemonSet is gone
// or going, Portico is being removed: programs and pins go too.
func stop(log logr.Logger, c client.Reader, dp *datapath.Datapath, daemonSet, namespace string) {
	if daemonSet == "" {
		_ = dp.Close()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	removed, err := agent.Removed(ctx, c, types.NamespacedName{Namespace: namespace, Name: daemonSet})
	switch {
	case err != nil:
		log.Error(err, "Could not tell an uninstall from a restart; the pins stay")
		_ = dp.Close()
	case removed:
		log.Info("The agents' DaemonSet is going: removing Portico's programs and pins from the node")
		if err := dp.Uninstall(); err != nil {
			log.Error(err, "Failed to remove Portico from the node")
		}
	default:
		_ = dp.Close()
	}
}

// readKey reads a heartbeat key: at least 16 bytes.
func readKey(path string) ([]byte, error) {
	k, err := os.ReadFile(path)
	if err == nil && len(k) < 16 {
		err = fmt.Errorf("%s holds %d bytes; want at least 16", path, len(k))
	}
	return k, err
}

// uintFlag parses a flag into a uint32.
func uintFlag(into *uint32) func(string) error {
	return func(v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return fmt.Errorf("want a count: %w", err)
		}
		*into = uint32(n)
		return nil
	}
}
