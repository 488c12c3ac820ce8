package distribution

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/operator-framework/api/pkg/manifests"
	operatorsv1alpha1 "github.com/operator-framework/api/pkg/operators/v1alpha1"
	"github.com/operator-framework/api/pkg/validation"
	interfaces "github.com/operator-framework/api/pkg/validation/interfaces"

	"github.com/portico-dev/portico/test/testenv"
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
	// The OperatorHub suite checks the APIs the bundle uses against this Kubernetes version.
	for _, r := range validators.Validate(bundle, map[string]string{"k8s-version": "1.32"}) {
		for _, e := range r.Errors {
			t.Errorf("%s: error: %v", r.Name, e)
		}
		for _, w := range r.Warnings {
			if knownFalsePositive(w.Error()) {
				continue
			}
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

// knownFalsePositive is the one warning of operator-framework/api v0.31.0 that is wrong
// (operator-framework/api#378, fixed upstream by #496, not yet in a release that fits our
// Kubernetes libraries): RBAC rules carry no API version, so a rule for
// discovery.k8s.io/endpointslices is taken for the v1beta1 API removed in 1.25. Portico reads
// discovery.k8s.io/v1. Any other removed-API warning, or this one for another resource,
// still fails.
func knownFalsePositive(warning string) bool {
	const removed = "this bundle is using APIs which were deprecated and removed in v1.25"
	if !strings.Contains(warning, removed) {
		return false
	}
	_, apis, _ := strings.Cut(warning, "Migrate the API(s) for ")
	return strings.HasPrefix(apis, "endpointslices: ") && strings.Count(apis, ": (") == 1
}
