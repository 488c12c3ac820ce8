package datapath

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
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
	t     testing.TB
	name  string
	d     *Datapath
	ext   uint32
	calls chan func()
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
	d := loaded(t)
	n := &node{t: t, name: fmt.Sprintf("ptn-%d", os.Getpid()%100000), d: d, calls: make(chan func())}
	cmds := [][]string{
		{"ip", "netns", "add", n.name},
		{"ip", "-n", n.name, "link", "add", "ext0", "type", "veth", "peer", "name", "ext1"},
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
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", n.name).Run() })
	for _, c := range cmds {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", c, err, out)
		}
	}
	ready := make(chan error)
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		ns, err := os.Open("/run/netns/" + n.name)
		if err != nil {
			ready <- err
			return
		}
		err = unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET)
		ns.Close()
		if err == nil {
			var ifc *net.Interface
			if ifc, err = net.InterfaceByName("ext0"); err == nil {
				n.ext = uint32(ifc.Index)
			}
		}
		ready <- err
		for {
			select {
			case f := <-n.calls:
				f()
			case <-stop:
				return
			}
		}
	}()
	if err := <-ready; err != nil {
		t.Fatalf("enter the node namespace: %v", err)
	}
	return n
}

// run runs a program on a packet as if it came in on (or left by) the external interface.
func (n *node) run(prog *ebpf.Program, in []byte) (uint32, []byte) {
	n.t.Helper()
	var ret uint32
	var err error
	out := make([]byte, len(in)+256)
	done := make(chan struct{})
	n.calls <- func() {
		defer close(done)
		opts := ebpf.RunOptions{Data: in, DataOut: out, Context: skbContext{IngressIfindex: n.ext, Ifindex: n.ext}}
		ret, err = prog.Run(&opts)
		out = opts.DataOut
	}
	<-done
	if err != nil {
		n.t.Fatalf("run %s: %v", prog, err)
	}
	return ret, out
}

func (n *node) ingress(in []byte) (uint32, []byte) { return n.run(n.d.np.PorticoNodeportIngress, in) }
func (n *node) egress(in []byte) (uint32, []byte)  { return n.run(n.d.np.PorticoNodeportEgress, in) }

func (n *node) update(fs ...Frontend) {
	n.t.Helper()
	for _, f := range fs {
		if err := n.d.Update(f); err != nil {
			n.t.Fatal(err)
		}
	}
}

// external is a frontend for clients outside the node.
func external(addr netip.AddrPort, proto Protocol, backends ...Backend) Frontend {
	return Frontend{Address: addr, Protocol: proto, Scope: External, Backends: backends}
}

func local(a netip.AddrPort) Backend  { return Backend{Address: a, Local: true} }
func remote(a netip.AddrPort) Backend { return Backend{Address: a} }

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
		for _, proto := range []Protocol{TCP, UDP} {
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
					ret, out := n.ingress(in.bytes())
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
					if ret, again := n.ingress(in.bytes()); ret != actRedirect || mustDecode(t, again).dst != tc.backend || mustDecode(t, again).src != fwd.src {
						t.Fatalf("second packet: verdict %d, %s -> %s", ret, mustDecode(t, again).src, mustDecode(t, again).dst)
					}

					// The reply: from a local backend it leaves through egress, from a remote
					// one it comes back to the node's address at ingress.
					reply := pkt{src: tc.backend, dst: fwd.src, proto: proto, payload: []byte("world"), tcpFlags: tcpSYN | tcpACK}
					var back []byte
					if tc.snat {
						if ret, back = n.ingress(reply.bytes()); ret != actRedirect {
							t.Fatalf("reply verdict %d, want redirect", ret)
						}
					} else if ret, back = n.egress(reply.bytes()); ret != actOK {
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

func protoName(p Protocol) string {
	if p == TCP {
		return "tcp"
	}
	return "udp"
}
