package allocator

import (
	"errors"
	"net/netip"
	"slices"
	"testing"

	"go4.org/netipx"
	"k8s.io/apimachinery/pkg/labels"
)

func set(t testing.TB, blocks ...string) *netipx.IPSet {
	t.Helper()
	var b netipx.IPSetBuilder
	for _, s := range blocks {
		if r, err := netipx.ParseIPRange(s); err == nil {
			b.AddRange(r)
			continue
		}
		b.AddPrefix(netip.MustParsePrefix(s))
	}
	s, err := b.IPSet()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func mkPool(t testing.TB, name string, blocks ...string) Pool {
	return Pool{Name: name, Addresses: set(t, blocks...), AutoAssign: true}
}

func svc(key string, fams ...Family) Service {
	if len(fams) == 0 {
		fams = []Family{IPv4}
	}
	return Service{Key: key, Families: fams}
}

func ips(ss ...string) []netip.Addr {
	out := make([]netip.Addr, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParseAddr(s)
	}
	return out
}

func reason(err error) Reason {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}

func TestAssignGivesOneAddressPerFamilyFromTheFirstPoolThatFits(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pools   []Pool
		svc     Service
		want    []string
		reason  Reason
		pooling []string
	}{
		{name: "v4 cidr", pools: []Pool{mkPool(t, "a", "192.0.2.0/30")}, svc: svc("ns/s"), want: []string{"192.0.2.0"}, pooling: []string{"a"}},
		{name: "v6 cidr", pools: []Pool{mkPool(t, "a", "2001:db8::/126")}, svc: svc("ns/s", IPv6), want: []string{"2001:db8::"}},
		{name: "v4 range", pools: []Pool{mkPool(t, "a", "192.0.2.10-192.0.2.12")}, svc: svc("ns/s"), want: []string{"192.0.2.10"}},
		{name: "v6 range", pools: []Pool{mkPool(t, "a", "2001:db8::a-2001:db8::c")}, svc: svc("ns/s", IPv6), want: []string{"2001:db8::a"}},
		{name: "dual stack in family order", pools: []Pool{mkPool(t, "a", "192.0.2.0/30", "2001:db8::/126")}, svc: svc("ns/s", IPv6, IPv4), want: []string{"2001:db8::", "192.0.2.0"}},
		{name: "dual stack from two pools", pools: []Pool{mkPool(t, "v4", "192.0.2.0/30"), mkPool(t, "v6", "2001:db8::/126")}, svc: svc("ns/s", IPv4, IPv6), want: []string{"192.0.2.0", "2001:db8::"}, pooling: []string{"v4", "v6"}},
		{name: "require dual stack without v6 pool", pools: []Pool{mkPool(t, "a", "192.0.2.0/30")}, svc: svc("ns/s", IPv4, IPv6), want: []string{"192.0.2.0"}, reason: ReasonNoPool},
		{name: "prefer dual stack without v6 pool", pools: []Pool{mkPool(t, "a", "192.0.2.0/30")}, svc: Service{Key: "ns/s", Families: []Family{IPv4, IPv6}, PreferFamilies: true}, want: []string{"192.0.2.0"}},
		{name: "v4 wanted, only v6 pool", pools: []Pool{mkPool(t, "a", "2001:db8::/126")}, svc: svc("ns/s"), reason: ReasonNoPool},
		{name: "no pools", svc: svc("ns/s"), reason: ReasonNoPool},
		{
			name:  "priority beats name",
			pools: []Pool{mkPool(t, "a", "192.0.2.0/30"), {Name: "b", Addresses: set(t, "198.51.100.0/30"), AutoAssign: true, Priority: -1}},
			svc:   svc("ns/s"), want: []string{"198.51.100.0"}, pooling: []string{"b"},
		},
		{name: "name breaks ties", pools: []Pool{mkPool(t, "b", "198.51.100.0/30"), mkPool(t, "a", "192.0.2.0/30")}, svc: svc("ns/s"), want: []string{"192.0.2.0"}},
		{
			name:  "autoAssign off is skipped",
			pools: []Pool{{Name: "a", Addresses: set(t, "192.0.2.0/30")}, mkPool(t, "b", "198.51.100.0/30")},
			svc:   svc("ns/s"), want: []string{"198.51.100.0"},
		},
		{name: "autoAssign off only", pools: []Pool{{Name: "a", Addresses: set(t, "192.0.2.0/30")}}, svc: svc("ns/s"), reason: ReasonNoPool},
		{
			name:  "requested pool ignores autoAssign",
			pools: []Pool{mkPool(t, "a", "192.0.2.0/30"), {Name: "b", Addresses: set(t, "198.51.100.0/30")}},
			svc:   Service{Key: "ns/s", Families: []Family{IPv4}, Pool: "b"}, want: []string{"198.51.100.0"},
		},
		{name: "requested pool unknown", pools: []Pool{mkPool(t, "a", "192.0.2.0/30")}, svc: Service{Key: "ns/s", Families: []Family{IPv4}, Pool: "zz"}, reason: ReasonUnknownPool},
		{
			name:  "service selector",
			pools: []Pool{{Name: "a", Addresses: set(t, "192.0.2.0/30"), AutoAssign: true, ServiceSelector: labels.SelectorFromSet(labels.Set{"tier": "web"})}, mkPool(t, "z", "198.51.100.0/30")},
			svc:   Service{Key: "ns/s", Families: []Family{IPv4}, Labels: labels.Set{"tier": "web"}}, want: []string{"192.0.2.0"},
		},
		{
			name:  "service selector mismatch",
			pools: []Pool{{Name: "a", Addresses: set(t, "192.0.2.0/30"), AutoAssign: true, ServiceSelector: labels.SelectorFromSet(labels.Set{"tier": "web"})}},
			svc:   Service{Key: "ns/s", Families: []Family{IPv4}, Labels: labels.Set{"tier": "db"}}, reason: ReasonNoPool,
		},
		{
			name:  "namespace selector",
			pools: []Pool{{Name: "a", Addresses: set(t, "192.0.2.0/30"), AutoAssign: true, NamespaceSelector: labels.SelectorFromSet(labels.Set{"team": "x"})}},
			svc:   Service{Key: "ns/s", Families: []Family{IPv4}, NamespaceLabels: labels.Set{"team": "y"}}, reason: ReasonNoPool,
		},
		{name: "avoid buggy v4", pools: []Pool{{Name: "a", Addresses: set(t, "192.0.2.0/24"), AutoAssign: true, AvoidBuggyIPs: true}}, svc: svc("ns/s"), want: []string{"192.0.2.1"}},
		{name: "avoid buggy leaves v6 alone", pools: []Pool{{Name: "a", Addresses: set(t, "2001:db8::/120"), AutoAssign: true, AvoidBuggyIPs: true}}, svc: svc("ns/s", IPv6), want: []string{"2001:db8::"}},
		{name: "requested v4", pools: []Pool{mkPool(t, "a", "192.0.2.0/24")}, svc: Service{Key: "ns/s", Families: []Family{IPv4}, RequestedIPs: ips("192.0.2.77")}, want: []string{"192.0.2.77"}},
		{name: "requested v6", pools: []Pool{mkPool(t, "a", "2001:db8::/64")}, svc: Service{Key: "ns/s", Families: []Family{IPv6}, RequestedIPs: ips("2001:db8::77")}, want: []string{"2001:db8::77"}},
		{name: "requested outside pools", pools: []Pool{mkPool(t, "a", "192.0.2.0/24")}, svc: Service{Key: "ns/s", Families: []Family{IPv4}, RequestedIPs: ips("203.0.113.1")}, reason: ReasonRequestedOutside},
		{name: "requested buggy in avoiding pool", pools: []Pool{{Name: "a", Addresses: set(t, "192.0.2.0/24"), AvoidBuggyIPs: true}}, svc: Service{Key: "ns/s", Families: []Family{IPv4}, RequestedIPs: ips("192.0.2.255")}, reason: ReasonRequestedOutside},
		{name: "requested in other pool than asked", pools: []Pool{mkPool(t, "a", "192.0.2.0/24"), mkPool(t, "b", "198.51.100.0/24")}, svc: Service{Key: "ns/s", Families: []Family{IPv4}, Pool: "b", RequestedIPs: ips("192.0.2.1")}, reason: ReasonUnknownPool},
		{name: "requested family not wanted", pools: []Pool{mkPool(t, "a", "2001:db8::/64")}, svc: Service{Key: "ns/s", Families: []Family{IPv4}, RequestedIPs: ips("2001:db8::1")}, reason: ReasonFamilyMismatch},
		{name: "requested dual stack", pools: []Pool{mkPool(t, "a", "192.0.2.0/24", "2001:db8::/64")}, svc: Service{Key: "ns/s", Families: []Family{IPv4, IPv6}, RequestedIPs: ips("2001:db8::9", "192.0.2.9")}, want: []string{"192.0.2.9", "2001:db8::9"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := New()
			a.SetPools(tc.pools)
			got, err := a.Assign(tc.svc)
			if reason(err) != tc.reason {
				t.Fatalf("Assign error = %v (reason %q), want reason %q", err, reason(err), tc.reason)
			}
			if !slices.Equal(got.IPs, ips(tc.want...)) {
				t.Fatalf("Assign = %v, want %v", got.IPs, tc.want)
			}
			if tc.pooling != nil && !slices.Equal(got.Pools, tc.pooling) {
				t.Fatalf("pools = %v, want %v", got.Pools, tc.pooling)
			}
		})
	}
}

func TestAssignIsStableAndExhaustionIsReportedThenFreed(t *testing.T) {
	for _, tc := range []struct {
		family Family
		block  string
	}{{IPv4, "192.0.2.0/31"}, {IPv6, "2001:db8::/127"}} {
		t.Run(tc.family.String(), func(t *testing.T) {
			a := New()
			a.SetPools([]Pool{mkPool(t, "a", tc.block)})
			first, _ := a.Assign(svc("ns/one", tc.family))
			again, _ := a.Assign(svc("ns/one", tc.family))
			if !slices.Equal(first.IPs, again.IPs) {
				t.Fatalf("second Assign moved the address: %v then %v", first.IPs, again.IPs)
			}
			second, _ := a.Assign(svc("ns/two", tc.family))
			if _, err := a.Assign(svc("ns/three", tc.family)); reason(err) != ReasonPoolExhausted {
				t.Fatalf("third Service in a two-address pool: err %v, want %s", err, ReasonPoolExhausted)
			}
			a.Release("ns/two")
			third, err := a.Assign(svc("ns/three", tc.family))
			if err != nil || !slices.Equal(third.IPs, second.IPs) {
				t.Fatalf("after release got %v, %v; want the freed %v", third.IPs, err, second.IPs)
			}
		})
	}
}

func TestSharing(t *testing.T) {
	web := func(key, sharing string, local bool, backends string, ports ...int32) Service {
		s := Service{Key: key, Families: []Family{IPv4, IPv6}, Sharing: Sharing{Key: sharing, Local: local, Backends: backends}}
		for _, p := range ports {
			s.Sharing.Ports = append(s.Sharing.Ports, Port{"TCP", p})
		}
		return s
	}
	for _, tc := range []struct {
		name        string
		first, next Service
		share       bool
	}{
		{"same key, other ports", web("ns/a", "k", false, "", 80), web("ns/b", "k", false, "", 443), true},
		{"same key, same port", web("ns/a", "k", false, "", 80), web("ns/b", "k", false, "", 80), false},
		{"other key", web("ns/a", "k", false, "", 80), web("ns/b", "j", false, "", 443), false},
		{"no key", web("ns/a", "", false, "", 80), web("ns/b", "", false, "", 443), false},
		{"local, same backends", web("ns/a", "k", true, "app=x", 80), web("ns/b", "k", true, "app=x", 443), true},
		{"local, other backends", web("ns/a", "k", true, "app=x", 80), web("ns/b", "k", false, "app=y", 443), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := New()
			a.SetPools([]Pool{mkPool(t, "a", "192.0.2.0/24", "2001:db8::/120")})
			x, _ := a.Assign(tc.first)
			y, _ := a.Assign(tc.next)
			if got := slices.Equal(x.IPs, y.IPs); got != tc.share {
				t.Fatalf("shared = %v (%v and %v), want %v", got, x.IPs, y.IPs, tc.share)
			}
			if tc.share {
				// The address stays while one sharer is left, and is free after the last.
				a.Release(tc.first.Key)
				if h := a.Holders(x.IPs[0]); !slices.Equal(h, []string{tc.next.Key}) {
					t.Fatalf("holders after first release = %v", h)
				}
				a.Release(tc.next.Key)
				if h := a.Holders(x.IPs[0]); h != nil {
					t.Fatalf("holders after last release = %v", h)
				}
			}
		})
	}
}

func TestRequestedAddressTakenOrShared(t *testing.T) {
	a := New()
	a.SetPools([]Pool{mkPool(t, "a", "192.0.2.0/24")})
	if _, err := a.Assign(Service{Key: "ns/a", Families: []Family{IPv4}, RequestedIPs: ips("192.0.2.5")}); err != nil {
		t.Fatal(err)
	}
	_, err := a.Assign(Service{Key: "ns/b", Families: []Family{IPv4}, RequestedIPs: ips("192.0.2.5")})
	if reason(err) != ReasonRequestedTaken {
		t.Fatalf("err = %v, want %s", err, ReasonRequestedTaken)
	}
	_, err = a.Assign(Service{Key: "ns/c", Families: []Family{IPv4}, RequestedIPs: ips("192.0.2.5"), Sharing: Sharing{Key: "k"}})
	if reason(err) != ReasonSharingConflict {
		t.Fatalf("err = %v, want %s (holder has no key)", err, ReasonSharingConflict)
	}
}

func TestPoolEditsMoveOnlyAffectedServices(t *testing.T) {
	a := New()
	a.SetPools([]Pool{mkPool(t, "a", "192.0.2.0/30"), mkPool(t, "b", "198.51.100.0/30")})
	one, _ := a.Assign(Service{Key: "ns/one", Families: []Family{IPv4}, Pool: "a"})
	two, _ := a.Assign(Service{Key: "ns/two", Families: []Family{IPv4}, Pool: "b"})

	// Shrinking pool a so that it loses one's address affects one only.
	affected := a.SetPools([]Pool{mkPool(t, "a", "192.0.2.2/31"), mkPool(t, "b", "198.51.100.0/30")})
	if !slices.Equal(affected, []string{"ns/one"}) {
		t.Fatalf("affected = %v, want [ns/one]", affected)
	}
	if got := a.Assigned("ns/two"); !slices.Equal(got.IPs, two.IPs) {
		t.Fatalf("two moved: %v -> %v", two.IPs, got.IPs)
	}
	moved, err := a.Assign(Service{Key: "ns/one", Families: []Family{IPv4}, Pool: "a"})
	if err != nil || slices.Equal(moved.IPs, one.IPs) || moved.IPs[0] != netip.MustParseAddr("192.0.2.2") {
		t.Fatalf("one re-assigned %v, %v", moved.IPs, err)
	}

	// Disabling a pool (it leaves the allocator) takes its addresses back.
	if affected := a.SetPools([]Pool{mkPool(t, "a", "192.0.2.2/31")}); !slices.Equal(affected, []string{"ns/two"}) {
		t.Fatalf("affected = %v, want [ns/two]", affected)
	}
}

func TestClaimRestoresAddressesWithoutHandingOutNewOnes(t *testing.T) {
	a := New()
	a.SetPools([]Pool{mkPool(t, "a", "192.0.2.0/24", "2001:db8::/64")})
	s := svc("ns/a", IPv4, IPv6)
	if got := a.Claim(s, ips("192.0.2.40")); !slices.Equal(got, ips("192.0.2.40")) {
		t.Fatalf("Claim = %v", got)
	}
	if got := a.Claim(svc("ns/b"), ips("192.0.2.40")); len(got) != 0 {
		t.Fatalf("a second Service claimed a held address: %v", got)
	}
	if got := a.Claim(svc("ns/c"), ips("203.0.113.1")); len(got) != 0 {
		t.Fatalf("claimed an address outside every pool: %v", got)
	}
	got, err := a.Assign(s)
	if err != nil || got.IPs[0] != netip.MustParseAddr("192.0.2.40") || !got.IPs[1].Is6() {
		t.Fatalf("Assign after Claim = %v, %v; want the claimed v4 kept and a v6 added", got.IPs, err)
	}
}

func TestCapacityCountsFamiliesAndBuggyAddresses(t *testing.T) {
	for _, tc := range []struct {
		blocks []string
		buggy  bool
		v4, v6 string
	}{
		{[]string{"192.0.2.0/24"}, false, "256", "0"},
		{[]string{"192.0.2.0/24"}, true, "254", "0"},
		{[]string{"192.0.2.0/23"}, true, "508", "0"},
		{[]string{"0.0.0.0/31"}, true, "1", "0"},
		{[]string{"192.0.2.255-192.0.3.0"}, true, "0", "0"},
		{[]string{"2001:db8::/64"}, true, "0", "18446744073709551616"},
		{[]string{"10.0.0.0/8", "2001:db8::/120"}, false, "16777216", "256"},
	} {
		v4, v6 := Capacity(set(t, tc.blocks...), tc.buggy)
		if v4.String() != tc.v4 || v6.String() != tc.v6 {
			t.Errorf("Capacity(%v, buggy=%v) = %s, %s; want %s, %s", tc.blocks, tc.buggy, v4, v6, tc.v4, tc.v6)
		}
	}
}
