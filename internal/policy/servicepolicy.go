package policy

import (
	"errors"
	"fmt"

	"k8s.io/apimachinery/pkg/labels"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/poolconfig"
)

// ErrUnsupported marks a policy that asks what Portico cannot do: it is rejected rather
// than applied differently.
var ErrUnsupported = errors.New("not supported")

// FromServicePolicy returns a ServicePolicy's attachment, or why the policy is rejected: an
// invalid selector, or a forwarding mode the datapath does not have (ErrUnsupported). A
// rejected policy applies to nothing, for the operator and the agents alike.
func FromServicePolicy(p *lbv1.ServicePolicy) (Policy, error) {
	sel, err := poolconfig.Selector(p.Spec.Selector)
	if err == nil && sel == nil && p.Spec.Selector != nil {
		sel = labels.Everything() // an empty selector selects every Service
	}
	if err == nil && p.Spec.ForwardingMode == lbv1.ForwardingDSR {
		err = fmt.Errorf("forwardingMode DSR is %w by Portico's datapath yet (it forwards with SNAT); remove it or use SNAT", ErrUnsupported)
	}
	targets := make([]Target, len(p.Spec.TargetRefs))
	for i, r := range p.Spec.TargetRefs {
		targets[i] = Target{Service: r.Name}
	}
	return Policy{Name: p.Name, Created: p.CreationTimestamp.Time, Targets: targets, Selector: sel}, err
}

// FromL7Policy returns an L7Policy's attachment: the Service ports it names (L7Policies
// select by targetRefs only, and resolve per port).
func FromL7Policy(p *lbv1.L7Policy) Policy {
	targets := make([]Target, len(p.Spec.TargetRefs))
	for i, t := range p.Spec.TargetRefs {
		targets[i] = Target{Service: t.Name, Port: t.SectionName}
	}
	return Policy{Name: p.Name, Created: p.CreationTimestamp.Time, Targets: targets}
}
