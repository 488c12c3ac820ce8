// Package announce decides which node announces each LoadBalancer address on the segment.
// Every agent runs the same decision over the same inputs, so the agents agree without a
// leader: the eligible nodes of an address come from the API server's objects (Addresses),
// and among those that are alive the one with the highest rendezvous score wins (Choose).
// See docs/l2.md.
package announce

import (
	"cmp"
	"encoding/binary"
	"net/netip"
	"regexp"
	"slices"

	"github.com/cespare/xxhash/v2"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/internal/poolconfig"
)

// Address is one LoadBalancer address to announce, with the nodes that may announce it.
type Address struct {
	IP      netip.Addr
	Service types.NamespacedName
	Pool    string
	// Eligible are the nodes that may announce the address, by name, sorted.
	Eligible []string
	// Interfaces are the pool's interface patterns; none: the node's own interfaces.
	Interfaces []*regexp.Regexp
}

// Inputs are the API server's objects the decision reads.
type Inputs struct {
	Pools    *poolconfig.Config
	Services []*corev1.Service
	// Slices are the EndpointSlices of each Service (read for externalTrafficPolicy Local).
	Slices map[types.NamespacedName][]*discoveryv1.EndpointSlice
	Nodes  []*corev1.Node
	// ProxyName is the agents' service-proxy-name: Services of another proxy are not announced.
	ProxyName string
}

// Addresses lists every address to announce: the LoadBalancer addresses of the Services the
// agents serve that belong to a valid, enabled pool with L2 announcement on. Addresses of no
// pool (another controller's) are not announced. The list is sorted by address.
func Addresses(in Inputs) []Address {
	var out []Address
	for _, svc := range in.Services {
		if svc.Spec.Type != corev1.ServiceTypeLoadBalancer || !loadbalancer.Serves(svc, in.ProxyName) {
			continue
		}
		name := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
		local := svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
		for _, ip := range loadbalancer.IngressIPs(svc) {
			pool, st := poolOf(in.Pools, ip)
			if st == nil || !st.L2 {
				continue
			}
			a := Address{IP: ip, Service: name, Pool: pool, Interfaces: st.Interfaces, Eligible: []string{}}
			for _, n := range in.Nodes {
				if eligible(n, st.Announcers) && (!local || hasLocal(n.Name, svc, in.Slices[name], ip.Is4())) {
					a.Eligible = append(a.Eligible, n.Name)
				}
			}
			slices.Sort(a.Eligible)
			out = append(out, a)
		}
	}
	slices.SortFunc(out, func(x, y Address) int { return x.IP.Compare(y.IP) })
	return out
}

// poolOf finds the valid, enabled pool that owns ip (an address belongs to one pool at most:
// overlaps go to the older pool).
func poolOf(cfg *poolconfig.Config, ip netip.Addr) (string, *poolconfig.State) {
	if cfg == nil {
		return "", nil
	}
	for name, st := range cfg.States {
		if st.Err == nil && !st.Disabled && st.Addresses != nil && st.Addresses.Contains(ip) {
			return name, st
		}
	}
	return "", nil
}

func eligible(n *corev1.Node, sel labels.Selector) bool {
	if _, excluded := n.Labels[corev1.LabelNodeExcludeBalancers]; excluded || n.DeletionTimestamp != nil {
		return false
	}
	return sel == nil || sel.Matches(labels.Set(n.Labels))
}

// hasLocal says whether node has a ready endpoint of svc in the family of the address: with
// externalTrafficPolicy Local only such nodes may take the address's traffic.
func hasLocal(node string, svc *corev1.Service, es []*discoveryv1.EndpointSlice, is4 bool) bool {
	l := loadbalancer.LocalReady(node, svc, es)
	if is4 {
		return l.IPv4 > 0
	}
	return l.IPv6 > 0
}

// Score is node's rendezvous score for ip: the node with the highest score among the
// candidates announces the address. It depends on nothing else, so that a node coming or
// going moves only the addresses it wins or held.
func Score(ip netip.Addr, node string) uint64 {
	var h xxhash.Digest
	b := ip.As16()
	_, _ = h.Write(b[:])
	_, _ = h.WriteString(node)
	var sum [8]byte
	binary.BigEndian.PutUint64(sum[:], h.Sum64())
	// A second round mixes the name's bytes into every bit: nodes named node-1, node-2, ...
	// would otherwise score close to each other.
	return xxhash.Sum64(sum[:])
}

// Outranks says whether node a comes before node b for ip (ties, which need equal 64-bit
// scores, go by name).
func Outranks(ip netip.Addr, a, b string) bool {
	return cmp.Or(cmp.Compare(Score(ip, a), Score(ip, b)), cmp.Compare(b, a)) > 0
}

// Choose returns the candidate that announces ip, or "" when there is none: the one that
// outranks every other (Outranks), each scored once.
func Choose(ip netip.Addr, candidates []string) string {
	best, top := "", uint64(0)
	for _, c := range candidates {
		if s := Score(ip, c); best == "" || s > top || s == top && c < best {
			best, top = c, s
		}
	}
	return best
}
