package announce

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/types"

	"github.com/portico-dev/portico/internal/announce/members"
)

// A node without an interface for an address's pool is no candidate for it, whether it
// knows that of itself or hears it from a peer; when no eligible node has one, the node
// that would have been chosen says so, and nobody announces.
func TestDecidePassesOverNodesWithoutAnInterface(t *testing.T) {
	nodes := []string{"node-1", "node-2", "node-3"}
	ip := netip.MustParseAddr("192.0.2.10")
	a := Address{IP: ip, Service: types.NamespacedName{Namespace: "default", Name: "web"}, Pool: "dmz", Eligible: nodes}
	ranked := slices.Clone(nodes)
	slices.SortFunc(ranked, func(x, y string) int {
		if Outranks(ip, x, y) {
			return -1
		}
		return 1
	})
	first, second := ranked[0], ranked[1]
	// views returns each node's view with every other node live, where the nodes in
	// without have no interface for the pool.
	views := func(without ...string) map[string]View {
		out := map[string]View{}
		for _, self := range nodes {
			v := View{Self: self, Ready: true, Live: map[string]members.Peer{}, Ifaces: map[string][]string{"dmz": {"eth1"}}}
			if slices.Contains(without, self) {
				v.Ifaces["dmz"] = nil
			}
			for _, n := range nodes {
				if n != self {
					p := members.Peer{}
					if slices.Contains(without, n) {
						p.NoInterface = []string{"dmz"}
					}
					v.Live[n] = p
				}
			}
			out[self] = v
		}
		return out
	}
	announcers := func(vs map[string]View) (who []string, problems []string) {
		for _, n := range nodes {
			held, probs := vs[n].Decide([]Address{a})
			if len(held) > 0 {
				who = append(who, n)
				if !slices.Equal(held[0].Interfaces, []string{"eth1"}) {
					t.Errorf("%s announces on %v, want the pool's interface eth1", n, held[0].Interfaces)
				}
			}
			for _, p := range probs {
				problems = append(problems, p...)
			}
		}
		return who, problems
	}

	if who, probs := announcers(views()); !slices.Equal(who, []string{first}) || len(probs) != 0 {
		t.Fatalf("every node able: announced by %v (problems %v); want the first-ranked %s alone", who, probs, first)
	}
	if who, probs := announcers(views(first)); !slices.Equal(who, []string{second}) || len(probs) != 0 {
		t.Fatalf("first-ranked %s without an interface: announced by %v (problems %v); want %s alone", first, who, probs, second)
	}
	who, probs := announcers(views(nodes...))
	if len(who) != 0 || len(probs) != 1 || !strings.Contains(probs[0], "node "+first+" has none") {
		t.Fatalf("no node able: announced by %v, problems %v; want nobody, and one problem told by %s", who, probs, first)
	}
}

// BenchmarkDecide is one speaker sync's decision at scale: 10,000 LoadBalancer addresses,
// 100 nodes, every node live and eligible (the worst case: every address ranks all), each
// peer claiming the addresses it wins.
func BenchmarkDecide(b *testing.B) {
	var nodes []string
	for i := range 100 {
		nodes = append(nodes, fmt.Sprintf("node-%d", i))
	}
	slices.Sort(nodes)
	addrs := make([]Address, 10000)
	claims := map[string][]netip.Addr{}
	for i := range addrs {
		ip := netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
		addrs[i] = Address{IP: ip, Pool: "p", Eligible: nodes, Service: types.NamespacedName{Namespace: "default", Name: fmt.Sprintf("svc-%d", i)}}
		winner := Choose(ip, nodes)
		claims[winner] = append(claims[winner], ip)
	}
	live := map[string]members.Peer{}
	for _, n := range nodes[1:] {
		live[n] = members.Peer{Claims: claims[n]}
	}
	v := View{Self: nodes[0], Ready: true, Live: live, Ifaces: map[string][]string{"p": {"eth0"}}}
	if held, _ := v.Decide(addrs); len(held) != len(claims[nodes[0]]) {
		b.Fatalf("%s holds %d addresses; want the %d it wins", nodes[0], len(held), len(claims[nodes[0]]))
	}
	b.ReportAllocs()
	for b.Loop() {
		v.Decide(addrs)
	}
}
