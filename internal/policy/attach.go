// Package policy decides which policy applies to which Service (or Service port) when several
// target it, the way Gateway API policy attachment does: a policy that names the Service in
// targetRefs beats one that selects it by label; then the older policy wins; then the name
// that sorts first. The losers are told who won, so that their status can say so.
package policy

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/labels"
)

// Target names a Service, and for port-level policies one of its ports ("" means all).
type Target struct {
	Service string
	Port    string
}

// Policy is one policy of one kind in one namespace.
type Policy struct {
	Name    string
	Created time.Time
	// Targets are the targetRefs.
	Targets []Target
	// Selector picks Services by label; nil picks none.
	Selector labels.Selector
}

// Service is a Service in the policy's namespace.
type Service struct {
	Name   string
	Labels labels.Set
	// Ports are the port names; only port-level policies look at them.
	Ports []string
}

// Result is what one policy ends up applying to.
type Result struct {
	// Attached lists the Services (or "service/port") the policy applies to.
	Attached []string
	// Missing lists targetRefs that name no existing Service or port.
	Missing []string
	// Overridden lists what another policy won, as "web (by policy-b, which is older)".
	Overridden []string
}

type claim struct {
	policy *Policy
	direct bool
}

// Resolve decides, for every Service (with perPort, for every port), which policy applies.
func Resolve(policies []Policy, services []Service, perPort bool) map[string]*Result {
	out := make(map[string]*Result, len(policies))
	byName := make(map[string]Service, len(services))
	for _, s := range services {
		byName[s.Name] = s
	}
	claims := map[string][]claim{}
	for i := range policies {
		p := &policies[i]
		r := &Result{}
		out[p.Name] = r
		for _, t := range p.Targets {
			svc, ok := byName[t.Service]
			switch {
			case !ok:
				r.Missing = append(r.Missing, "Service "+t.Service)
				continue
			case perPort && t.Port != "" && !slices.Contains(svc.Ports, t.Port):
				r.Missing = append(r.Missing, fmt.Sprintf("port %s of Service %s", t.Port, t.Service))
				continue
			}
			for _, unit := range units(svc, t.Port, perPort) {
				claims[unit] = append(claims[unit], claim{p, true})
			}
		}
		if p.Selector == nil {
			continue
		}
		for _, svc := range services {
			if p.Selector.Matches(svc.Labels) {
				for _, unit := range units(svc, "", perPort) {
					claims[unit] = append(claims[unit], claim{p, false})
				}
			}
		}
	}
	for unit, cs := range claims {
		// A policy that names a Service and also selects it claims it once, directly.
		slices.SortFunc(cs, better)
		cs = slices.CompactFunc(cs, func(a, b claim) bool { return a.policy == b.policy })
		winner := cs[0]
		out[winner.policy.Name].Attached = append(out[winner.policy.Name].Attached, unit)
		for _, lost := range cs[1:] {
			out[lost.policy.Name].Overridden = append(out[lost.policy.Name].Overridden,
				fmt.Sprintf("%s (by %s, %s)", unit, winner.policy.Name, why(winner, lost)))
		}
	}
	for _, r := range out {
		slices.Sort(r.Attached)
		slices.Sort(r.Missing)
		slices.Sort(r.Overridden)
	}
	return out
}

// units lists what a target covers: the Service, or its ports.
func units(svc Service, port string, perPort bool) []string {
	if !perPort {
		return []string{svc.Name}
	}
	if port != "" {
		return []string{svc.Name + "/" + port}
	}
	out := make([]string, len(svc.Ports))
	for i, p := range svc.Ports {
		out[i] = svc.Name + "/" + p
	}
	return out
}

// better orders claims best first: direct, then older, then by name.
func better(a, b claim) int {
	if a.direct != b.direct {
		if a.direct {
			return -1
		}
		return 1
	}
	return cmp.Or(a.policy.Created.Compare(b.policy.Created), strings.Compare(a.policy.Name, b.policy.Name))
}

func why(winner, lost claim) string {
	switch {
	case winner.direct && !lost.direct:
		return "which names it in targetRefs"
	case !winner.policy.Created.Equal(lost.policy.Created):
		return "which is older"
	}
	return "whose name sorts first"
}
