package distribution

import (
	"path/filepath"
	"slices"
	"testing"

	"github.com/operator-framework/api/pkg/manifests"
	operatorsv1alpha1 "github.com/operator-framework/api/pkg/operators/v1alpha1"
	"github.com/operator-framework/api/pkg/validation"
	interfaces "github.com/operator-framework/api/pkg/validation/interfaces"

	"github.com/portico-dev/portico/test/harness/testenv"
)

// The OLM bundle (make bundle) passes operator-framework/api's default bundle validators and
// the OperatorHub, capabilities, categories and good practices suites, without a warning.
func TestBundleValidates(t *testing.T) {
	bundle, err := manifests.GetBundleFromDir(filepath.Join(testenv.Root(), "bundle"))
	if err != nil {
		t.Fatal(err)
	}
	if bundle.CSV == nil || len(bundle.V1CRDs) != 4 {
		t.Fatalf("bundle: CSV %v, %d CRDs; want a CSV and the 4 CRDs", bundle.CSV != nil, len(bundle.V1CRDs))
	}
	validators := slices.Concat(validation.DefaultBundleValidators, interfaces.Validators{validation.OperatorHubV2Validator,
		validation.StandardCapabilitiesValidator, validation.StandardCategoriesValidator, validation.GoodPracticesValidator})
	// The OperatorHub suite checks the APIs the bundle uses against this Kubernetes version:
	// the newest one Portico supports.
	for _, r := range validators.Validate(bundle, map[string]string{"k8s-version": "1.37"}) {
		for _, e := range r.Errors {
			t.Errorf("%s: error: %v", r.Name, e)
		}
		for _, w := range r.Warnings {
			t.Errorf("%s: warning: %v", r.Name, w)
		}
	}
	// What OLM installs: the operator's Deployment, and permissions for the operator's and
	// the agents' ServiceAccounts.
	spec := bundle.CSV.Spec.InstallStrategy.StrategySpec
	if len(spec.DeploymentSpecs) != 1 || spec.DeploymentSpecs[0].Name != "portico-operator" {
		t.Errorf("deployments: %+v", spec.DeploymentSpecs)
	}
	for _, sa := range []string{"portico-operator", "portico-agent"} {
		if !slices.ContainsFunc(spec.ClusterPermissions, func(p operatorsv1alpha1.StrategyDeploymentPermissions) bool { return p.ServiceAccountName == sa }) ||
			!slices.ContainsFunc(spec.Permissions, func(p operatorsv1alpha1.StrategyDeploymentPermissions) bool { return p.ServiceAccountName == sa }) {
			t.Errorf("no cluster and namespaced permissions for %s", sa)
		}
	}
}
