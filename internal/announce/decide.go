package announce

import (
	"fmt"
	"net/netip"
	"slices"

	"k8s.io/apimachinery/pkg/types"

	"github.com/portico-dev/portico/internal/announce/members"
)

// View is what one agent knows when it decides: itself, whether it has warmed up, its live
// peers (with their claims and the pools they have no interface for) and its own interfaces
// per pool (PoolInterfaces).
type View struct {
	Self   string
	Ready  bool
	Live   map[string]members.Peer
	Ifaces map[string][]string
}

// Holding is an address this node announces, and on which interfaces.
type Holding struct {
	Address
	Interfaces []string
}

// Decide returns the addresses this node announces, and the problems it should tell: an
// address is this node's when it ranks first among the eligible, live nodes with an interface
// for its pool, and no live peer ranked higher claims it.
func (v View) Decide(addresses []Address) ([]Holding, map[types.NamespacedName][]string) {
	var held []Holding
	problems := map[types.NamespacedName][]string{}
	var buf []string
	for _, a := range addresses {
		buf = v.candidates(buf[:0], a, true)
		switch chosen := Choose(a.IP, buf); {
		case chosen == v.Self && !v.outranked(a.IP):
			held = append(held, Holding{a, v.Ifaces[a.Pool]})
		case chosen == "" && Choose(a.IP, v.candidates(buf[:0], a, false)) == v.Self:
			// Nobody can: the node that would have been chosen says so.
			problems[a.Service] = append(problems[a.Service],
				fmt.Sprintf("no node with an interface of pool %s can announce %s (node %s has none)", a.Pool, a.IP, v.Self))
		}
	}
	return held, problems
}

// candidates appends to out the eligible nodes that are live (this one: warmed up) and,
// when able is set, have an interface for the address's pool.
func (v View) candidates(out []string, a Address, able bool) []string {
	for _, n := range a.Eligible {
		if p, ok := v.Live[n]; ok && (!able || !slices.Contains(p.NoInterface, a.Pool)) ||
			n == v.Self && v.Ready && (!able || len(v.Ifaces[a.Pool]) > 0) {
			out = append(out, n)
		}
	}
	return out
}

// outranked says whether a live peer that comes before this node for ip announces it: two
// agents whose views differ both think they win, and the lower one yields within a heartbeat.
func (v View) outranked(ip netip.Addr) bool {
	for name, peer := range v.Live {
		if slices.Contains(peer.Claims, ip) && Outranks(ip, name, v.Self) {
			return true
		}
	}
	return false
}

// Link is one of the node's interfaces that can announce: up, Ethernet, not loopback.
type Link struct {
	Name string
	// Own says whether it carries one of the node's InternalIP addresses.
	Own bool
}

// PoolInterfaces returns, per pool of the addresses, the interfaces this node announces its
// addresses on, and the pools it has none for (sorted).
func PoolInterfaces(links []Link, addresses []Address) (map[string][]string, []string) {
	ifaces := map[string][]string{}
	var none []string
	for _, a := range addresses {
		if _, seen := ifaces[a.Pool]; !seen {
			ifaces[a.Pool] = matching(links, a)
			if len(ifaces[a.Pool]) == 0 {
				none = append(none, a.Pool)
			}
		}
	}
	slices.Sort(none)
	return ifaces, none
}

// matching are the interfaces an address is announced on: those its pool's patterns match,
// or the node's own.
func matching(links []Link, a Address) []string {
	var out []string
	for _, l := range links {
		ok := l.Own && len(a.Interfaces) == 0
		for _, re := range a.Interfaces {
			ok = ok || re.MatchString(l.Name)
		}
		if ok {
			out = append(out, l.Name)
		}
	}
	return out
}
