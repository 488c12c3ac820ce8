package agent

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"k8s.io/apimachinery/pkg/types"

	"github.com/portico-dev/portico/internal/announce"
	"github.com/portico-dev/portico/internal/announce/members"
)

// A node without an interface for an address's pool is no candidate for it, whether it
// knows that of itself or hears it from a peer; when no eligible node has one, the node
// that would have been chosen says so, and nobody announces.
func TestDecidePassesOverNodesWithoutAnInterface(t *testing.T) {
	nodes := []string{"node-1", "node-2", "node-3"}
	ip := netip.MustParseAddr("192.0.2.10")
	a := announce.Address{IP: ip, Service: types.NamespacedName{Namespace: "default", Name: "web"}, Pool: "dmz", Eligible: nodes}
	ranked := slices.Clone(nodes)
	slices.SortFunc(ranked, func(x, y string) int {
		if announce.Outranks(ip, x, y) {
			return -1
		}
		return 1
	})
	first, second := ranked[0], ranked[1]
	// views returns each node's view with every other node live, where the nodes in
	// without have no interface for the pool.
	views := func(without ...string) map[string]view {
		out := map[string]view{}
		for _, self := range nodes {
			v := view{self: self, ready: true, live: map[string]members.Peer{}, ifaces: map[string][]string{"dmz": {"eth1"}}}
			if slices.Contains(without, self) {
				v.ifaces["dmz"] = nil
			}
			for _, n := range nodes {
				if n != self {
					p := members.Peer{}
					if slices.Contains(without, n) {
						p.NoInterface = []string{"dmz"}
					}
					v.live[n] = p
				}
			}
			out[self] = v
		}
		return out
	}
	announcers := func(vs map[string]view) (who []string, problems []string) {
		for _, n := range nodes {
			held, probs := vs[n].decide([]announce.Address{a})
			if len(held) > 0 {
				who = append(who, n)
				if !slices.Equal(held[0].ifaces, []string{"eth1"}) {
					t.Errorf("%s announces on %v, want the pool's interface eth1", n, held[0].ifaces)
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

// A refused peer is logged once a minute per reason, not ten times a second.
func TestRefusedHeartbeatsAreLoggedOncePerMinute(t *testing.T) {
	var lines []string
	r := &refusals{log: funcr.New(func(_, args string) { lines = append(lines, args) }, funcr.Options{}), last: map[[2]string]time.Time{}}
	for range 10 {
		r.tell("node-2", "forged")
	}
	r.tell("node-2", "stale")
	r.tell("node-3", "forged")
	if len(lines) != 3 || !strings.Contains(lines[0], `"peer"="node-2"`) || !strings.Contains(lines[0], `"reason"="forged"`) {
		t.Fatalf("logged %q; want one line per peer and reason", lines)
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
	addrs := make([]announce.Address, 10000)
	claims := map[string][]netip.Addr{}
	for i := range addrs {
		ip := netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
		addrs[i] = announce.Address{IP: ip, Pool: "p", Eligible: nodes, Service: types.NamespacedName{Namespace: "default", Name: fmt.Sprintf("svc-%d", i)}}
		winner := announce.Choose(ip, nodes)
		claims[winner] = append(claims[winner], ip)
	}
	live := map[string]members.Peer{}
	for _, n := range nodes[1:] {
		live[n] = members.Peer{Claims: claims[n]}
	}
	v := view{self: nodes[0], ready: true, live: live, ifaces: map[string][]string{"p": {"eth0"}}}
	if held, _ := v.decide(addrs); len(held) != len(claims[nodes[0]]) {
		b.Fatalf("%s holds %d addresses; want the %d it wins", nodes[0], len(held), len(claims[nodes[0]]))
	}
	b.ReportAllocs()
	for b.Loop() {
		v.decide(addrs)
	}
}
