package policy

import (
	"k8s.io/apimachinery/pkg/labels"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/poolconfig"
)

// FromServicePolicy returns a ServicePolicy's attachment. An invalid selector is returned
// as the error, with the policy attaching through its targetRefs only.
func FromServicePolicy(p *lbv1.ServicePolicy) (Policy, error) {
	sel, err := poolconfig.Selector(p.Spec.Selector)
	if err == nil && sel == nil && p.Spec.Selector != nil {
		sel = labels.Everything() // an empty selector selects every Service
	}
	targets := make([]Target, len(p.Spec.TargetRefs))
	for i, r := range p.Spec.TargetRefs {
		targets[i] = Target{Service: r.Name}
	}
	return Policy{Name: p.Name, Created: p.CreationTimestamp.Time, Targets: targets, Selector: sel}, err
}
