package distribution

import (
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"

	"github.com/portico-dev/portico/internal/controller/agentds"
	"github.com/portico-dev/portico/internal/yamldocs"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// config/prometheus finds what it monitors: the ServiceMonitor selects the operator's metrics
// Service by its labels and port, that Service selects the operator's pods and their metrics
// port, and the PodMonitor selects the agents' pods and their metrics port.
func TestPrometheusMonitorsFindTheirTargets(t *testing.T) {
	out, err := exec.Command("kubectl", "kustomize", filepath.Join(testenv.Root(), "config", "prometheus")).Output()
	if err != nil {
		t.Fatalf("kubectl kustomize config/prometheus: %v", err)
	}
	var svc corev1.Service
	var monitor, podMonitor struct {
		Metadata struct{ Namespace string }
		Spec     struct {
			Selector struct {
				MatchLabels map[string]string `json:"matchLabels"`
			}
			Endpoints           []struct{ Port string } `json:"endpoints"`
			PodMetricsEndpoints []struct{ Port string } `json:"podMetricsEndpoints"`
		}
	}
	for _, doc := range strings.Split(string(out), "\n---\n") {
		var kind struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &kind); err != nil {
			t.Fatal(err)
		}
		into := map[string]any{"Service": &svc, "ServiceMonitor": &monitor, "PodMonitor": &podMonitor}[kind.Kind]
		if into == nil {
			t.Fatalf("unexpected %s in config/prometheus", kind.Kind)
		}
		if err := yaml.Unmarshal([]byte(doc), into); err != nil {
			t.Fatal(err)
		}
	}
	if !labels.SelectorFromSet(monitor.Spec.Selector.MatchLabels).Matches(labels.Set(svc.Labels)) || len(monitor.Spec.Endpoints) != 1 ||
		!slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == monitor.Spec.Endpoints[0].Port }) {
		t.Errorf("the ServiceMonitor does not select the metrics Service %v by label and port", svc.Labels)
	}

	// The operator's pods, as installed.
	objs, err := yamldocs.ReadFile(filepath.Join(testenv.Root(), "dist", "install.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var operator *appsv1.Deployment
	for _, u := range objs {
		if u.GetKind() == "Deployment" {
			operator = &appsv1.Deployment{}
			if err := yamldocs.Convert(u, operator); err != nil {
				t.Fatal(err)
			}
		}
	}
	if operator == nil || svc.Namespace != operator.Namespace || monitor.Metadata.Namespace != operator.Namespace {
		t.Fatalf("the metrics Service and ServiceMonitor are not in the operator's namespace")
	}
	if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(operator.Spec.Template.Labels)) ||
		!hasPort(operator.Spec.Template.Spec, svc.Spec.Ports[0].TargetPort.StrVal) {
		t.Errorf("the metrics Service does not reach the operator's pods (%v) on a named port", operator.Spec.Template.Labels)
	}
	agents := (&agentds.Reconciler{Config: agentds.Config{Name: "portico-agent", Namespace: operator.Namespace}}).DaemonSet()
	if !labels.SelectorFromSet(podMonitor.Spec.Selector.MatchLabels).Matches(labels.Set(agents.Spec.Template.Labels)) ||
		len(podMonitor.Spec.PodMetricsEndpoints) != 1 || !hasPort(agents.Spec.Template.Spec, podMonitor.Spec.PodMetricsEndpoints[0].Port) {
		t.Errorf("the PodMonitor does not select the agents' pods (%v) and their metrics port", agents.Spec.Template.Labels)
	}
}

func hasPort(pod corev1.PodSpec, name string) bool {
	for _, c := range pod.Containers {
		if slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.Name == name }) {
			return true
		}
	}
	return false
}
