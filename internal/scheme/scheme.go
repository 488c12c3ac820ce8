// Package scheme is the one runtime scheme the operator, the agent and porticoctl read and
// write objects with: Kubernetes' built-in types and Portico's (lb.portico.dev).
package scheme

import (
	"fmt"

	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
)

// New returns a scheme with the built-in types and Portico's.
func New() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		return nil, fmt.Errorf("add client-go types: %w", err)
	}
	if err := lbv1.AddToScheme(s); err != nil {
		return nil, fmt.Errorf("add lb.portico.dev types: %w", err)
	}
	return s, nil
}
