package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/test/harness/nstest"
)

// Link-layer addresses of the node's neighbours: the gateway to other nodes and the outside,
// and the local pod.
const (
	gatewayMAC = "02:00:00:00:00:fe"
	podMAC     = "02:00:00:00:00:10"
)

// Verdicts of TC programs (linux/pkt_cls.h).
const (
	actUnspec   = 0xffffffff // not ours: the next program or the stack decides
	actOK       = 0
	actShot     = 2
	actRedirect = 7
)

// skbContext is struct __sk_buff as BPF_PROG_TEST_RUN takes it: only the interface is set.
type skbContext struct {
	_              [36]uint8
	IngressIfindex uint32
	Ifindex        uint32
	_              [148]uint8
}

// node is a network namespace shaped like a node, for Program.Run: an external interface
// (192.0.2.1/24, 2001:db8::1/64, default routes through it), a pod interface with the local
// pod network (10.244.1.0/24, fd00:244:1::/64) and a route to another node's pods
// (10.244.2.0/24, fd00:244:2::/64), with static neighbours. The interfaces are veth pairs
// with both ends in the namespace: nothing leaves it, and test runs send nothing anyway. The programs run on a thread inside the namespace, so that
// their FIB lookups see its routes.
type node struct {
	t    testing.TB
	name string
	d    *Datapath
	ext  uint32
	exec func(func())
}

// family holds one IP family's addresses in the node topology.
type nodeFamily struct {
	name                     string
	client, lb, nodeIP       netip.Addr
	localPod, remotePod      netip.Addr
	icmpUnreach, icmpPortUnr uint8
}

var nodeFamilies = []nodeFamily{
	{"v4", netip.MustParseAddr("198.51.100.7"), netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("192.0.2.1"),
		netip.MustParseAddr("10.244.1.10"), netip.MustParseAddr("10.244.2.10"), 3, 3},
	{"v6", netip.MustParseAddr("2001:db8:100::7"), netip.MustParseAddr("2001:db8:ffff::10"), netip.MustParseAddr("2001:db8::1"),
		netip.MustParseAddr("fd00:244:1::10"), netip.MustParseAddr("fd00:244:2::10"), 1, 4},
}

func newNode(t testing.TB) *node {
	t.Helper()
	return newNodeWith(t, loaded(t))
}

func newNodeWith(t testing.TB, d *Datapath) *node {
	t.Helper()
	n := &node{t: t, name: fmt.Sprintf("ptn-%d", os.Getpid()%100000), d: d}
	nstest.Netns(t, n.name)
	cmds := [][]string{
		{"ip", "-n", n.name, "link", "add", "ext0", "address", net.HardwareAddr(nodeMAC).String(), "type", "veth", "peer", "name", "ext1"},
		{"ip", "-n", n.name, "link", "add", "pod0", "type", "veth", "peer", "name", "pod1"},
		{"ip", "-n", n.name, "addr", "add", "192.0.2.1/24", "dev", "ext0"},
		{"ip", "-n", n.name, "addr", "add", "2001:db8::1/64", "dev", "ext0", "nodad"},
		{"ip", "-n", n.name, "addr", "add", "10.244.1.1/24", "dev", "pod0"},
		{"ip", "-n", n.name, "addr", "add", "fd00:244:1::1/64", "dev", "pod0", "nodad"},
		{"ip", "-n", n.name, "link", "set", "ext0", "up"},
		{"ip", "-n", n.name, "link", "set", "ext1", "up"},
		{"ip", "-n", n.name, "link", "set", "pod0", "up"},
		{"ip", "-n", n.name, "link", "set", "pod1", "up"},
		{"ip", "-n", n.name, "route", "add", "default", "via", "192.0.2.254"},
		{"ip", "-n", n.name, "route", "add", "default", "via", "2001:db8::fe"},
		{"ip", "-n", n.name, "route", "add", "10.244.2.0/24", "via", "192.0.2.2"},
		{"ip", "-n", n.name, "route", "add", "fd00:244:2::/64", "via", "2001:db8::2"},
		{"ip", "-n", n.name, "neigh", "add", "192.0.2.2", "lladdr", gatewayMAC, "dev", "ext0"},
		{"ip", "-n", n.name, "neigh", "add", "2001:db8::2", "lladdr", gatewayMAC, "dev", "ext0"},
		{"ip", "-n", n.name, "neigh", "add", "192.0.2.254", "lladdr", gatewayMAC, "dev", "ext0"},
		{"ip", "-n", n.name, "neigh", "add", "2001:db8::fe", "lladdr", gatewayMAC, "dev", "ext0"},
		{"ip", "-n", n.name, "neigh", "add", "10.244.1.10", "lladdr", podMAC, "dev", "pod0"},
		{"ip", "-n", n.name, "neigh", "add", "fd00:244:1::10", "lladdr", podMAC, "dev", "pod0"},
		{"ip", "netns", "exec", n.name, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1", "net.ipv6.conf.all.forwarding=1"},
	}
	for _, c := range cmds {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", c, err, out)
		}
	}
	n.exec = nstest.Enter(t, n.name)
	n.exec(func() {
		ifc, err := net.InterfaceByName("ext0")
		if err != nil {
			t.Errorf("find ext0: %v", err)
			return
		}
		n.ext = uint32(ifc.Index)
	})
	if n.ext == 0 {
		t.FailNow()
	}
	return n
}

// run runs a program on a packet as if it came in on (or left by) the external interface.
func (n *node) run(t testing.TB, prog *ebpf.Program, in []byte) (uint32, []byte) {
	t.Helper()
	ret, out, err := n.try(prog, in)
	if err != nil {
		t.Fatalf("run %s: %v", prog, err)
	}
	return ret, out
}

// try is run for input the kernel may refuse to run a program on: it does for frames
// whose Ethernet type is IP but whose IP header is cut short (the program drops those).
func (n *node) try(prog *ebpf.Program, in []byte) (uint32, []byte, error) {
	var ret uint32
	var err error
	out := make([]byte, len(in)+256)
	n.exec(func() {
		opts := ebpf.RunOptions{Data: in, DataOut: out, Context: skbContext{IngressIfindex: n.ext, Ifindex: n.ext}}
		ret, err = prog.Run(&opts)
		out = opts.DataOut
	})
	return ret, out, err
}

func (n *node) ingress(t testing.TB, in []byte) (uint32, []byte) {
	t.Helper()
	return n.run(t, n.d.np.PorticoNodeportIngress, in)
}

func (n *node) egress(t testing.TB, in []byte) (uint32, []byte) {
	t.Helper()
	return n.run(t, n.d.np.PorticoNodeportEgress, in)
}

func (n *node) update(fs ...loadbalancer.Frontend) {
	n.t.Helper()
	for _, f := range fs {
		if err := n.d.Update(f); err != nil {
			n.t.Fatal(err)
		}
	}
}

// external is a frontend for clients outside the node.
func external(addr netip.AddrPort, proto loadbalancer.Protocol, backends ...loadbalancer.Backend) loadbalancer.Frontend {
	return loadbalancer.Frontend{Address: addr, Protocol: proto, Scope: loadbalancer.External, Backends: backends}
}

func local(a netip.AddrPort) loadbalancer.Backend {
	return loadbalancer.Backend{Address: a, Local: true}
}
func remote(a netip.AddrPort) loadbalancer.Backend { return loadbalancer.Backend{Address: a} }

// mustDecode decodes a program's output and fails on a bad checksum.
func mustDecode(t testing.TB, b []byte) decoded {
	t.Helper()
	d, err := decode(b)
	if err != nil {
		t.Fatalf("the program's output is corrupt: %v\n% x", err, b)
	}
	return d
}

// A flow to a LoadBalancer IP or NodePort is DNATed to its backend (and SNATed to the node
// for a backend on another node); its replies are translated back to the frontend.
func TestPacketLayerTranslatesBothWays(t *testing.T) {
	n := newNode(t)
	for _, fam := range nodeFamilies {
		for _, proto := range []loadbalancer.Protocol{loadbalancer.TCP, loadbalancer.UDP} {
			lbLocal := netip.AddrPortFrom(fam.lb, 80)
			lbRemote := netip.AddrPortFrom(fam.lb, 81)
			nodePort := netip.AddrPortFrom(fam.nodeIP, 30080)
			localPod := netip.AddrPortFrom(fam.localPod, 8080)
			remotePod := netip.AddrPortFrom(fam.remotePod, 8080)
			n.update(external(lbLocal, proto, local(localPod)), external(lbRemote, proto, remote(remotePod)),
				external(nodePort, proto, remote(remotePod)))
			for i, tc := range []struct {
				name     string
				frontend netip.AddrPort
				backend  netip.AddrPort
				snat     bool
				nextHop  string
			}{
				{"LoadBalancer IP to a local backend keeps the client's address", lbLocal, localPod, false, podMAC},
				{"LoadBalancer IP to a remote backend is SNATed to the node", lbRemote, remotePod, true, gatewayMAC},
				{"NodePort to a remote backend is SNATed to the node", nodePort, remotePod, true, gatewayMAC},
			} {
				t.Run(fmt.Sprintf("%s/%s/%s", fam.name, protoName(proto), tc.name), func(t *testing.T) {
					client := netip.AddrPortFrom(fam.client, uint16(40000+i))
					in := pkt{src: client, dst: tc.frontend, proto: proto, payload: []byte("hello")}
					ret, out := n.ingress(t, in.bytes())
					if ret != actRedirect {
						t.Fatalf("verdict %d, want redirect (%d)", ret, actRedirect)
					}
					fwd := mustDecode(t, out)
					if fwd.dst != tc.backend || string(fwd.payload) != "hello" {
						t.Fatalf("forwarded to %s with %q, want %s with the payload", fwd.dst, fwd.payload, tc.backend)
					}
					wantSrc := client.Addr()
					if tc.snat {
						wantSrc = fam.nodeIP
					}
					if fwd.src.Addr() != wantSrc {
						t.Fatalf("forwarded from %s, want from %s", fwd.src, wantSrc)
					}
					if fwd.dstMAC.String() != tc.nextHop {
						t.Fatalf("forwarded to link-layer address %s, want the next hop's %s", fwd.dstMAC, tc.nextHop)
					}
					// The next packet of the flow goes the same way.
					if ret, again := n.ingress(t, in.bytes()); ret != actRedirect || mustDecode(t, again).dst != tc.backend || mustDecode(t, again).src != fwd.src {
						t.Fatalf("second packet: verdict %d, %s -> %s", ret, mustDecode(t, again).src, mustDecode(t, again).dst)
					}

					// The reply: from a local backend it leaves through egress, from a remote
					// one it comes back to the node's address at ingress.
					reply := pkt{src: tc.backend, dst: fwd.src, proto: proto, payload: []byte("world"), tcpFlags: tcpSYN | tcpACK}
					var back []byte
					if tc.snat {
						if ret, back = n.ingress(t, reply.bytes()); ret != actRedirect {
							t.Fatalf("reply verdict %d, want redirect", ret)
						}
					} else if ret, back = n.egress(t, reply.bytes()); ret != actOK {
						t.Fatalf("reply verdict %d, want ok", ret)
					}
					rev := mustDecode(t, back)
					if rev.src != tc.frontend || rev.dst != client || string(rev.payload) != "world" {
						t.Fatalf("reply %s -> %s %q, want %s -> %s", rev.src, rev.dst, rev.payload, tc.frontend, client)
					}
				})
			}
		}
	}
}

func protoName(p loadbalancer.Protocol) string {
	if p == loadbalancer.TCP {
		return "tcp"
	}
	return "udp"
}

// A frontend without backends answers ICMP port unreachable, for TCP too, as kube-proxy's
// REJECT rule does: the client's connect() fails at once.
func TestPacketLayerRejectsFrontendsWithoutBackends(t *testing.T) {
	n := newNode(t)
	for _, fam := range nodeFamilies {
		for _, proto := range []loadbalancer.Protocol{loadbalancer.TCP, loadbalancer.UDP} {
			t.Run(fam.name+"/"+protoName(proto), func(t *testing.T) {
				frontend := netip.AddrPortFrom(fam.lb, 90)
				n.update(external(frontend, proto))
				client := netip.AddrPortFrom(fam.client, 40100)
				ret, out := n.ingress(t, pkt{src: client, dst: frontend, proto: proto, payload: []byte("hello")}.bytes())
				if ret != actRedirect {
					t.Fatalf("verdict %d, want redirect back out", ret)
				}
				d := mustDecode(t, out)
				if d.icmpType != fam.icmpUnreach || d.icmpCode != fam.icmpPortUnr || d.src.Addr() != fam.lb || d.dst.Addr() != fam.client {
					t.Fatalf("answer %s -> %s ICMP %d/%d, want port unreachable from the frontend to the client", d.src, d.dst, d.icmpType, d.icmpCode)
				}
				if d.quoted == nil || d.quoted.src != client || d.quoted.dst != frontend {
					t.Fatalf("the answer quotes %+v, want the client's packet", d.quoted)
				}
				if d.dstMAC.String() != net.HardwareAddr(clientMAC).String() {
					t.Fatalf("answer sent to %s, want the client's link-layer address", d.dstMAC)
				}
			})
		}
	}
}

// loadBalancerSourceRanges admit listed clients only; lifting them admits everyone and
// leaves no entry behind.
func TestPacketLayerSourceRanges(t *testing.T) {
	n := newNode(t)
	for _, fam := range nodeFamilies {
		t.Run(fam.name, func(t *testing.T) {
			frontend := netip.AddrPortFrom(fam.lb, 91)
			backend := local(netip.AddrPortFrom(fam.localPod, 8080))
			inRange := netip.AddrPortFrom(fam.client, 40200)
			outside := netip.AddrPortFrom(fam.nodeIP.Next().Next().Next(), 40200)
			f := external(frontend, loadbalancer.TCP, backend)
			f.SourceRanges = []netip.Prefix{netip.PrefixFrom(fam.client, fam.client.BitLen()-8)}
			n.update(f)
			if ret, _ := n.ingress(t, pkt{src: inRange, dst: frontend, proto: loadbalancer.TCP}.bytes()); ret != actRedirect {
				t.Fatalf("a client in range: verdict %d, want redirect", ret)
			}
			if ret, _ := n.ingress(t, pkt{src: outside, dst: frontend, proto: loadbalancer.TCP}.bytes()); ret != actShot {
				t.Fatalf("a client out of range: verdict %d, want drop", ret)
			}
			f.SourceRanges = nil
			n.update(f)
			if ret, _ := n.ingress(t, pkt{src: outside, dst: frontend, proto: loadbalancer.TCP}.bytes()); ret != actRedirect {
				t.Fatalf("ranges lifted: verdict %d, want redirect", ret)
			}
			if got := entries(t, n.d.sock.PorticoSrcrange4) + entries(t, n.d.sock.PorticoSrcrange6); got != 0 {
				t.Fatalf("%d source range entries left", got)
			}
		})
	}
}

// backendOf sends the first packet of a flow and returns the backend it went to.
func (n *node) backendOf(t testing.TB, prog *ebpf.Program, client, frontend netip.AddrPort) netip.AddrPort {
	t.Helper()
	ret, out := n.run(t, prog, pkt{src: client, dst: frontend, proto: loadbalancer.UDP}.bytes())
	if ret != actRedirect {
		t.Fatalf("flow %s -> %s: verdict %d, want redirect", client, frontend, ret)
	}
	return mustDecode(t, out).dst
}

func pods(prefix string, count int, mk func(netip.AddrPort) loadbalancer.Backend) []loadbalancer.Backend {
	var out []loadbalancer.Backend
	for i := range count {
		out = append(out, mk(netip.AddrPortFrom(netip.MustParseAddr(fmt.Sprintf(prefix, 10+i)), 8080)))
	}
	return out
}

// sessionAffinity ClientIP keeps every flow of a client on one backend; without it the
// flows spread.
func TestPacketLayerAffinity(t *testing.T) {
	n := newNode(t)
	frontend := netip.MustParseAddrPort("203.0.113.10:92")
	f := external(frontend, loadbalancer.UDP, pods("10.244.1.%d", 8, local)...)
	f.Affinity = 30 * time.Second
	n.update(f)
	seen := map[netip.AddrPort]int{}
	for i := range 20 {
		seen[n.backendOf(t, n.d.np.PorticoNodeportIngress, netip.MustParseAddrPort(fmt.Sprintf("198.51.100.7:%d", 41000+i)), frontend)]++
	}
	if len(seen) != 1 {
		t.Fatalf("with affinity one client's flows went to %v, want one backend", seen)
	}
	f.Affinity = 0
	n.update(f)
	clear(seen)
	for i := range 20 {
		seen[n.backendOf(t, n.d.np.PorticoNodeportIngress, netip.MustParseAddrPort(fmt.Sprintf("198.51.100.7:%d", 42000+i)), frontend)]++
	}
	if len(seen) < 2 {
		t.Fatalf("without affinity 20 flows went to %v, want them spread", seen)
	}
}

// With Maglev every node picks the same backend for a flow: two datapaths with their own
// maps (two nodes) agree on every flow, and flows spread over every backend.
func TestPacketLayerMaglevAgreesAcrossNodes(t *testing.T) {
	n := newNode(t)
	other := loaded(t)
	frontend := netip.MustParseAddrPort("203.0.113.10:93")
	f := external(frontend, loadbalancer.UDP, pods("10.244.2.%d", 8, remote)...)
	f.Balancing = loadbalancer.Maglev
	n.update(f)
	// The other node numbers its backends differently: it learns them in another order.
	g := f
	g.Backends = slices.Clone(f.Backends)
	slices.Reverse(g.Backends)
	if err := other.Update(external(netip.MustParseAddrPort("203.0.113.99:1"), loadbalancer.UDP, remote(netip.MustParseAddrPort("10.244.2.200:1")))); err != nil {
		t.Fatal(err)
	}
	if err := other.Update(g); err != nil {
		t.Fatal(err)
	}
	seen := map[netip.AddrPort]int{}
	for i := range 200 {
		client := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(i)}), uint16(43000+i))
		here := n.backendOf(t, n.d.np.PorticoNodeportIngress, client, frontend)
		there := n.backendOf(t, other.np.PorticoNodeportIngress, client, frontend)
		if here != there {
			t.Fatalf("flow from %s: this node picked %s, the other %s", client, here, there)
		}
		seen[here]++
	}
	if len(seen) != 8 {
		t.Fatalf("200 flows went to %d of 8 backends: %v", len(seen), seen)
	}
}

// An established flow keeps its backend while that backend exists, whatever happens to the
// others; when it goes, the flow moves to a live one. Terminating backends take new flows
// only when no ready one is left, and keep the flows they have.
func TestPacketLayerFlowsKeepTheirBackend(t *testing.T) {
	n := newNode(t)
	frontend := netip.MustParseAddrPort("203.0.113.10:94")
	all := pods("10.244.1.%d", 4, local)
	client := netip.MustParseAddrPort("198.51.100.7:44000")
	n.update(external(frontend, loadbalancer.UDP, all...))
	first := n.backendOf(t, n.d.np.PorticoNodeportIngress, client, frontend)
	var others []loadbalancer.Backend
	for _, b := range all {
		if b.Address != first {
			others = append(others, b)
		}
	}

	// Others come and go: the flow stays.
	n.update(external(frontend, loadbalancer.UDP, append([]loadbalancer.Backend{local(first)}, others[0], local(netip.MustParseAddrPort("10.244.1.99:8080")))...))
	if got := n.backendOf(t, n.d.np.PorticoNodeportIngress, client, frontend); got != first {
		t.Fatalf("after other backends changed the flow moved from %s to %s", first, got)
	}
	// Its backend starts terminating: the flow stays, new flows avoid it.
	n.update(external(frontend, loadbalancer.UDP, loadbalancer.Backend{Address: first, Local: true, Terminating: true}, others[0]))
	if got := n.backendOf(t, n.d.np.PorticoNodeportIngress, client, frontend); got != first {
		t.Fatalf("after its backend began terminating the flow moved from %s to %s", first, got)
	}
	for i := range 20 {
		if got := n.backendOf(t, n.d.np.PorticoNodeportIngress, netip.AddrPortFrom(client.Addr(), uint16(45000+i)), frontend); got != others[0].Address {
			t.Fatalf("a new flow went to %s, want the only ready backend %s", got, others[0].Address)
		}
	}
	// Only terminating backends left: they take new flows.
	n.update(external(frontend, loadbalancer.UDP, loadbalancer.Backend{Address: first, Local: true, Terminating: true}))
	if got := n.backendOf(t, n.d.np.PorticoNodeportIngress, netip.MustParseAddrPort("198.51.100.8:46000"), frontend); got != first {
		t.Fatalf("with only a terminating backend a new flow went to %s", got)
	}
	// Its backend is gone: the flow moves.
	n.update(external(frontend, loadbalancer.UDP, others[1]))
	if got := n.backendOf(t, n.d.np.PorticoNodeportIngress, client, frontend); got != others[1].Address {
		t.Fatalf("after its backend went the flow went to %s, want %s", got, others[1].Address)
	}
}

// Malformed and unusual packets pass untouched or are dropped; translated ones are whole.
func TestPacketLayerMalformedInput(t *testing.T) {
	n := newNode(t)
	for _, fam := range nodeFamilies {
		frontend := netip.AddrPortFrom(fam.lb, 95)
		n.update(external(frontend, loadbalancer.TCP, local(netip.AddrPortFrom(fam.localPod, 8080))))
		syn := pkt{src: netip.AddrPortFrom(fam.client, 47000), dst: frontend, proto: loadbalancer.TCP, payload: []byte("hello")}
		good := syn.bytes()
		ipLen := 20
		if fam.name == "v6" {
			ipLen = 40
		}
		for _, tc := range []struct {
			name string
			in   []byte
			want uint32
		}{
			{"truncated transport header", good[:14+ipLen+10], actShot},
			{"length beyond the packet", slices.Clone(good[:len(good)-3]), actShot},
			{"not IP", append(slices.Clone(good[:12]), 0x08, 0x06, 0, 1), actUnspec},
			{"wrong IP version", func() []byte { b := slices.Clone(good); b[14] = 0x55; return b }(), actShot},
			{"first fragment", pkt{src: syn.src, dst: frontend, proto: loadbalancer.TCP, fragment: true}.bytes(), actUnspec},
			{"not to a frontend", pkt{src: syn.src, dst: netip.AddrPortFrom(fam.lb, 96), proto: loadbalancer.TCP}.bytes(), actUnspec},
			{"for another node's MAC", func() []byte { b := slices.Clone(good); b[5] = 0x03; return b }(), actUnspec},
		} {
			t.Run(fam.name+"/"+tc.name, func(t *testing.T) {
				ret, out := n.ingress(t, tc.in)
				if ret != tc.want {
					t.Fatalf("verdict %d, want %d", ret, tc.want)
				}
				if !slices.Equal(out, tc.in) {
					t.Fatalf("the packet was changed:\n in % x\nout % x", tc.in, out)
				}
			})
		}
		for _, tc := range []struct {
			name string
			in   pkt
		}{
			{"IPv4 options or IPv6 extension headers", pkt{src: syn.src, dst: frontend, proto: loadbalancer.TCP, payload: []byte("hello"),
				ipOptions: []byte{1, 1, 1, 0}, hopByHop: fam.name == "v6"}},
		} {
			t.Run(fam.name+"/"+tc.name, func(t *testing.T) {
				if fam.name == "v6" {
					tc.in.ipOptions = nil
				}
				ret, out := n.ingress(t, tc.in.bytes())
				if ret != actRedirect {
					t.Fatalf("verdict %d, want redirect", ret)
				}
				if d := mustDecode(t, out); d.dst.Addr() != fam.localPod || string(d.payload) != "hello" || len(out) != len(tc.in.bytes()) {
					t.Fatalf("translated to %s with %q, want the backend and the whole packet", d.dst, d.payload)
				}
			})
		}
	}
}

// FuzzPacketLayer feeds arbitrary frames to both packet programs: every verdict is one of
// theirs, and a packet they change is a well-formed one with correct checksums.
func FuzzPacketLayer(f *testing.F) {
	for _, fam := range nodeFamilies {
		for _, proto := range []loadbalancer.Protocol{loadbalancer.TCP, loadbalancer.UDP} {
			f.Add(pkt{src: netip.AddrPortFrom(fam.client, 48000), dst: netip.AddrPortFrom(fam.lb, 80), proto: proto, payload: []byte("x")}.bytes())
			f.Add(pkt{src: netip.AddrPortFrom(fam.client, 48000), dst: netip.AddrPortFrom(fam.lb, 90), proto: proto}.bytes())
			f.Add(pkt{src: netip.AddrPortFrom(fam.localPod, 8080), dst: netip.AddrPortFrom(fam.client, 48000), proto: proto}.bytes())
		}
	}
	n := newNode(f)
	for _, fam := range nodeFamilies {
		for _, proto := range []loadbalancer.Protocol{loadbalancer.TCP, loadbalancer.UDP} {
			n.update(external(netip.AddrPortFrom(fam.lb, 80), proto, local(netip.AddrPortFrom(fam.localPod, 8080)), remote(netip.AddrPortFrom(fam.remotePod, 8080))),
				external(netip.AddrPortFrom(fam.lb, 90), proto))
		}
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) <= 14 {
			return // the kernel runs nothing on less than an Ethernet header and a byte
		}
		_, inErr := decode(in)
		for _, prog := range []*ebpf.Program{n.d.np.PorticoNodeportIngress, n.d.np.PorticoNodeportEgress} {
			ret, out, err := n.try(prog, in)
			if errors.Is(err, unix.EINVAL) {
				return // a frame the kernel refuses to run programs on
			}
			if err != nil {
				t.Fatal(err)
			}
			switch ret {
			case actUnspec, actOK, actShot, actRedirect:
			default:
				t.Fatalf("verdict %d", ret)
			}
			if inErr == nil && ret != actShot && !slices.Equal(in, out) {
				if _, err := decode(out); err != nil {
					t.Fatalf("a well-formed packet came out corrupt: %v\n in % x\nout % x", err, in, out)
				}
			}
		}
	})
}

// A flood of SYNs from spoofed sources, ten times the conntrack table, their backends'
// SYN-ACKs included, pushes out no established flow: each keeps its backend and SNAT port,
// and its replies find the client. A new client still gets through the flood.
func TestPacketLayerSpoofedFloodKeepsEstablishedFlows(t *testing.T) {
	const size = 1024
	nstest.NeedRoot(t, "loads BPF programs")
	d, err := Load(Options{ConntrackSize: size})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	n := newNodeWith(t, d)
	frontend := netip.MustParseAddrPort("203.0.113.10:95")
	n.update(external(frontend, loadbalancer.TCP, pods("10.244.2.%d", 4, remote)...))
	tcp := func(src, dst netip.AddrPort, flags byte, payload string) decoded {
		t.Helper()
		ret, out := n.ingress(t, pkt{src: src, dst: dst, proto: loadbalancer.TCP, tcpFlags: flags, payload: []byte(payload)}.bytes())
		if ret != actRedirect {
			t.Fatalf("%s -> %s: verdict %d, want redirect", src, dst, ret)
		}
		return mustDecode(t, out)
	}
	// handshake sends a flow's SYN and its backend's SYN-ACK; it returns the translated SYN.
	handshake := func(client netip.AddrPort) decoded {
		t.Helper()
		syn := tcp(client, frontend, tcpSYN, "")
		tcp(syn.dst, syn.src, tcpSYN|tcpACK, "")
		return syn
	}
	type flow struct{ client, backend, snat netip.AddrPort }
	var flows []flow
	for i := range 100 {
		client := netip.AddrPortFrom(netip.MustParseAddr("198.51.100.7"), uint16(30000+i))
		syn := handshake(client)
		tcp(client, frontend, tcpACK, "")
		tcp(syn.dst, syn.src, tcpACK, "hello")
		flows = append(flows, flow{client, syn.dst, syn.src})
	}
	if confirmed, unconfirmed, err := d.ConntrackEntries(); err != nil || confirmed != 200 || unconfirmed != 0 {
		t.Fatalf("after 100 handshakes: %d confirmed and %d new entries (%v), want 200 and 0", confirmed, unconfirmed, err)
	}
	for i := range 10 * size {
		handshake(netip.AddrPortFrom(netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}), uint16(1024+i)))
	}
	for _, f := range flows {
		if got := tcp(f.client, frontend, tcpACK, "more"); got.dst != f.backend || got.src != f.snat {
			t.Fatalf("after the flood flow %s went %s -> %s, want %s -> %s", f.client, got.src, got.dst, f.snat, f.backend)
		}
		if got := tcp(f.backend, f.snat, tcpACK, "reply"); got.src != frontend || got.dst != f.client {
			t.Fatalf("after the flood a reply to %s went %s -> %s, want %s -> %s", f.client, got.src, got.dst, frontend, f.client)
		}
	}
	if confirmed, _, err := d.ConntrackEntries(); err != nil || confirmed != 200 {
		t.Fatalf("after the flood: %d confirmed entries (%v), want the 200 of before", confirmed, err)
	}
	fresh := netip.MustParseAddrPort("198.51.100.8:40000")
	syn := handshake(fresh)
	if got := tcp(syn.dst, syn.src, tcpACK, "hello"); got.dst != fresh {
		t.Fatalf("a new client's reply went to %s, want %s", got.dst, fresh)
	}
}
