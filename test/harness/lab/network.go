// Package lab builds simulated nodes on one machine: network namespaces on a shared bridge,
// a router/client namespace on the same segment with no route out, pod namespaces on each
// node's own bridge, and a cgroup per node for the node's processes. The end-to-end tests and
// the local lab run Portico's agents there. Nothing touches the root network namespace.
package lab

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// The addresses of the shared segment, outside config/samples' pool blocks (192.0.2.0/27,
// 192.0.2.100-120, 2001:db8::/120) so that the lab can hand those out.
var (
	LAN4   = netip.MustParsePrefix("192.0.2.0/24")
	LAN6   = netip.MustParsePrefix("2001:db8::/64")
	router = [2]netip.Addr{netip.MustParseAddr("192.0.2.254"), netip.MustParseAddr("2001:db8::1:fe")}
)

// Network is the simulated segment: the router/client namespace and the nodes.
type Network struct {
	name   string
	lan    string // the namespace holding the bridge
	Client string // the router/client namespace
	// ClientIPs are the client's addresses on the segment, IPv4 then IPv6.
	ClientIPs []netip.Addr
	Nodes     []*Node
	cgroup    string
}

// Node is a simulated node: a namespace with eth0 on the segment and a bridge cni0 for its
// pods, and a cgroup for its processes (the agent attaches its socket programs there).
type Node struct {
	Name   string // the Kubernetes Node name
	Zone   string // its topology.kubernetes.io/zone label ("": none)
	NS     string
	IPs    []netip.Addr   // on the segment, IPv4 then IPv6
	Pods   []netip.Prefix // pod CIDRs, IPv4 then IPv6
	Cgroup string
	net    *Network
	mu     sync.Mutex
	// pods holds each pod slot's pod (nil when free): slot k has addresses .10+k and
	// namespace and port names ending in k+1, which a later pod in the slot reuses.
	pods []*Pod
}

// Pod is a namespace on a node's pod bridge.
type Pod struct {
	Name string
	Node string // the Node's name
	NS   string
	IPs  []netip.Addr // IPv4 then IPv6
}

// New builds a segment with nodes node-1 … node-N. name prefixes every namespace and the
// cgroup (keep it short and unique: "pte1234"). On error, what was built is removed.
func New(name string, nodes int) (*Network, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("the lab needs root: it creates network namespaces, cgroups and BPF programs")
	}
	cg, err := CgroupRoot()
	if err != nil {
		return nil, err
	}
	n := &Network{name: name, lan: name + "-lan", Client: name + "-client", ClientIPs: router[:], cgroup: filepath.Join(cg, "portico-"+name)}
	if err := n.build(nodes); err != nil {
		return nil, errors.Join(err, n.Close())
	}
	return n, nil
}

func (n *Network) build(nodes int) error {
	for _, ns := range []string{n.lan, n.Client} {
		if err := addNS(ns); err != nil {
			return err
		}
	}
	if err := os.Mkdir(n.cgroup, 0o755); err != nil {
		return fmt.Errorf("create cgroup: %w", err)
	}
	// Multicast snooping off: neighbour solicitations reach every port, as on a plain switch.
	if err := ip(n.lan, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"); err != nil {
		return err
	}
	if err := ip(n.lan, "link", "set", "br0", "up"); err != nil {
		return err
	}
	if err := n.plug(n.Client, "client", router[:]); err != nil {
		return err
	}
	// A router takes no redirects. A host would: a node forwarding an address it has not
	// programmed yet to the node that announces it sends one, and the client's traffic for
	// that address would bypass the node a test routes it through from then on.
	if err := sysctl(n.Client, "net.ipv4.conf.all.accept_redirects=0", "net.ipv4.conf.eth0.accept_redirects=0",
		"net.ipv6.conf.all.accept_redirects=0", "net.ipv6.conf.eth0.accept_redirects=0"); err != nil {
		return err
	}
	for i := 1; i <= nodes; i++ {
		node := &Node{
			Name:   fmt.Sprintf("node-%d", i),
			NS:     fmt.Sprintf("%s-node-%d", n.name, i),
			IPs:    []netip.Addr{netip.AddrFrom4([4]byte{192, 0, 2, byte(240 + i)}), netip.MustParseAddr(fmt.Sprintf("2001:db8::1:%x", i))},
			Pods:   []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i)), netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i))},
			Cgroup: filepath.Join(n.cgroup, fmt.Sprintf("node-%d", i)),
			net:    n,
		}
		n.Nodes = append(n.Nodes, node)
		if err := n.addNode(node); err != nil {
			return err
		}
	}
	// Pod networks are routed through their nodes, as with a host-gateway CNI.
	for _, from := range n.Nodes {
		for _, to := range n.Nodes {
			for f := range to.Pods {
				if from != to {
					if err := ip(from.NS, "route", "add", to.Pods[f].String(), "via", to.IPs[f].String()); err != nil {
						return err
					}
				}
			}
		}
	}
	return nil
}

func (n *Network) addNode(node *Node) error {
	if err := addNS(node.NS); err != nil {
		return err
	}
	if err := os.Mkdir(node.Cgroup, 0o755); err != nil {
		return fmt.Errorf("create cgroup: %w", err)
	}
	if err := n.plug(node.NS, node.port(), node.IPs); err != nil {
		return err
	}
	// Multicast snooping off, as on br0: a new pod answers neighbour solicitations at once.
	// An address of its own: a bridge without one takes its ports' lowest, so the pods'
	// gateway would change address as pods come and go, and the pods' neighbour entries
	// would send their traffic to the old one for seconds (as CNI's bridge plugin knows).
	mac := make(net.HardwareAddr, 6)
	if _, err := rand.Read(mac); err != nil {
		return err
	}
	mac[0] = mac[0]&0xfe | 0x02 // unicast, locally administered
	cmds := [][]string{{"link", "add", "cni0", "address", mac.String(), "type", "bridge", "mcast_snooping", "0"}}
	for _, p := range node.Pods {
		cmds = append(cmds, []string{"addr", "add", prefixOf(first(p), p), "dev", "cni0"})
	}
	cmds = append(cmds, []string{"link", "set", "cni0", "up"})
	for _, c := range cmds {
		if err := ip(node.NS, c...); err != nil {
			return err
		}
	}
	return sysctl(node.NS, "net.ipv4.conf.all.forwarding=1", "net.ipv6.conf.all.forwarding=1")
}

// plug connects namespace ns to the bridge (port name in the bridge's namespace) as eth0
// with addrs on the segment.
func (n *Network) plug(ns, port string, addrs []netip.Addr) error {
	if err := run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", "p"+port, "netns", n.lan); err != nil {
		return err
	}
	cmds := [][]string{}
	for _, a := range addrs {
		lan := LAN4
		if a.Is6() {
			lan = LAN6
		}
		cmds = append(cmds, []string{"addr", "add", prefixOf(a, lan), "dev", "eth0"})
	}
	cmds = append(cmds, []string{"link", "set", "eth0", "up"})
	for _, c := range cmds {
		if err := ip(ns, c...); err != nil {
			return err
		}
	}
	if err := ip(n.lan, "link", "set", "p"+port, "master", "br0"); err != nil {
		return err
	}
	if err := ip(n.lan, "link", "set", "p"+port, "up"); err != nil {
		return err
	}
	return settle(ns)
}

// AddPod makes a pod namespace on the node's bridge with the first free slot's address of
// each pod CIDR and default routes through the node. On error nothing of it is left.
func (node *Node) AddPod(name string) (*Pod, error) {
	node.mu.Lock()
	k := slices.Index(node.pods, nil)
	if k < 0 {
		k = len(node.pods)
		node.pods = append(node.pods, nil)
	}
	if k > 200 {
		node.mu.Unlock()
		return nil, fmt.Errorf("node %s has no free pod address", node.Name)
	}
	p := &Pod{Name: name, Node: node.Name, NS: fmt.Sprintf("%s-%s-p%d", node.net.name, node.Name, k+1)}
	node.pods[k] = p
	node.mu.Unlock()
	for _, cidr := range node.Pods {
		a := first(cidr)
		for range 10 + k {
			a = a.Next()
		}
		p.IPs = append(p.IPs, a)
	}
	if err := node.plugPod(p, fmt.Sprintf("v%d", k+1)); err != nil {
		return nil, errors.Join(err, node.RemovePod(p))
	}
	return p, nil
}

func (node *Node) plugPod(p *Pod, port string) error {
	if err := addNS(p.NS); err != nil {
		return err
	}
	if err := run("ip", "link", "add", "eth0", "netns", p.NS, "type", "veth", "peer", "name", port, "netns", node.NS); err != nil {
		return err
	}
	if err := ip(node.NS, "link", "set", port, "master", "cni0"); err != nil {
		return err
	}
	if err := ip(node.NS, "link", "set", port, "up"); err != nil {
		return err
	}
	for f, cidr := range node.Pods {
		if err := ip(p.NS, "addr", "add", prefixOf(p.IPs[f], cidr), "dev", "eth0"); err != nil {
			return err
		}
	}
	if err := ip(p.NS, "link", "set", "eth0", "up"); err != nil {
		return err
	}
	for _, cidr := range node.Pods {
		if err := ip(p.NS, "route", "add", "default", "via", first(cidr).String()); err != nil {
			return err
		}
	}
	// The node may still have a neighbour entry for an earlier pod of this slot (same
	// addresses, another MAC): it would send the new pod's traffic there until it expired.
	for _, a := range p.IPs {
		if err := ip(node.NS, "neigh", "flush", "to", a.String()); err != nil {
			return err
		}
	}
	return settle(p.NS)
}

// RemovePod deletes the pod's veth and namespace and frees its slot; a pod removed already
// is left alone (its slot may hold a new pod with the same names by now). The veth goes
// first, by name: a deleted namespace takes its links with it only when the kernel gets to
// it, and the next pod in the slot would find the old port's name taken.
func (node *Node) RemovePod(p *Pod) error {
	node.mu.Lock()
	defer node.mu.Unlock()
	k := slices.Index(node.pods, p)
	if k < 0 {
		return nil
	}
	_ = ip(node.NS, "link", "del", fmt.Sprintf("v%d", k+1)) // gone already when the pod's setup failed early
	if err := delNS(p.NS); err != nil {
		return err
	}
	node.pods[k] = nil
	return nil
}

// RouteVia sends the client's traffic for addr through node, as a router with a static
// route (or one that learned it by BGP) would.
func (n *Network) RouteVia(addr netip.Addr, node *Node) error {
	via := node.IPs[0]
	if addr.Is6() {
		via = node.IPs[1]
	}
	return ip(n.Client, "route", "replace", netip.PrefixFrom(addr, addr.BitLen()).String(), "via", via.String())
}

// Cut takes node off the segment, as a dead node or a pulled cable would: the bridge drops
// every frame from and to its port (nftables, bridge family). Its link stays up, so the
// bridge keeps its MAC address and does not flood frames meant for it to the other nodes,
// just as a switch right after a node dies. Mend plugs it back.
func (n *Network) Cut(node *Node) error {
	port := "p" + node.port()
	rules := fmt.Sprintf(`add table bridge cut_%[1]s; add chain bridge cut_%[1]s forward { type filter hook forward priority 0; }; `+
		`add rule bridge cut_%[1]s forward iifname %[1]q drop; add rule bridge cut_%[1]s forward oifname %[1]q drop`, port)
	return run("ip", "netns", "exec", n.lan, "nft", rules)
}

// Mend puts a node cut off by Cut back on the segment.
func (n *Network) Mend(node *Node) error {
	return run("ip", "netns", "exec", n.lan, "nft", "delete table bridge cut_p"+node.port())
}

// port names the node's side of the bridge: its number ("p"+port in the bridge's namespace).
func (node *Node) port() string { return strings.TrimPrefix(node.Name, "node-") }

// Close removes every namespace and cgroup of the network. Processes in the node cgroups
// must have ended.
func (n *Network) Close() error {
	var errs []error
	for _, node := range n.Nodes {
		node.mu.Lock()
		namespaces := []string{node.NS}
		for _, p := range node.pods {
			if p != nil {
				namespaces = append(namespaces, p.NS)
			}
		}
		node.mu.Unlock()
		for _, ns := range namespaces {
			errs = append(errs, delNS(ns))
		}
	}
	errs = append(errs, delNS(n.Client), delNS(n.lan))
	errs = append(errs, RemoveCgroup(n.cgroup))
	return errors.Join(errs...)
}

// settle waits until the namespace's IPv6 addresses are usable. Without duplicate address
// detection they still stay tentative until the kernel sees the link's carrier, which it
// learns asynchronously after both ends of a veth are up.
func settle(ns string) error {
	for range 250 {
		out, err := exec.Command("ip", "-n", ns, "-6", "addr", "show", "tentative").CombinedOutput()
		if err != nil {
			return fmt.Errorf("ip -n %s -6 addr show tentative: %w: %s", ns, err, out)
		}
		if len(strings.TrimSpace(string(out))) == 0 {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("the IPv6 addresses of %s stayed tentative for 5 s", ns)
}

// CgroupRoot finds the cgroup v2 mount.
func CgroupRoot() (string, error) {
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return "", fmt.Errorf("find cgroup v2: %w", err)
	}
	for _, line := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[2] == "cgroup2" {
			return f[1], nil
		}
	}
	return "", errors.New("the lab needs cgroup v2 mounted (the agent's socket programs attach to a cgroup)")
}

// RemoveCgroup removes a cgroup and its child cgroups, waiting for the kernel to release
// them after their last process ended.
func RemoveCgroup(dir string) error {
	children, _ := filepath.Glob(filepath.Join(dir, "*", "cgroup.procs"))
	var err error
	for range 100 {
		for _, c := range children {
			_ = os.Remove(filepath.Dir(c))
		}
		if err = os.Remove(dir); err == nil || os.IsNotExist(err) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("remove cgroup %s: %w", dir, err)
}

func addNS(ns string) error {
	if err := run("ip", "netns", "add", ns); err != nil {
		return err
	}
	// IPv6 addresses are usable at once, without duplicate address detection.
	if err := sysctl(ns, "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"); err != nil {
		return err
	}
	return ip(ns, "link", "set", "lo", "up")
}

func delNS(ns string) error {
	if _, err := os.Stat(filepath.Join("/run/netns", ns)); os.IsNotExist(err) {
		return nil
	}
	return run("ip", "netns", "del", ns)
}

func sysctl(ns string, settings ...string) error {
	return run("ip", append([]string{"netns", "exec", ns, "sysctl", "-qw"}, settings...)...)
}

func ip(ns string, args ...string) error {
	return run("ip", append([]string{"-n", ns}, args...)...)
}

func run(name string, args ...string) error {
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// first is the first host address of a prefix (the gateway of a pod network).
func first(p netip.Prefix) netip.Addr { return p.Masked().Addr().Next() }

func prefixOf(a netip.Addr, p netip.Prefix) string {
	return netip.PrefixFrom(a, p.Bits()).String()
}
