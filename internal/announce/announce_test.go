package announce

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/poolconfig"
)

func names(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("node-%d", i+1)
	}
	return out
}

func addrs(n int, v6 bool) []netip.Addr {
	a := netip.MustParseAddr("10.0.0.0")
	if v6 {
		a = netip.MustParseAddr("2001:db8::")
	}
	out := make([]netip.Addr, n)
	for i := range out {
		a = a.Next()
		out[i] = a
	}
	return out
}

func TestChoiceMovesOnlyWhatItMust(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		t.Run(map[bool]string{false: "IPv4", true: "IPv6"}[v6], func(t *testing.T) {
			ips := addrs(3000, v6)
			nodes := names(10)
			before := map[netip.Addr]string{}
			perNode := map[string]int{}
			for _, ip := range ips {
				before[ip] = Choose(ip, nodes)
				perNode[before[ip]]++
			}
			// Spread: each of 10 nodes gets about 300 addresses.
			for _, n := range nodes {
				if perNode[n] < 200 || perNode[n] > 400 {
					t.Errorf("%s announces %d of 3000 addresses; want about 300", n, perNode[n])
				}
			}
			// A node joins: only the addresses it wins move, about 1/11 of them.
			joined := append(slices.Clone(nodes), "node-11")
			moved := 0
			for _, ip := range ips {
				if now := Choose(ip, joined); now != before[ip] {
					if now != "node-11" {
						t.Fatalf("%s moved from %s to %s when node-11 joined", ip, before[ip], now)
					}
					moved++
				}
			}
			if moved < 150 || moved > 400 {
				t.Errorf("node-11 took %d of 3000 addresses; want about 273", moved)
			}
			// A node goes: only its addresses move.
			left := slices.DeleteFunc(slices.Clone(nodes), func(n string) bool { return n == "node-3" })
			for _, ip := range ips {
				if now := Choose(ip, left); before[ip] != "node-3" && now != before[ip] {
					t.Fatalf("%s moved from %s to %s when node-3 left", ip, before[ip], now)
				}
			}
		})
	}
}

func TestChooseWithoutCandidates(t *testing.T) {
	if got := Choose(netip.MustParseAddr("192.0.2.1"), nil); got != "" {
		t.Fatalf("Choose with no candidates = %q; want none", got)
	}
}

func TestOutranksIsAnOrder(t *testing.T) {
	ip := netip.MustParseAddr("2001:db8::7")
	nodes := names(5)
	for _, a := range nodes {
		if Outranks(ip, a, a) {
			t.Fatalf("%s outranks itself", a)
		}
		for _, b := range nodes {
			if a != b && Outranks(ip, a, b) == Outranks(ip, b, a) {
				t.Fatalf("%s and %s: Outranks is not antisymmetric", a, b)
			}
		}
	}
	if w := Choose(ip, nodes); slices.ContainsFunc(nodes, func(n string) bool { return Outranks(ip, n, w) }) {
		t.Fatalf("some node outranks the chosen %s", w)
	}
}

func pool(name string, mod func(*lbv1.LBPool)) lbv1.LBPool {
	p := lbv1.LBPool{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: lbv1.LBPoolSpec{Blocks: []lbv1.IPBlock{{CIDR: "192.0.2.0/28"}, {CIDR: "2001:db8::/124"}}}}
	if mod != nil {
		mod(&p)
	}
	return p
}

func node(name string, labels map[string]string) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

func service(name string, local bool, ips ...string) *corev1.Service {
	s := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, ClusterIP: "10.96.0.10"}}
	if local {
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}
	for _, ip := range ips {
		s.Status.LoadBalancer.Ingress = append(s.Status.LoadBalancer.Ingress, corev1.LoadBalancerIngress{IP: ip})
	}
	return s
}

func endpointsOn(svc, family string, nodes ...string) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{AddressType: discoveryv1.AddressType(family)}
	for i, n := range nodes {
		a := fmt.Sprintf("10.244.0.%d", i+1)
		if family == "IPv6" {
			a = fmt.Sprintf("fd00::%d", i+1)
		}
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{a}, NodeName: ptr.To(n),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}})
	}
	return es
}

func TestEligibleNodes(t *testing.T) {
	allNodes := []*corev1.Node{
		node("node-1", map[string]string{"rack": "a"}),
		node("node-2", map[string]string{"rack": "b"}),
		node("node-3", map[string]string{"rack": "a", corev1.LabelNodeExcludeBalancers: ""}),
	}
	rackA := func(p *lbv1.LBPool) {
		p.Spec.Announce = &lbv1.Announcement{L2: &lbv1.L2Announcement{NodeSelector: &lbv1.LabelSelector{MatchLabels: map[string]lbv1.LabelValue{"rack": "a"}}}}
	}
	for _, tc := range []struct {
		name  string
		pools []lbv1.LBPool
		svc   *corev1.Service
		es    []*discoveryv1.EndpointSlice
		want  map[string][]string // address -> eligible nodes; absent: not announced
	}{{
		name:  "every node not excluded",
		pools: []lbv1.LBPool{pool("p", nil)},
		svc:   service("web", false, "192.0.2.1", "2001:db8::1"),
		want:  map[string][]string{"192.0.2.1": {"node-1", "node-2"}, "2001:db8::1": {"node-1", "node-2"}},
	}, {
		name:  "node selector",
		pools: []lbv1.LBPool{pool("p", rackA)},
		svc:   service("web", false, "192.0.2.1", "2001:db8::1"),
		want:  map[string][]string{"192.0.2.1": {"node-1"}, "2001:db8::1": {"node-1"}},
	}, {
		name:  "externalTrafficPolicy Local: nodes with a ready endpoint of the family",
		pools: []lbv1.LBPool{pool("p", nil)},
		svc:   service("web", true, "192.0.2.1", "2001:db8::1"),
		es:    []*discoveryv1.EndpointSlice{endpointsOn("web", "IPv4", "node-2"), endpointsOn("web", "IPv6", "node-1", "node-2", "node-3")},
		want:  map[string][]string{"192.0.2.1": {"node-2"}, "2001:db8::1": {"node-1", "node-2"}},
	}, {
		name:  "externalTrafficPolicy Local without endpoints: announced by nobody",
		pools: []lbv1.LBPool{pool("p", nil)},
		svc:   service("web", true, "192.0.2.1"),
		want:  map[string][]string{"192.0.2.1": {}},
	}, {
		name: "announcement off",
		pools: []lbv1.LBPool{pool("p", func(p *lbv1.LBPool) {
			p.Spec.Announce = &lbv1.Announcement{L2: &lbv1.L2Announcement{Enabled: ptr.To(false)}}
		})},
		svc:  service("web", false, "192.0.2.1"),
		want: map[string][]string{},
	}, {
		name:  "disabled pool",
		pools: []lbv1.LBPool{pool("p", func(p *lbv1.LBPool) { p.Spec.Disabled = true })},
		svc:   service("web", false, "192.0.2.1"),
		want:  map[string][]string{},
	}, {
		name:  "address of no pool",
		pools: []lbv1.LBPool{pool("p", nil)},
		svc:   service("web", false, "198.51.100.1", "2001:db8:1::1"),
		want:  map[string][]string{},
	}, {
		name: "overlap: the older pool's settings",
		pools: []lbv1.LBPool{
			pool("old", func(p *lbv1.LBPool) { rackA(p); p.CreationTimestamp = metav1.Unix(1, 0) }),
			pool("new", func(p *lbv1.LBPool) { p.CreationTimestamp = metav1.Unix(2, 0) }),
		},
		svc:  service("web", false, "192.0.2.1"),
		want: map[string][]string{"192.0.2.1": {"node-1"}},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			got := Addresses(Inputs{Pools: poolconfig.Parse(tc.pools), Services: []*corev1.Service{tc.svc},
				Slices: map[types.NamespacedName][]*discoveryv1.EndpointSlice{{Namespace: "default", Name: "web"}: tc.es}, Nodes: allNodes})
			if len(got) != len(tc.want) {
				t.Fatalf("announced %v; want %v", got, tc.want)
			}
			for _, a := range got {
				want, ok := tc.want[a.IP.String()]
				if !ok || !slices.Equal(a.Eligible, want) {
					t.Errorf("%s: eligible %v; want %v (announced: %v)", a.IP, a.Eligible, want, ok)
				}
			}
		})
	}
}

func TestAddressesSkipWhatAgentsDoNotServe(t *testing.T) {
	other := service("other", false, "192.0.2.2")
	other.Labels = map[string]string{"service.kubernetes.io/service-proxy-name": "someone-else"}
	nodePort := service("np", false, "192.0.2.3")
	nodePort.Spec.Type = corev1.ServiceTypeNodePort
	got := Addresses(Inputs{Pools: poolconfig.Parse([]lbv1.LBPool{pool("p", nil)}), Services: []*corev1.Service{other, nodePort},
		Nodes: []*corev1.Node{node("node-1", nil)}})
	if len(got) != 0 {
		t.Fatalf("announced %v; want nothing (another proxy's Service, a NodePort Service with a stale address)", got)
	}
}

// Scores never change between versions: during a rolling update agents of two versions
// must rank nodes alike, or both would announce some addresses.
func TestScoresDoNotChange(t *testing.T) {
	for _, c := range []struct {
		ip, node string
		want     uint64
	}{{"192.0.2.10", "node-1", 10453794226834339465}, {"2001:db8::10", "worker-a", 6936590223500443064}} {
		if got := Score(netip.MustParseAddr(c.ip), c.node); got != c.want {
			t.Errorf("Score(%s, %s) = %d; it was %d", c.ip, c.node, got, c.want)
		}
	}
}

// Choose picks the candidate that outranks every other one.
func TestChooseOutranksEveryOther(t *testing.T) {
	var nodes []string
	for i := range 20 {
		nodes = append(nodes, fmt.Sprintf("node-%d", i))
	}
	for i := range 1000 {
		ip := netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		cands := nodes[i%7 : 7+i%13]
		got := Choose(ip, cands)
		for _, c := range cands {
			if c != got && !Outranks(ip, got, c) {
				t.Fatalf("Choose(%s, %v) = %s, which %s outranks", ip, cands, got, c)
			}
		}
	}
	if got := Choose(netip.MustParseAddr("192.0.2.1"), nil); got != "" {
		t.Fatalf("Choose of no candidates = %q", got)
	}
}
