package operator_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/operator"
	"github.com/portico-dev/portico/test/harness/wait"
)

func TestPolicyStatusSaysWhatApplies(t *testing.T) {
	startOperator(t, operator.Options{})
	f := newFixture(t)
	f.service("web", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeClusterIP
		s.Labels = map[string]string{"tier": "front"}
		s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "grpc", Port: 9000})
	})
	create := func(o client.Object) {
		t.Helper()
		if err := env.Client.Create(context.Background(), o); err != nil {
			t.Fatal(err)
		}
	}
	meta0 := func(name string) metav1.ObjectMeta { return metav1.ObjectMeta{Namespace: f.ns, Name: name} }
	create(&lbv1.ServicePolicy{ObjectMeta: meta0("by-name"), Spec: lbv1.ServicePolicySpec{TargetRefs: []lbv1.ServiceTargetReference{{Name: "web"}}}})
	time.Sleep(1100 * time.Millisecond) // creation timestamps have one-second resolution
	create(&lbv1.ServicePolicy{ObjectMeta: meta0("by-label"), Spec: lbv1.ServicePolicySpec{
		Selector: &lbv1.LabelSelector{MatchLabels: map[string]lbv1.LabelValue{"tier": "front"}}}})
	create(&lbv1.ServicePolicy{ObjectMeta: meta0("dangling"), Spec: lbv1.ServicePolicySpec{TargetRefs: []lbv1.ServiceTargetReference{{Name: "nope"}}}})
	create(&lbv1.ServicePolicy{ObjectMeta: meta0("direct"), Spec: lbv1.ServicePolicySpec{TargetRefs: []lbv1.ServiceTargetReference{{Name: "web"}},
		ForwardingMode: lbv1.ForwardingDSR}})
	create(&lbv1.L7Policy{ObjectMeta: meta0("grpc"), Spec: lbv1.L7PolicySpec{Protocol: "GRPC",
		TargetRefs: []lbv1.L7TargetReference{{ServiceTargetReference: lbv1.ServiceTargetReference{Name: "web"}, SectionName: "grpc"}}}})

	waitPolicy := func(obj client.Object, status func() *lbv1.PolicyStatus, accepted metav1.ConditionStatus, reason, conflict, text string, attached int32) {
		t.Helper()
		wait.For(t, "", func() error {
			if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(obj), obj); err != nil {
				return err
			}
			st := status()
			a := meta.FindStatusCondition(st.Conditions, lbv1.ConditionAccepted)
			c := meta.FindStatusCondition(st.Conditions, lbv1.ConditionConflict)
			if a == nil || c == nil || a.Status != accepted || a.Reason != reason || string(c.Status) != conflict || st.AttachedServices != attached ||
				!strings.Contains(a.Message+" | "+c.Message, text) || a.ObservedGeneration != obj.GetGeneration() {
				return fmt.Errorf("%s: status %+v", obj.GetName(), st)
			}
			return nil
		})
	}
	byName, byLabel, dangling := &lbv1.ServicePolicy{ObjectMeta: meta0("by-name")}, &lbv1.ServicePolicy{ObjectMeta: meta0("by-label")}, &lbv1.ServicePolicy{ObjectMeta: meta0("dangling")}
	grpc := &lbv1.L7Policy{ObjectMeta: meta0("grpc")}
	waitPolicy(byName, func() *lbv1.PolicyStatus { return &byName.Status }, metav1.ConditionTrue, "Accepted", "False", "applies to web", 1)
	waitPolicy(byLabel, func() *lbv1.PolicyStatus { return &byLabel.Status }, metav1.ConditionTrue, "Accepted", "True", "web (by by-name, which names it in targetRefs)", 0)
	waitPolicy(dangling, func() *lbv1.PolicyStatus { return &dangling.Status }, metav1.ConditionFalse, "TargetNotFound", "False", "not found: Service nope", 0)
	waitPolicy(grpc, func() *lbv1.PolicyStatus { return &grpc.Status }, metav1.ConditionTrue, "Accepted", "False", "applies to web/grpc", 1)
	direct := &lbv1.ServicePolicy{ObjectMeta: meta0("direct")}
	waitPolicy(direct, func() *lbv1.PolicyStatus { return &direct.Status }, metav1.ConditionFalse, "Unsupported", "False", "forwardingMode DSR is not supported", 0)
	f.waitEvent(f.ns, "dangling", "TargetNotFound", "Service nope")

	// Deleting the winner hands the Service to the policy that lost it.
	if err := env.Client.Delete(context.Background(), byName); err != nil {
		t.Fatal(err)
	}
	waitPolicy(byLabel, func() *lbv1.PolicyStatus { return &byLabel.Status }, metav1.ConditionTrue, "Accepted", "False", "applies to web", 1)
}

// A ServicePolicy is Programmed when every node with a ready agent reports its current
// generation in force (the agents write NodeAgents; the agent's side is tested in
// internal/agent and test/e2e).
func TestPolicyProgrammedFollowsNodeAgents(t *testing.T) {
	startOperator(t, operator.Options{})
	f := newFixture(t)
	f.service("web", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeClusterIP })
	ctx := context.Background()
	pol := &lbv1.ServicePolicy{ObjectMeta: metav1.ObjectMeta{Namespace: f.ns, Name: "web"}, Spec: lbv1.ServicePolicySpec{
		TargetRefs: []lbv1.ServiceTargetReference{{Name: "web"}}}}
	if err := env.Client.Create(ctx, pol); err != nil {
		t.Fatal(err)
	}
	// report makes a node's agent ready with the given generations of the policy in force.
	report := func(node string, ready bool, generations ...int64) {
		t.Helper()
		status := metav1.ConditionFalse
		if ready {
			status = metav1.ConditionTrue
		}
		st := lbv1.NodeAgentStatus{Conditions: []metav1.Condition{{Type: lbv1.ConditionReady, Status: status, Reason: "Test", LastTransitionTime: metav1.Now()}}}
		for _, g := range generations {
			st.Policies = append(st.Policies, lbv1.ProgrammedPolicy{Kind: "ServicePolicy", Namespace: f.ns, Name: "web", Generation: g})
		}
		writeNodeAgent(t, node, st)
	}
	expect := func(want metav1.ConditionStatus, reason, text string, nodes int32) {
		t.Helper()
		wait.For(t, "", func() error {
			if err := env.Client.Get(ctx, client.ObjectKeyFromObject(pol), pol); err != nil {
				return err
			}
			c := meta.FindStatusCondition(pol.Status.Conditions, lbv1.ConditionProgrammed)
			if c == nil || c.Status != want || c.Reason != reason || !strings.Contains(c.Message, text) || pol.Status.ProgrammedNodes != nodes ||
				c.ObservedGeneration != pol.Generation {
				return fmt.Errorf("status %+v", pol.Status)
			}
			return nil
		})
	}
	name := func(s string) string { return f.ns + "-" + s } // NodeAgents are cluster-wide
	report(name("a"), true, 1)
	report(name("b"), true)
	report(name("down"), false)
	expect(metav1.ConditionFalse, "Pending", "programmed on 1 of 2 nodes with a ready agent; not yet on "+name("b"), 1)
	report(name("b"), true, 1)
	expect(metav1.ConditionTrue, "Programmed", "programmed on all 2 nodes", 2)

	// A new generation is programmed nowhere until the agents say so.
	pol.Spec.SourceRanges = []string{"192.0.2.0/24"}
	if err := env.Client.Update(ctx, pol); err != nil {
		t.Fatal(err)
	}
	expect(metav1.ConditionFalse, "Pending", "programmed on 0 of 2", 0)
	report(name("a"), true, 2)
	report(name("b"), true, 2)
	expect(metav1.ConditionTrue, "Programmed", "programmed on all 2 nodes", 2)
}

// An L7Policy is Programmed once every node with a ready agent reports it as an L7Policy: a
// ServicePolicy of the same name and generation does not count.
func TestL7PolicyProgrammedFollowsNodeAgents(t *testing.T) {
	startOperator(t, operator.Options{})
	f := newFixture(t)
	f.service("grpc", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeClusterIP })
	ctx := context.Background()
	pol := &lbv1.L7Policy{ObjectMeta: metav1.ObjectMeta{Namespace: f.ns, Name: "spread"}, Spec: lbv1.L7PolicySpec{
		TargetRefs: []lbv1.L7TargetReference{{ServiceTargetReference: lbv1.ServiceTargetReference{Name: "grpc"}}}, Protocol: "GRPC"}}
	if err := env.Client.Create(ctx, pol); err != nil {
		t.Fatal(err)
	}
	node := f.ns + "-n1" // NodeAgents are cluster-wide
	report := func(kind string) {
		t.Helper()
		writeNodeAgent(t, node, lbv1.NodeAgentStatus{Conditions: []metav1.Condition{{Type: lbv1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Test", LastTransitionTime: metav1.Now()}},
			Policies: []lbv1.ProgrammedPolicy{{Kind: kind, Namespace: f.ns, Name: "spread", Generation: 1}}})
	}
	expect := func(want metav1.ConditionStatus, text string) {
		t.Helper()
		wait.For(t, "", func() error {
			if err := env.Client.Get(ctx, client.ObjectKeyFromObject(pol), pol); err != nil {
				return err
			}
			c := meta.FindStatusCondition(pol.Status.Conditions, lbv1.ConditionProgrammed)
			if c == nil || c.Status != want || !strings.Contains(c.Message, text) {
				return fmt.Errorf("status %+v", pol.Status)
			}
			return nil
		})
	}
	report("ServicePolicy")
	expect(metav1.ConditionFalse, "not yet on "+node)
	report("L7Policy")
	expect(metav1.ConditionTrue, "programmed on all")
}
