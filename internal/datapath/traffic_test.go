package datapath

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/test/harness/nstest"
)

// cluster is four network namespaces on veth pairs: a client outside, a node with the
// packet programs on its two external interfaces, a pod on that node, and another node with
// a pod of its own. The client has routes to the LoadBalancer range through the node and no
// other route.
//
//	client 192.0.2.100 ── 192.0.2.1 node 10.244.1.1 ── 10.244.1.10 pod
//	                                 172.16.0.1 ── 172.16.0.2 remote (pod 10.244.2.10)
//
// and the same in IPv6 (2001:db8::/64, fd00:244:1::/64, fd00:16::/64, fd00:244:2::10).
type cluster struct {
	t                           testing.TB
	client, node, pod, remote   string
	ext, toRemote               int
	exec                        func(func())
	lb, nodeIP, localPod, other map[string]netip.Addr // by family
}

func newCluster(t testing.TB) *cluster {
	t.Helper()
	nstest.NeedRoot(t, "creates network namespaces and BPF programs")
	id := fmt.Sprintf("%d", os.Getpid()%100000)
	c := &cluster{t: t, client: "ptx-c" + id, node: "ptx-n" + id, pod: "ptx-p" + id, remote: "ptx-r" + id,
		lb:       map[string]netip.Addr{"v4": netip.MustParseAddr("203.0.113.10"), "v6": netip.MustParseAddr("2001:db8:ffff::10")},
		nodeIP:   map[string]netip.Addr{"v4": netip.MustParseAddr("192.0.2.1"), "v6": netip.MustParseAddr("2001:db8::1")},
		localPod: map[string]netip.Addr{"v4": netip.MustParseAddr("10.244.1.10"), "v6": netip.MustParseAddr("fd00:244:1::10")},
		other:    map[string]netip.Addr{"v4": netip.MustParseAddr("10.244.2.10"), "v6": netip.MustParseAddr("fd00:244:2::10")},
	}
	nstest.Netns(t, c.client, c.node, c.pod, c.remote)
	ext, pod, rem := "pxe"+id, "pxp"+id, "pxr"+id
	ip := func(ns string, args ...string) []string { return append([]string{"ip", "-n", ns}, args...) }
	var cmds [][]string
	// No duplicate address detection: link-local addresses are usable at once, so the first
	// neighbour discovery does not wait for them.
	for _, ns := range []string{c.client, c.node, c.pod, c.remote} {
		cmds = append(cmds, []string{"ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"})
	}
	cmds = append(cmds, [][]string{
		{"ip", "link", "add", "eth0", "netns", c.client, "type", "veth", "peer", "name", ext, "netns", c.node},
		{"ip", "link", "add", "eth0", "netns", c.pod, "type", "veth", "peer", "name", pod, "netns", c.node},
		{"ip", "link", "add", "eth0", "netns", c.remote, "type", "veth", "peer", "name", rem, "netns", c.node},
		ip(c.client, "addr", "add", "192.0.2.100/24", "dev", "eth0"),
		ip(c.client, "addr", "add", "2001:db8::100/64", "dev", "eth0", "nodad"),
		ip(c.node, "addr", "add", "192.0.2.1/24", "dev", ext),
		ip(c.node, "addr", "add", "2001:db8::1/64", "dev", ext, "nodad"),
		ip(c.node, "addr", "add", "10.244.1.1/24", "dev", pod),
		ip(c.node, "addr", "add", "fd00:244:1::1/64", "dev", pod, "nodad"),
		ip(c.node, "addr", "add", "172.16.0.1/24", "dev", rem),
		ip(c.node, "addr", "add", "fd00:16::1/64", "dev", rem, "nodad"),
		ip(c.pod, "addr", "add", "10.244.1.10/24", "dev", "eth0"),
		ip(c.pod, "addr", "add", "fd00:244:1::10/64", "dev", "eth0", "nodad"),
		ip(c.remote, "addr", "add", "172.16.0.2/24", "dev", "eth0"),
		ip(c.remote, "addr", "add", "fd00:16::2/64", "dev", "eth0", "nodad"),
		ip(c.remote, "addr", "add", "10.244.2.10/32", "dev", "lo"),
		ip(c.remote, "addr", "add", "fd00:244:2::10/128", "dev", "lo"),
	}...)
	for _, ns := range []string{c.client, c.node, c.pod, c.remote} {
		cmds = append(cmds, ip(ns, "link", "set", "lo", "up"))
	}
	cmds = append(cmds,
		ip(c.client, "link", "set", "eth0", "up"), ip(c.pod, "link", "set", "eth0", "up"), ip(c.remote, "link", "set", "eth0", "up"),
		ip(c.node, "link", "set", ext, "up"), ip(c.node, "link", "set", pod, "up"), ip(c.node, "link", "set", rem, "up"),
		ip(c.client, "route", "add", "203.0.113.0/24", "via", "192.0.2.1"),
		ip(c.client, "route", "add", "2001:db8:ffff::/64", "via", "2001:db8::1"),
		ip(c.pod, "route", "add", "default", "via", "10.244.1.1"),
		ip(c.pod, "route", "add", "default", "via", "fd00:244:1::1"),
		ip(c.node, "route", "add", "10.244.2.0/24", "via", "172.16.0.2"),
		ip(c.node, "route", "add", "fd00:244:2::/64", "via", "fd00:16::2"),
		[]string{"ip", "netns", "exec", c.node, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1", "net.ipv6.conf.all.forwarding=1"},
	)
	for _, cmd := range cmds {
		if out, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(cmd, " "), err, out)
		}
	}
	c.exec = nstest.Enter(t, c.node)
	c.exec(func() {
		for name, into := range map[string]*int{ext: &c.ext, rem: &c.toRemote} {
			if ifc, err := net.InterfaceByName(name); err == nil {
				*into = ifc.Index
			}
		}
	})
	for _, fam := range []string{"v4", "v6"} {
		nstest.Serve(t, c.pod, netip.AddrPortFrom(c.localPod[fam], 8080))
		nstest.Serve(t, c.remote, netip.AddrPortFrom(c.other[fam], 8080))
	}
	return c
}

// attach loads a datapath (pinned in pins unless empty) and attaches it to the node's
// external interfaces.
func (c *cluster) attach(pins string) *Datapath {
	c.t.Helper()
	return c.attachWith(Options{PinDir: pins})
}

func (c *cluster) attachWith(opts Options) *Datapath {
	c.t.Helper()
	d, err := Load(opts)
	if err != nil {
		c.t.Fatal(err)
	}
	c.exec(func() {
		for _, ifindex := range []int{c.ext, c.toRemote} {
			if err == nil {
				err = d.AttachInterface(ifindex)
			}
		}
	})
	if err != nil {
		_ = d.Close()
		c.t.Fatal(err)
	}
	return d
}

// clientCmd prepares a client process in the client namespace.
func (c *cluster) clientCmd(proto string, addr netip.AddrPort) *exec.Cmd {
	cmd := exec.Command("ip", "netns", "exec", c.client, os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"="+proto+" "+addr.String())
	return cmd
}

func (c *cluster) dial(proto string, addr netip.AddrPort) string {
	c.t.Helper()
	out, err := c.clientCmd(proto, addr).CombinedOutput()
	if err != nil {
		c.t.Fatalf("client: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out))
}

// Real TCP and UDP from a client outside reach LoadBalancer IPs and NodePorts, on local and
// remote backends, and come back from the address the client used; externalTrafficPolicy
// Local keeps the client's address; a frontend without backends refuses at once.
func TestPacketLayerCarriesTraffic(t *testing.T) {
	c := newCluster(t)
	d := c.attach("")
	t.Cleanup(func() { _ = d.Close() })
	for _, fam := range []string{"v4", "v6"} {
		client := map[string]string{"v4": "192.0.2.100", "v6": "2001:db8::100"}[fam]
		localPod := netip.AddrPortFrom(c.localPod[fam], 8080)
		remotePod := netip.AddrPortFrom(c.other[fam], 8080)
		snat := map[string]string{"v4": "172.16.0.1", "v6": "fd00:16::1"}[fam]
		for _, tc := range []struct {
			name     string
			frontend loadbalancer.Frontend
			backend  netip.AddrPort
			seenFrom string // the client address the backend sees
		}{
			{"LoadBalancer IP, local backend, externalTrafficPolicy Local", external(netip.AddrPortFrom(c.lb[fam], 80), loadbalancer.TCP, local(localPod)), localPod, client},
			{"LoadBalancer IP, remote backend", external(netip.AddrPortFrom(c.lb[fam], 81), loadbalancer.TCP, remote(remotePod)), remotePod, snat},
			{"NodePort, remote backend", external(netip.AddrPortFrom(c.nodeIP[fam], 30081), loadbalancer.TCP, remote(remotePod)), remotePod, snat},
			{"NodePort, local backend", external(netip.AddrPortFrom(c.nodeIP[fam], 30080), loadbalancer.TCP, local(localPod)), localPod, client},
		} {
			for _, proto := range []loadbalancer.Protocol{loadbalancer.TCP, loadbalancer.UDP} {
				t.Run(fmt.Sprintf("%s/%s/%s", fam, protoName(proto), tc.name), func(t *testing.T) {
					f := tc.frontend
					f.Protocol = proto
					if err := d.Update(f); err != nil {
						t.Fatal(err)
					}
					got := c.dial(protoName(proto), f.Address)
					want := fmt.Sprintf("peer=%s reply=from %s for ", f.Address, tc.backend)
					if !strings.HasPrefix(got, want) || !strings.Contains(got, " for "+bracket(tc.seenFrom)) {
						t.Fatalf("client printed %q, want %q… seen from %s", got, want, tc.seenFrom)
					}
				})
			}
		}
		t.Run(fam+"/no backends: refused", func(t *testing.T) {
			empty := netip.AddrPortFrom(c.lb[fam], 89)
			if err := d.Update(external(empty, loadbalancer.TCP)); err != nil {
				t.Fatal(err)
			}
			if got := c.dial("tcp", empty); !strings.Contains(got, "connection refused") {
				t.Fatalf("client printed %q, want connection refused", got)
			}
		})
	}
}

// bracket writes an address as it appears before a port.
func bracket(addr string) string {
	if strings.Contains(addr, ":") {
		return "[" + addr + "]"
	}
	return addr
}

// A new loader adopts the pinned programs, maps and flows: a TCP connection through SNAT
// to a remote backend, made before the restart, goes on after it.
func TestPacketLayerRestartKeepsFlows(t *testing.T) {
	c := newCluster(t)
	pins := filepath.Join(nstest.BPFFS(t), "node")
	frontend := netip.AddrPortFrom(c.lb["v4"], 81)
	backend := netip.AddrPortFrom(c.other["v4"], 8080)
	first := c.attach(pins)
	if err := first.Update(external(frontend, loadbalancer.TCP, remote(backend))); err != nil {
		t.Fatal(err)
	}
	stdin, lines := startClient(t, c.clientCmd("tcp-hold", frontend))
	want := fmt.Sprintf("peer=%s reply=from %s", frontend, backend)
	if !lines.Scan() || !strings.HasPrefix(lines.Text(), "first "+want) {
		t.Fatalf("before the restart the holder printed %q, want %q", lines.Text(), "first "+want)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	second := c.attach(pins)
	t.Cleanup(func() {
		if err := second.Uninstall(); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	if n, _, err := second.ConntrackEntries(); err != nil || n != 2 {
		t.Fatalf("adopted %d confirmed conntrack entries (%v), want the flow's two", n, err)
	}
	if _, err := io.WriteString(stdin, "go on\n"); err != nil {
		t.Fatal(err)
	}
	if !lines.Scan() || !strings.HasPrefix(lines.Text(), "second "+want) {
		t.Fatalf("after the restart the held connection printed %q, want %q", lines.Text(), "second "+want)
	}
}

// An upgrade that changes a map's layout (here the Maglev table size, which is its value
// size) builds the new map beside the old one: the old programs, still in the links, go on
// with it until the first Apply has filled the new one, then the links swap programs and
// the old pin goes. A held connection through a LoadBalancer address keeps its backend
// all along, and new connections are served before and after the swap.
func TestUpgradeRebuildsChangedMapsBesideTheOld(t *testing.T) {
	c := newCluster(t)
	pins := filepath.Join(nstest.BPFFS(t), "node")
	frontend := netip.AddrPortFrom(c.lb["v4"], 82)
	backend := netip.AddrPortFrom(c.other["v4"], 8080)
	f := external(frontend, loadbalancer.TCP, remote(backend))
	f.Balancing = loadbalancer.Maglev
	old := c.attachWith(Options{PinDir: pins, MaglevTableSize: 1021})
	if err := old.Apply([]loadbalancer.Frontend{f}); err != nil {
		t.Fatal(err)
	}
	stdin, lines := startClient(t, c.clientCmd("tcp-hold", frontend))
	want := fmt.Sprintf("peer=%s reply=from %s", frontend, backend)
	if !lines.Scan() || !strings.HasPrefix(lines.Text(), "first "+want) {
		t.Fatalf("before the upgrade the holder printed %q, want %q", lines.Text(), "first "+want)
	}
	oldProg := programID(t, old, "link_tc_%d_ingress", c.ext)
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}

	upgraded := c.attachWith(Options{PinDir: pins})
	t.Cleanup(func() {
		if err := upgraded.Uninstall(); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	if got := upgraded.Rebuilt(); !slices.Equal(got, []string{"portico_maglev"}) {
		t.Fatalf("rebuilt %v, want the Maglev table alone", got)
	}
	if got := programID(t, upgraded, "link_tc_%d_ingress", c.ext); got != oldProg {
		t.Fatalf("before the first Apply the link runs program %d, want the old agent's %d", got, oldProg)
	}
	if got := c.dial("tcp", frontend); !strings.HasPrefix(got, want) {
		t.Fatalf("a new connection before the swap: %q, want %q", got, want)
	}
	if err := upgraded.Apply([]loadbalancer.Frontend{f}); err != nil {
		t.Fatal(err)
	}
	if got := programID(t, upgraded, "link_tc_%d_ingress", c.ext); got == oldProg {
		t.Fatal("after the first Apply the link still runs the old program")
	}
	if got := pinsOf(t, pins, "portico_maglev"); len(got) != 1 {
		t.Fatalf("Maglev pins after the swap: %v, want the new one alone", got)
	}
	if got := c.dial("tcp", frontend); !strings.HasPrefix(got, want) {
		t.Fatalf("a new connection after the swap: %q, want %q", got, want)
	}
	if _, err := io.WriteString(stdin, "go on\n"); err != nil {
		t.Fatal(err)
	}
	if !lines.Scan() || !strings.HasPrefix(lines.Text(), "second "+want) {
		t.Fatalf("after the upgrade the held connection printed %q, want %q", lines.Text(), "second "+want)
	}
}

// programID is the program a datapath's link runs.
func programID(t *testing.T, d *Datapath, format string, args ...any) ebpf.ProgramID {
	t.Helper()
	l, ok := d.links[fmt.Sprintf(format, args...)]
	if !ok {
		t.Fatalf("no link %s", fmt.Sprintf(format, args...))
	}
	info, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	return info.Program
}

// pinsOf lists the pins of one map in dir, whatever their layout.
func pinsOf(t *testing.T, dir, name string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		if pinOf(e.Name()) == name {
			got = append(got, e.Name())
		}
	}
	return got
}
