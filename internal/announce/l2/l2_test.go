package l2

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/nstest"
)

// segment is two nodes and a router on one bridge, each node with an announcer.
type segment struct {
	net     *lab.Network
	ann     []*Announcer
	metrics []*Metrics
	macs    []string
}

func newSegment(t *testing.T) *segment {
	t.Helper()
	nstest.NeedRoot(t, "builds network namespaces and opens raw sockets")
	for _, tool := range []string{"arping", "ndisc6"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing: make test-peers installs it", tool)
		}
	}
	n, err := lab.New(fmt.Sprintf("pl2%d", os.Getpid()%100000), 2)
	if err != nil {
		t.Fatal(err)
	}
	s := &segment{net: n}
	t.Cleanup(func() {
		for _, a := range s.ann {
			a.Close()
		}
		if err := n.Close(); err != nil {
			t.Error(err)
		}
	})
	for _, node := range n.Nodes {
		m, err := NewMetrics(prometheus.NewRegistry())
		if err != nil {
			t.Fatal(err)
		}
		mac, err := node.MAC()
		if err != nil {
			t.Fatal(err)
		}
		s.ann, s.metrics, s.macs = append(s.ann, NewAnnouncer(m)), append(s.metrics, m), append(s.macs, mac)
	}
	return s
}

// set makes node i announce ips on eth0. The responder's sockets are opened inside the
// node's namespace; they stay there whichever thread reads them.
func (s *segment) set(t *testing.T, i int, ips ...netip.Addr) {
	t.Helper()
	if err := lab.In(s.net.Nodes[i].NS, func() error { return s.ann[i].Set(map[string][]netip.Addr{"eth0": ips}) }); err != nil {
		t.Fatal(err)
	}
}

// neighbour returns the router kernel's neighbour entry for ip (its MAC, "" when none).
func (s *segment) neighbour(t *testing.T, ip netip.Addr) string {
	t.Helper()
	mac, err := s.net.Neighbour(ip)
	if err != nil {
		t.Fatal(err)
	}
	return mac
}

var (
	vip4, vip6     = netip.MustParseAddr("192.0.2.100"), netip.MustParseAddr("2001:db8::100")
	other4, other6 = netip.MustParseAddr("192.0.2.101"), netip.MustParseAddr("2001:db8::101")
	free4, free6   = netip.MustParseAddr("192.0.2.102"), netip.MustParseAddr("2001:db8::102")
)

func TestOnlyTheAnnouncingNodeAnswers(t *testing.T) {
	s := newSegment(t)
	s.set(t, 0, vip4, vip6)
	s.set(t, 1, other4, other6)
	for _, tc := range []struct {
		ip   netip.Addr
		want string
	}{{vip4, s.macs[0]}, {vip6, s.macs[0]}, {other4, s.macs[1]}, {other6, s.macs[1]}, {free4, ""}, {free6, ""}} {
		want := []string{tc.want}
		if tc.want == "" {
			want = nil
		}
		if got := s.net.Resolve(tc.ip, 1); !slices.Equal(got, want) {
			t.Errorf("%s answered by %v; want %q (node-1 %s, node-2 %s)", tc.ip, got, tc.want, s.macs[0], s.macs[1])
		}
	}
	// ARP requests are broadcast: each node hears all three (and whatever else asks). A solicitation goes to the
	// solicited-node group of its target: each node hears only those of its own address.
	for proto, heard := range map[string]float64{"arp": 3, "ndp": 1} {
		for node := range 2 {
			if got := testutil.ToFloat64(s.metrics[node].replies.WithLabelValues("eth0", proto)); got != 1 {
				t.Errorf("node-%d sent %v %s replies; want one (for its own address)", node+1, got, proto)
			}
			if got := testutil.ToFloat64(s.metrics[node].requests.WithLabelValues("eth0", proto)); got < heard {
				t.Errorf("node-%d heard %v %s requests; want at least %v", node+1, got, proto, heard)
			}
		}
	}
}

func TestTakeOverMovesTheRoutersNeighbourEntry(t *testing.T) {
	s := newSegment(t)
	s.set(t, 0, vip4, vip6)
	for _, ip := range []netip.Addr{vip4, vip6} {
		// The router's kernel resolves the address for a packet of its own (nothing answers the
		// connection here: there is no datapath).
		_ = lab.In(s.net.Client, func() error {
			c, err := net.DialTimeout("tcp", netip.AddrPortFrom(ip, 80).String(), 300*time.Millisecond)
			if err == nil {
				_ = c.Close()
			}
			return nil
		})
		if got := s.neighbour(t, ip); got != s.macs[0] {
			t.Fatalf("the router resolved %s to %q; want node-1's %s", ip, got, s.macs[0])
		}
	}
	s.set(t, 0)
	s.set(t, 1, vip4, vip6)
	for _, ip := range []netip.Addr{vip4, vip6} {
		// Bounded wait: the gratuitous ARP or NA is on the wire once set returns.
		deadline := time.Now().Add(2 * time.Second)
		for s.neighbour(t, ip) != s.macs[1] && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if got := s.neighbour(t, ip); got != s.macs[1] {
			t.Errorf("after node-2 took %s over, the router's entry is %q; want node-2's %s", ip, got, s.macs[1])
		}
		if got := s.net.Resolve(ip, 1); !slices.Equal(got, []string{s.macs[1]}) {
			t.Errorf("%s answered by %v after the take-over; want node-2's %s only", ip, got, s.macs[1])
		}
	}
	// Each node took the addresses over once: ARP as a request and a reply, one NA.
	for node := range 2 {
		for proto, want := range map[string]float64{"arp": 2, "ndp": 1} {
			if got := testutil.ToFloat64(s.metrics[node].gratuitous.WithLabelValues("eth0", proto)); got != want {
				t.Errorf("node-%d sent %v gratuitous %s; want %v", node+1, got, proto, want)
			}
		}
	}
}
