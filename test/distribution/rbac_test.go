package distribution

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	appsv1 "k8s.io/api/apps/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/agent"
	"github.com/portico-dev/portico/internal/controller/agentds"
	"github.com/portico-dev/portico/internal/controller/servicelb"
	"github.com/portico-dev/portico/internal/loadbalancer/lbtest"
	"github.com/portico-dev/portico/internal/operator"
	"github.com/portico-dev/portico/internal/yamldocs"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// The RBAC dist/install.yaml grants is enough for what Portico does: the operator and an
// agent run as their ServiceAccounts (impersonated) against a real API server with the
// install's roles applied, and everything they write appears: the Service's address, pool
// and policy status, leader election, the agents' DaemonSet and Lease, the NodeAgent, and the
// policy Programmed from it. (The test suites otherwise run as an administrator, where a
// missing verb would go unnoticed.)
func TestInstalledRBACIsEnough(t *testing.T) {
	testenv.NeedAPI(t)
	objs, err := yamldocs.ReadFile(filepath.Join(testenv.Root(), "dist", "install.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	env := testenv.StartFor(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	var ns string
	for _, u := range objs {
		if u.GetKind() == "Deployment" {
			continue // the operator runs in this test instead
		}
		if u.GetKind() == "Namespace" {
			ns = u.GetName()
		}
		if err := env.Client.Patch(ctx, u, client.Apply, client.FieldOwner("install"), client.ForceOwnership); err != nil {
			t.Fatalf("apply %s %s: %v", u.GetKind(), u.GetName(), err)
		}
	}
	as := func(account string) *rest.Config {
		cfg := rest.CopyConfig(env.Config)
		cfg.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:" + ns + ":" + account,
			Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"}}
		return cfg
	}
	run := func(mgr ctrl.Manager, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- mgr.Start(ctx) }()
		t.Cleanup(func() { cancel(); <-done })
	}
	run(operator.NewManager(as("portico-operator"), operator.Options{MetricsAddr: "0", ProbeAddr: "0", SeveralPerProcess: true,
		Class: servicelb.Class{Name: lbv1.LoadBalancerClass, ClaimClassless: true}, AgentNamespace: ns,
		LeaderElect: true, LeaderNamespace: ns, LeaseDuration: 4 * time.Second, RenewDeadline: 3 * time.Second, LeaderRetryPeriod: time.Second,
		Agents: &agentds.Config{Namespace: ns, Name: "portico-agent", Image: "portico-agent:test", Version: "test", ServiceAccount: "portico-agent"}}))
	run(agent.NewManager(as("portico-agent"), &lbtest.Recorder{}, agent.Options{NodeName: "node-1", MetricsAddr: "0", ProbeAddr: "0", SeveralPerProcess: true,
		Registry: prometheus.NewRegistry(), LeaseNamespace: ns, Version: "test"}))

	// What users create, as an administrator.
	for _, o := range []client.Object{
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}},
		&lbv1.LBPool{ObjectMeta: metav1.ObjectMeta{Name: "rbac"}, Spec: lbv1.LBPoolSpec{Blocks: []lbv1.IPBlock{{CIDR: "192.0.2.0/30"}}}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web"}, Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer,
			Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}}},
		&discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
			AddressType: discoveryv1.AddressTypeIPv4, Ports: []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(int32(8080))}},
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.244.1.5"}}}},
		&lbv1.ServicePolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web"}, Spec: lbv1.ServicePolicySpec{TargetRefs: []lbv1.ServiceTargetReference{{Name: "web"}}}},
	} {
		if err := env.Client.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	wait := func(what string, ok func() error) {
		t.Helper()
		var err error
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			if err = ok(); err == nil {
				return
			}
		}
		t.Fatalf("%s: %v", what, err)
	}
	get := func(key client.ObjectKey, obj client.Object) error { return env.Client.Get(ctx, key, obj) }
	wait("the Service's address (operator: services/status)", func() error {
		var s corev1.Service
		if err := get(client.ObjectKey{Namespace: "default", Name: "web"}, &s); err != nil || len(s.Status.LoadBalancer.Ingress) == 0 {
			return fmt.Errorf("status %+v, %v", s.Status, err)
		}
		return nil
	})
	wait("the pool's status (operator: lbpools/status)", func() error {
		var p lbv1.LBPool
		if err := get(client.ObjectKey{Name: "rbac"}, &p); err != nil || p.Status.IPv4 == nil || p.Status.IPv4.Allocated != 1 {
			return fmt.Errorf("status %+v, %v", p.Status, err)
		}
		return nil
	})
	wait("the agents' DaemonSet (operator: daemonsets)", func() error {
		return get(client.ObjectKey{Namespace: ns, Name: "portico-agent"}, &appsv1.DaemonSet{})
	})
	wait("leader election (operator: leases)", func() error {
		return get(client.ObjectKey{Namespace: ns, Name: "portico-operator.lb.portico.dev"}, &coordinationv1.Lease{})
	})
	wait("the agent's Lease (agent: leases)", func() error {
		return get(client.ObjectKey{Namespace: ns, Name: lbv1.AgentLeasePrefix + "node-1"}, &coordinationv1.Lease{})
	})
	wait("the NodeAgent (agent: nodeagents, nodeagents/status)", func() error {
		var a lbv1.NodeAgent
		if err := get(client.ObjectKey{Name: "node-1"}, &a); err != nil || !meta.IsStatusConditionTrue(a.Status.Conditions, lbv1.ConditionReady) || a.Status.Services == 0 {
			return fmt.Errorf("status %+v, %v", a.Status, err)
		}
		return nil
	})
	wait("the policy Programmed (operator: servicepolicies/status, nodeagents)", func() error {
		var p lbv1.ServicePolicy
		if err := get(client.ObjectKey{Namespace: "default", Name: "web"}, &p); err != nil || !meta.IsStatusConditionTrue(p.Status.Conditions, lbv1.ConditionProgrammed) {
			return fmt.Errorf("status %+v, %v", p.Status, err)
		}
		return nil
	})
	wait("Events from both (events)", func() error {
		var events corev1.EventList
		if err := env.Client.List(ctx, &events); err != nil {
			return err
		}
		from := map[string]bool{}
		for _, e := range events.Items {
			from[e.Source.Component] = true
		}
		if !from["portico"] {
			return fmt.Errorf("no Event from the operator: %v", from)
		}
		return nil
	})
}
