package poolconfig

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
)

func pool(name string, age int, blocks ...lbv1.IPBlock) lbv1.LBPool {
	return lbv1.LBPool{
		ObjectMeta: metav1.ObjectMeta{Name: name, CreationTimestamp: metav1.NewTime(time.Unix(1e9, 0).Add(-time.Duration(age) * time.Hour))},
		Spec:       lbv1.LBPoolSpec{Blocks: blocks},
	}
}

func cidr(s string) lbv1.IPBlock          { return lbv1.IPBlock{CIDR: s} }
func rng(start, stop string) lbv1.IPBlock { return lbv1.IPBlock{Start: start, Stop: stop} }

func TestOverlapsBelongToTheOlderPool(t *testing.T) {
	for _, tc := range []struct{ name, older, newer, newerOwn, overlap string }{
		{"v4", "192.0.2.0/25", "192.0.2.0/24", "192.0.2.128/25", "old (192.0.2.0/25)"},
		{"v6", "2001:db8::/121", "2001:db8::/120", "2001:db8::80/121", "old (2001:db8::/121)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// The newer pool sorts first by name, so only age can decide.
			cfg := Parse([]lbv1.LBPool{pool("a-new", 1, cidr(tc.newer)), pool("old", 2, cidr(tc.older))})
			newer := cfg.States["a-new"]
			if got := setText(newer.Addresses); got != tc.newerOwn {
				t.Errorf("newer pool owns %s, want %s", got, tc.newerOwn)
			}
			if strings.Join(newer.Overlaps, ";") != tc.overlap {
				t.Errorf("overlaps = %v, want %s", newer.Overlaps, tc.overlap)
			}
			if got := setText(cfg.States["old"].Addresses); got != tc.older || len(cfg.States["old"].Overlaps) != 0 {
				t.Errorf("older pool owns %s with overlaps %v; want all of %s and none", got, cfg.States["old"].Overlaps, tc.older)
			}
			if len(cfg.Pools) != 2 {
				t.Errorf("pools in force = %d, want 2", len(cfg.Pools))
			}
		})
	}
}

func TestInvalidAndDisabledPoolsServeNothing(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    lbv1.LBPool
		err  string
	}{
		{"host bits", pool("p", 0, cidr("192.0.2.1/24")), "has host bits set; the network is 192.0.2.0/24"},
		{"not a cidr", pool("p", 0, cidr("192.0.2.0/33")), "cidr"},
		{"reversed v4 range", pool("p", 0, rng("192.0.2.9", "192.0.2.1")), "start must not be greater than stop"},
		{"reversed v6 range", pool("p", 0, rng("2001:db8::9", "2001:db8::1")), "start must not be greater than stop"},
		{"mixed range", pool("p", 0, rng("192.0.2.1", "2001:db8::1")), "same IP family"},
		{"no blocks", pool("p", 0), "no blocks"},
		{"bad selector", func() lbv1.LBPool {
			p := pool("p", 0, cidr("192.0.2.0/24"))
			p.Spec.ServiceSelector = &lbv1.LabelSelector{MatchExpressions: []lbv1.LabelSelectorRequirement{{Key: "a", Operator: "Near"}}}
			return p
		}(), "serviceSelector"},
		{"bad matchLabels key", func() lbv1.LBPool {
			p := pool("p", 0, cidr("192.0.2.0/24"))
			p.Spec.NamespaceSelector = &lbv1.LabelSelector{MatchLabels: map[string]lbv1.LabelValue{"not a key": "x"}}
			return p
		}(), "namespaceSelector: invalid selector"},
		{"bad interface regex", func() lbv1.LBPool {
			p := pool("p", 0, cidr("192.0.2.0/24"))
			p.Spec.Announce = &lbv1.Announcement{L2: &lbv1.L2Announcement{Interfaces: []string{"eth("}}}
			return p
		}(), "interfaces[0]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Parse([]lbv1.LBPool{tc.p})
			if err := cfg.States["p"].Err; err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("error = %v, want one containing %q", err, tc.err)
			}
			if len(cfg.Pools) != 0 {
				t.Fatalf("an invalid pool is in force: %+v", cfg.Pools)
			}
		})
	}
	disabled := pool("p", 0, cidr("192.0.2.0/24"))
	disabled.Spec.Disabled = true
	if cfg := Parse([]lbv1.LBPool{disabled, pool("q", -1, cidr("192.0.2.0/25"))}); len(cfg.Pools) != 0 || setText(cfg.States["q"].Addresses) != "" {
		t.Fatalf("a disabled pool must serve nothing yet keep its addresses from younger pools: %+v", cfg.Pools)
	}
}
