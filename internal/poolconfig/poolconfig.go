// Package poolconfig turns every LBPool into one validated configuration: the pools the
// allocator may use, and for each pool the story its status tells (Ready, Conflict).
//
// Both the allocation reconciler and the pool status reconciler call Parse, so what a pool's
// conditions say is exactly what the allocator does with it.
package poolconfig

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"

	"go4.org/netipx"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/allocator"
)

// State is what the operator concluded about one pool.
type State struct {
	// Err is why the pool is invalid; an invalid pool serves nothing and holds no addresses.
	Err error
	// Disabled mirrors spec.disabled.
	Disabled bool
	// Addresses are the pool's own addresses: its blocks less what older pools hold.
	Addresses *netipx.IPSet
	// Overlaps names the older pools that hold some of this pool's blocks, with the overlap.
	Overlaps []string
	// Blocks is the pool's blocks as text.
	Blocks string
	// AvoidBuggyIPs mirrors spec.avoidBuggyIPs, for counting.
	AvoidBuggyIPs bool
	// L2 says whether the pool's addresses are announced with ARP and NDP (the default).
	L2 bool
	// Interfaces are the compiled spec.announce.l2.interfaces.
	Interfaces []*regexp.Regexp
	// Announcers selects the nodes that may announce (spec.announce.l2.nodeSelector); nil:
	// every node.
	Announcers labels.Selector
}

// Config is every pool's State and the pools the allocator uses.
type Config struct {
	States map[string]*State
	// Pools are the valid, enabled pools that own at least one address.
	Pools []allocator.Pool
}

// Parse validates every pool and resolves overlaps: an address listed by several pools
// belongs to the oldest of them (creation time, then name), so that creating a pool never
// takes an address from a Service that already has it.
func Parse(pools []lbv1.LBPool) *Config {
	ordered := slices.Clone(pools)
	slices.SortFunc(ordered, func(x, y lbv1.LBPool) int {
		return cmp.Or(x.CreationTimestamp.Compare(y.CreationTimestamp.Time), strings.Compare(x.Name, y.Name))
	})
	cfg := &Config{States: make(map[string]*State, len(pools))}
	var taken netipx.IPSetBuilder
	type owned struct {
		name string
		set  *netipx.IPSet
	}
	var older []owned
	for i := range ordered {
		p := &ordered[i]
		st := &State{Disabled: p.Spec.Disabled, AvoidBuggyIPs: p.Spec.AvoidBuggyIPs, Blocks: BlocksText(p.Spec.Blocks), L2: announcesL2(&p.Spec)}
		cfg.States[p.Name] = st
		all, err := Blocks(p.Spec.Blocks)
		var svcSel, nsSel labels.Selector
		if err == nil {
			svcSel, nsSel, st.Interfaces, st.Announcers, err = selectors(&p.Spec)
		}
		if err != nil {
			st.Err = err
			continue
		}
		for _, o := range older {
			if o.set.Overlaps(all) {
				var b netipx.IPSetBuilder
				b.AddSet(all)
				b.Intersect(o.set)
				both, _ := b.IPSet()
				st.Overlaps = append(st.Overlaps, fmt.Sprintf("%s (%s)", o.name, setText(both)))
			}
		}
		var own netipx.IPSetBuilder
		own.AddSet(all)
		cur, _ := taken.IPSet()
		own.RemoveSet(cur)
		st.Addresses, _ = own.IPSet()
		taken.AddSet(all)
		older = append(older, owned{p.Name, all})

		if p.Spec.Disabled || len(st.Addresses.Ranges()) == 0 {
			continue
		}
		cfg.Pools = append(cfg.Pools, allocator.Pool{
			Name:              p.Name,
			Addresses:         st.Addresses,
			AutoAssign:        p.Spec.AutoAssign == nil || *p.Spec.AutoAssign,
			AvoidBuggyIPs:     p.Spec.AvoidBuggyIPs,
			Priority:          p.Spec.Priority,
			ServiceSelector:   svcSel,
			NamespaceSelector: nsSel,
		})
	}
	return cfg
}

// Blocks parses a pool's blocks into one set. It repeats the CRD's CEL rules, for objects
// that were stored before a rule existed.
func Blocks(blocks []lbv1.IPBlock) (*netipx.IPSet, error) {
	if len(blocks) == 0 {
		return nil, errors.New("the pool has no blocks")
	}
	var b netipx.IPSetBuilder
	for i, blk := range blocks {
		r, err := parseBlock(blk)
		if err != nil {
			return nil, fmt.Errorf("blocks[%d]: %w", i, err)
		}
		b.AddRange(r)
	}
	return b.IPSet()
}

func parseBlock(blk lbv1.IPBlock) (netipx.IPRange, error) {
	if blk.CIDR != "" {
		if blk.Start != "" || blk.Stop != "" {
			return netipx.IPRange{}, errors.New("a block is either a cidr or a start/stop range")
		}
		p, err := netip.ParsePrefix(blk.CIDR)
		if err != nil {
			return netipx.IPRange{}, fmt.Errorf("cidr %q: %w", blk.CIDR, err)
		}
		if p.Masked() != p {
			return netipx.IPRange{}, fmt.Errorf("cidr %s has host bits set; the network is %s", p, p.Masked())
		}
		return netipx.RangeOfPrefix(p), nil
	}
	start, err := netip.ParseAddr(blk.Start)
	if err != nil {
		return netipx.IPRange{}, fmt.Errorf("start %q: %w", blk.Start, err)
	}
	stop, err := netip.ParseAddr(blk.Stop)
	if err != nil {
		return netipx.IPRange{}, fmt.Errorf("stop %q: %w", blk.Stop, err)
	}
	switch {
	case start.Zone() != "" || stop.Zone() != "":
		return netipx.IPRange{}, errors.New("addresses with a zone are not pool addresses")
	case start.Is4() != stop.Is4() || start.Is4In6() || stop.Is4In6():
		return netipx.IPRange{}, errors.New("start and stop must be of the same IP family")
	case start.Compare(stop) > 0:
		return netipx.IPRange{}, errors.New("start must not be greater than stop")
	}
	return netipx.IPRangeFrom(start, stop), nil
}

func selectors(spec *lbv1.LBPoolSpec) (svc, ns labels.Selector, ifaces []*regexp.Regexp, nodes labels.Selector, err error) {
	if svc, err = Selector(spec.ServiceSelector); err != nil {
		return nil, nil, nil, nil, fmt.Errorf("serviceSelector: %w", err)
	}
	if ns, err = Selector(spec.NamespaceSelector); err != nil {
		return nil, nil, nil, nil, fmt.Errorf("namespaceSelector: %w", err)
	}
	if spec.Announce == nil || spec.Announce.L2 == nil {
		return svc, ns, nil, nil, nil
	}
	if nodes, err = Selector(spec.Announce.L2.NodeSelector); err != nil {
		return nil, nil, nil, nil, fmt.Errorf("announce.l2.nodeSelector: %w", err)
	}
	for i, expr := range spec.Announce.L2.Interfaces {
		re, err := regexp.Compile("^(?:" + expr + ")$")
		if err != nil {
			return nil, nil, nil, nil, fmt.Errorf("announce.l2.interfaces[%d]: %w", i, err)
		}
		ifaces = append(ifaces, re)
	}
	return svc, ns, ifaces, nodes, nil
}

// announcesL2 reads spec.announce.l2.enabled: on unless turned off.
func announcesL2(spec *lbv1.LBPoolSpec) bool {
	return spec.Announce == nil || spec.Announce.L2 == nil || spec.Announce.L2.Enabled == nil || *spec.Announce.L2.Enabled
}

// Selector converts a selector; nil (or empty) selects everything and returns nil.
func Selector(s *lbv1.LabelSelector) (labels.Selector, error) {
	if s == nil || (len(s.MatchLabels) == 0 && len(s.MatchExpressions) == 0) {
		return nil, nil
	}
	sel, err := metav1.LabelSelectorAsSelector(s.AsMeta())
	if err != nil {
		return nil, fmt.Errorf("invalid selector: %w", err)
	}
	return sel, nil
}

// BlocksText renders blocks as "192.0.2.0/24,192.0.2.100-192.0.2.110".
func BlocksText(blocks []lbv1.IPBlock) string {
	parts := make([]string, 0, len(blocks))
	for _, b := range blocks {
		if b.CIDR != "" {
			parts = append(parts, b.CIDR)
		} else {
			parts = append(parts, b.Start+"-"+b.Stop)
		}
	}
	return strings.Join(parts, ",")
}

func setText(s *netipx.IPSet) string {
	var parts []string
	for _, p := range s.Prefixes() {
		parts = append(parts, p.String())
	}
	return strings.Join(parts, ",")
}
