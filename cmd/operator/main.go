// Command operator runs Portico's control plane: it allocates LoadBalancer addresses from
// LBPools and reports pool state. Only wiring lives here.
package main

import (
	"flag"
	"fmt"
	"math"
	"os"
	"strings"

	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/controller/agentds"
	"github.com/portico-dev/portico/internal/operator"
	"github.com/portico-dev/portico/internal/version"
)

func main() {
	var o operator.Options
	flag.StringVar(&o.MetricsAddr, "metrics-bind-address", ":8080", "Address of the Prometheus metrics endpoint; 0 turns it off.")
	flag.StringVar(&o.ProbeAddr, "health-probe-bind-address", ":8081", "Address of the /healthz and /readyz endpoints.")
	flag.BoolVar(&o.LeaderElect, "leader-elect", false, "Elect a leader, so that several replicas can run and one acts.")
	flag.StringVar(&o.LeaderNamespace, "leader-election-namespace", "", "Namespace of the leader election Lease (default: the pod's namespace).")
	flag.StringVar(&o.Class.Name, "load-balancer-class", lbv1.LoadBalancerClass, "The spec.loadBalancerClass Portico serves.")
	flag.BoolVar(&o.Class.ClaimClassless, "claim-classless-services", false, "Also serve LoadBalancer Services that set no loadBalancerClass.")
	flag.IntVar(&o.Workers, "workers", 16, "Services reconciled at once (allocation itself is serialised).")
	qps := flag.Float64("kube-api-qps", 200, "Requests per second the operator may send to the API server.")
	flag.IntVar(&o.Burst, "kube-api-burst", 400, "Requests the operator may send at once above kube-api-qps.")
	agentImage := flag.String("agent-image", "", "Image of the node agent; the operator runs it as a DaemonSet. Empty: no agents.")
	agentNamespace := flag.String("agent-namespace", os.Getenv("POD_NAMESPACE"), "Namespace of the agents' DaemonSet and of their Leases, by which the operator tells a lost agent (default $POD_NAMESPACE).")
	agentName := flag.String("agent-name", "portico-agent", "Name of the agents' DaemonSet.")
	agentAccount := flag.String("agent-service-account", "portico-agent", "ServiceAccount the agents run as.")
	agentDevices := flag.String("agent-devices", "", "Comma-separated interfaces external traffic arrives on, on every node (the agents' --devices).")
	agentServiceMap := flag.Uint("agent-service-map-size", 0, "The agents' --service-map-size (0: their default, 2097152; docs/datapath.md).")
	agentBackendMap := flag.Uint("agent-backend-map-size", 0, "The agents' --backend-map-size (0: their default, 524288).")
	agentConntrack := flag.Uint("agent-conntrack-size", 0, "The agents' --conntrack-size (0: their default, 131072).")
	zo := zap.Options{}
	zo.BindFlags(flag.CommandLine)
	flag.Parse()
	for name, v := range map[string]uint{"agent-service-map-size": *agentServiceMap, "agent-backend-map-size": *agentBackendMap, "agent-conntrack-size": *agentConntrack} {
		if v > math.MaxUint32 {
			fmt.Fprintf(os.Stderr, "--%s %d: at most %d\n", name, v, uint32(math.MaxUint32))
			os.Exit(2)
		}
	}
	o.QPS = float32(*qps)
	o.AgentNamespace = *agentNamespace
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zo)))
	log := ctrl.Log.WithName("setup")
	if *agentImage != "" {
		o.Agents = &agentds.Config{Namespace: *agentNamespace, Name: *agentName, Image: *agentImage, Version: version.Get(),
			ServiceAccount: *agentAccount, Devices: strings.FieldsFunc(*agentDevices, func(r rune) bool { return r == ',' }),
			ServiceMapSize: uint32(*agentServiceMap), BackendMapSize: uint32(*agentBackendMap), ConntrackSize: uint32(*agentConntrack)}
	}

	mgr, err := operator.NewManager(ctrl.GetConfigOrDie(), o)
	if err != nil {
		log.Error(err, "Failed to set up the operator")
		os.Exit(1)
	}
	log.Info("Starting the operator", "class", o.Class.Name, "claimClassless", o.Class.ClaimClassless, "leaderElect", o.LeaderElect)
	if err := mgr.Start(ctrl.SetupSignalHandler()); err != nil {
		log.Error(err, "The manager stopped with an error")
		os.Exit(1)
	}
}
