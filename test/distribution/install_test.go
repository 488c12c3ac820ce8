package distribution

import (
	"context"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/portico-dev/portico/internal/yamldocs"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// dist/install.yaml is accepted by a real API server: every object, applied server-side as a
// dry run (the namespace is created first, as the real apply would have by then).
func TestInstallManifestApplies(t *testing.T) {
	testenv.NeedAPI(t)
	objs, err := yamldocs.ReadFile(filepath.Join(testenv.Root(), "dist", "install.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, u := range objs {
		kinds[u.GetKind()]++
	}
	for _, want := range []string{"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount", "Deployment"} {
		if kinds[want] == 0 {
			t.Errorf("no %s in dist/install.yaml (%v)", want, kinds)
		}
	}
	env := testenv.StartFor(t)
	ctx := context.Background()
	for _, u := range objs {
		if u.GetKind() == "Namespace" {
			if err := env.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: u.GetName()}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, u := range objs {
		err := env.Client.Patch(ctx, u, client.Apply, client.DryRunAll, client.FieldOwner("install-test"), client.ForceOwnership)
		if err != nil {
			t.Errorf("%s %s/%s: %v", u.GetKind(), u.GetNamespace(), u.GetName(), err)
		}
	}
}
