package agent

import (
	"fmt"
	"net/netip"
	"time"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/loadbalancer"
)

// settings turns the ServicePolicy that applies to a Service into what the datapath does for
// it, and says what this node cannot do as asked (it then does the nearest thing it can).
func settings(spec *lbv1.ServicePolicySpec, maglevSize uint32) (loadbalancer.Settings, []string) {
	var s loadbalancer.Settings
	var problems []string
	if lb := spec.LoadBalancing; lb != nil && lb.Algorithm == lbv1.AlgorithmMaglev {
		s.Balancing = loadbalancer.Maglev
		if lb.MaglevTableSize != 0 && uint32(lb.MaglevTableSize) != maglevSize {
			problems = append(problems, fmt.Sprintf("maglevTableSize %d: this node's tables have %d entries (agent flag --maglev-table-size)", lb.MaglevTableSize, maglevSize))
		}
	}
	if spec.SourceRanges != nil {
		s.SourceRanges = []netip.Prefix{}
		for _, r := range spec.SourceRanges {
			p, err := netip.ParsePrefix(r)
			if err != nil {
				problems = append(problems, fmt.Sprintf("sourceRange %q is not a CIDR", r))
				continue
			}
			s.SourceRanges = append(s.SourceRanges, p.Masked())
		}
	}
	if a := spec.SessionAffinity; a != nil {
		d := time.Duration(0)
		if a.Type == "ClientIP" {
			d = 10800 * time.Second
			if a.TimeoutSeconds != nil {
				d = time.Duration(*a.TimeoutSeconds) * time.Second
			}
		}
		s.Affinity = &d
	}
	if spec.Acceleration == "Native" {
		problems = append(problems, "acceleration Native (XDP) is not available yet; translating at TC")
	}
	return s, problems
}
