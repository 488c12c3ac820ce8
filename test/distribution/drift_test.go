package distribution

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// CRDs come in a sync wave before the custom resources; the samples' custom resources skip
// their dry run while the CRDs are missing.
func TestSyncWaves(t *testing.T) {
	for _, c := range []struct {
		dir   string
		check func(kind, group string, annotations map[string]string) string
	}{
		{"config/default", func(kind, _ string, a map[string]string) string {
			if kind == "CustomResourceDefinition" && a["argocd.argoproj.io/sync-wave"] != "-1" {
				return "a CRD not in sync wave -1"
			}
			return ""
		}},
		{"config/samples", func(_, group string, a map[string]string) string {
			if group == lbv1.GroupVersion.Group && a["argocd.argoproj.io/sync-options"] != "SkipDryRunOnMissingResource=true" {
				return "a custom resource that would fail its dry run before its CRD exists"
			}
			if strings.HasPrefix(a["argocd.argoproj.io/sync-wave"], "-") {
				return "a sample in a wave before the CRDs"
			}
			return ""
		}},
	} {
		out, err := exec.Command("kubectl", "kustomize", filepath.Join(testenv.Root(), c.dir)).Output()
		if err != nil {
			t.Fatalf("kubectl kustomize %s: %v", c.dir, err)
		}
		n := 0
		for _, doc := range strings.Split(string(out), "\n---\n") {
			var o struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
				Metadata   struct {
					Name        string            `json:"name"`
					Annotations map[string]string `json:"annotations"`
				} `json:"metadata"`
			}
			if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
				t.Fatal(err)
			}
			group, _, _ := strings.Cut(o.APIVersion, "/")
			if problem := c.check(o.Kind, group, o.Metadata.Annotations); problem != "" {
				t.Errorf("%s: %s %s is %s", c.dir, o.Kind, o.Metadata.Name, problem)
			}
			n++
		}
		if n < 4 {
			t.Fatalf("%s rendered %d objects", c.dir, n)
		}
	}
}

// Argo CD keeps an application in sync when what Git says is what the cluster has: after the
// samples are applied (server-side) and the operator has reconciled them, a server-side diff
// of the samples shows nothing: the operator writes status, never what users declare.
func TestSamplesDoNotDriftOnceReconciled(t *testing.T) {
	env := testenv.WithOperator(t)
	ctx := context.Background()

	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := lab.WriteKubeconfig(env.Config, env.Config.Host, kubeconfig); err != nil {
		t.Fatal(err)
	}
	samples := filepath.Join(testenv.Root(), "config", "samples")
	kubectl := func(args ...string) (string, error) {
		out, err := exec.Command("kubectl", append([]string{"--kubeconfig", kubeconfig}, args...)...).CombinedOutput()
		return string(out), err
	}
	if out, err := kubectl("apply", "--server-side", "--field-manager=argocd-controller", "-k", samples); err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	// Reconciled: the pool is Ready, each policy has its Accepted condition, the Service
	// has its address.
	for t0 := time.Now(); ; time.Sleep(100 * time.Millisecond) {
		var pool lbv1.LBPool
		var sp lbv1.ServicePolicyList
		var l7 lbv1.L7PolicyList
		err := errors.Join(env.Client.Get(ctx, client.ObjectKey{Name: "default"}, &pool), env.Client.List(ctx, &sp), env.Client.List(ctx, &l7))
		reconciled := err == nil && meta.IsStatusConditionTrue(pool.Status.Conditions, lbv1.ConditionReady) && len(sp.Items) > 0 && len(l7.Items) > 0
		var statuses []lbv1.PolicyStatus
		for _, p := range sp.Items {
			statuses = append(statuses, p.Status)
		}
		for _, p := range l7.Items {
			statuses = append(statuses, p.Status)
		}
		for _, st := range statuses {
			reconciled = reconciled && meta.FindStatusCondition(st.Conditions, lbv1.ConditionAccepted) != nil
		}
		if reconciled {
			break
		}
		if time.Since(t0) > 30*time.Second {
			t.Fatalf("the operator did not reconcile the samples: %v", err)
		}
	}
	if out, err := kubectl("diff", "--server-side", "--field-manager=argocd-controller", "-k", samples); err != nil {
		t.Fatalf("the samples drifted once reconciled (%v):\n%s", err, out)
	}
}
