// Package policystatus tells, on each ServicePolicy and L7Policy, what it applies to: the
// Accepted and Conflict conditions and the number of attached Services. Which policy wins a
// contested Service is decided by internal/policy; the datapath effects come from the agents.
package policystatus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/controller/statuspatch"
	"github.com/portico-dev/portico/internal/policy"
)

// Condition reasons of policies.
const (
	ReasonAccepted       = "Accepted"
	ReasonInvalid        = "Invalid"
	ReasonUnsupported    = "Unsupported"
	ReasonTargetNotFound = "TargetNotFound"
	ReasonOverridden     = "Overridden"
	ReasonNoConflict     = "NoConflict"
	ReasonProgrammed     = "Programmed"
	ReasonPending        = "Pending"
	ReasonNotAttached    = "NotAttached"
	ReasonNoAgents       = "NoAgents"
)

// entry is one policy object seen through what every kind has in common.
type entry struct {
	obj     client.Object
	status  *lbv1.PolicyStatus
	policy  policy.Policy
	invalid error
}

// Kind adapts one policy kind.
type Kind struct {
	// Name names the controller.
	Name string
	// Object is an empty object of the kind, for watches.
	Object client.Object
	// PerPort resolves conflicts per Service port rather than per Service.
	PerPort bool
	// Programmed: the node agents program the kind and report it in NodeAgents; its
	// policies get the Programmed condition.
	Programmed bool
	// APIKind is the kind as NodeAgents name it.
	APIKind string
	list    func(ctx context.Context, c client.Client, namespace string) ([]entry, error)
}

// ServicePolicies is the ServicePolicy kind.
var ServicePolicies = Kind{Name: "servicepolicy", APIKind: "ServicePolicy", Object: &lbv1.ServicePolicy{}, Programmed: true, list: func(ctx context.Context, c client.Client, ns string) ([]entry, error) {
	var l lbv1.ServicePolicyList
	if err := c.List(ctx, &l, client.InNamespace(ns)); err != nil {
		return nil, fmt.Errorf("list ServicePolicies: %w", err)
	}
	out := make([]entry, len(l.Items))
	for i := range l.Items {
		p := &l.Items[i]
		attach, err := policy.FromServicePolicy(p)
		out[i] = entry{obj: p, status: &p.Status, invalid: err, policy: attach}
	}
	return out, nil
}}

// L7Policies is the L7Policy kind.
var L7Policies = Kind{Name: "l7policy", APIKind: "L7Policy", Object: &lbv1.L7Policy{}, PerPort: true, Programmed: true, list: func(ctx context.Context, c client.Client, ns string) ([]entry, error) {
	var l lbv1.L7PolicyList
	if err := c.List(ctx, &l, client.InNamespace(ns)); err != nil {
		return nil, fmt.Errorf("list L7Policies: %w", err)
	}
	out := make([]entry, len(l.Items))
	for i := range l.Items {
		p := &l.Items[i]
		out[i] = entry{obj: p, status: &p.Status, policy: policy.FromL7Policy(p)}
	}
	return out, nil
}}

// Reconciler writes the status of one policy kind.
type Reconciler struct {
	Client   client.Client
	Recorder record.EventRecorder
	Kind     Kind
}

// +kubebuilder:rbac:groups=lb.portico.dev,resources=servicepolicies;l7policies,verbs=get;list;watch
// +kubebuilder:rbac:groups=lb.portico.dev,resources=servicepolicies/status;l7policies/status,verbs=patch
// +kubebuilder:rbac:groups=lb.portico.dev,resources=nodeagents,verbs=get;list;watch

// SetupWithManager registers the reconciler. A change to any policy of the kind or to any
// Service re-queues every policy of the kind in that namespace: conflicts cross policies.
func (r *Reconciler) SetupWithManager(mgr ctrl.Manager) error {
	policiesIn := func(ctx context.Context, namespace string) []reconcile.Request {
		entries, err := r.Kind.list(ctx, r.Client, namespace)
		if err != nil {
			logf.FromContext(ctx).Error(err, "Failed to list policies to re-queue")
			return nil
		}
		out := make([]reconcile.Request, len(entries))
		for i, e := range entries {
			out[i] = reconcile.Request{NamespacedName: client.ObjectKeyFromObject(e.obj)}
		}
		return out
	}
	inNamespace := handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
		return policiesIn(ctx, o.GetNamespace())
	})
	b := ctrl.NewControllerManagedBy(mgr).
		Named(r.Kind.Name).
		For(r.Kind.Object).
		Watches(r.Kind.Object, inNamespace).
		Watches(&corev1.Service{}, inNamespace)
	if r.Kind.Programmed {
		// What a node programmed concerns policies of every namespace. Agents also write
		// their counts, which change with every Service: only readiness and the policies
		// in force matter here.
		b = b.Watches(&lbv1.NodeAgent{}, handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, _ client.Object) []reconcile.Request {
			return policiesIn(ctx, metav1.NamespaceAll)
		}), builder.WithPredicates(predicate.Funcs{UpdateFunc: func(e event.UpdateEvent) bool {
			before, after := e.ObjectOld.(*lbv1.NodeAgent), e.ObjectNew.(*lbv1.NodeAgent)
			return meta.IsStatusConditionTrue(before.Status.Conditions, lbv1.ConditionReady) != meta.IsStatusConditionTrue(after.Status.Conditions, lbv1.ConditionReady) ||
				!slices.Equal(before.Status.Policies, after.Status.Policies)
		}}))
	}
	return b.Complete(r)
}

// Reconcile writes one policy's status.
func (r *Reconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	entries, err := r.Kind.list(ctx, r.Client, req.Namespace)
	if err != nil {
		return ctrl.Result{}, err
	}
	var svcs corev1.ServiceList
	if err := r.Client.List(ctx, &svcs, client.InNamespace(req.Namespace)); err != nil {
		return ctrl.Result{}, fmt.Errorf("list Services: %w", err)
	}
	services := make([]policy.Service, 0, len(svcs.Items))
	for _, s := range svcs.Items {
		ps := policy.Service{Name: s.Name, Labels: labels.Set(s.Labels)}
		for _, p := range s.Spec.Ports {
			ps.Ports = append(ps.Ports, p.Name)
		}
		services = append(services, ps)
	}
	var valid []policy.Policy
	var self *entry
	for i := range entries {
		if entries[i].invalid == nil {
			valid = append(valid, entries[i].policy)
		}
		if entries[i].obj.GetName() == req.Name {
			self = &entries[i]
		}
	}
	if self == nil {
		return ctrl.Result{}, nil
	}
	result := policy.Resolve(valid, services, r.Kind.PerPort)[req.Name]
	orig := self.obj.DeepCopyObject().(client.Object)
	prev := meta.FindStatusCondition(self.status.Conditions, lbv1.ConditionAccepted)
	var prevAccepted metav1.Condition
	if prev != nil {
		prevAccepted = *prev
	}
	accepted, conflict, attached := conditions(self, result)
	gen := self.obj.GetGeneration()
	accepted.ObservedGeneration, conflict.ObservedGeneration = gen, gen
	meta.SetStatusCondition(&self.status.Conditions, accepted)
	meta.SetStatusCondition(&self.status.Conditions, conflict)
	self.status.AttachedServices = attached
	if r.Kind.Programmed {
		var agents lbv1.NodeAgentList
		if err := r.Client.List(ctx, &agents); err != nil {
			return ctrl.Result{}, fmt.Errorf("list NodeAgents: %w", err)
		}
		cond, nodes := programmed(r.Kind.APIKind, self.obj, attached, agents.Items)
		cond.ObservedGeneration = gen
		meta.SetStatusCondition(&self.status.Conditions, cond)
		self.status.ProgrammedNodes = nodes
	}
	if equality.Semantic.DeepEqual(orig, self.obj) {
		return ctrl.Result{}, nil
	}
	if res, err := statuspatch.Patch(ctx, r.Client, self.obj, orig); err != nil || res.Requeue {
		return res, err
	}
	if accepted.Status == metav1.ConditionFalse && prevAccepted.Message != accepted.Message {
		r.Recorder.Event(self.obj, corev1.EventTypeWarning, accepted.Reason, accepted.Message)
	}
	return ctrl.Result{}, nil
}

func conditions(e *entry, r *policy.Result) (accepted, conflict metav1.Condition, attached int32) {
	accepted = metav1.Condition{Type: lbv1.ConditionAccepted, Status: metav1.ConditionTrue, Reason: ReasonAccepted}
	conflict = metav1.Condition{Type: lbv1.ConditionConflict, Status: metav1.ConditionFalse, Reason: ReasonNoConflict, Message: "no other policy competes for these targets"}
	if e.invalid != nil {
		accepted.Status, accepted.Reason, accepted.Message = metav1.ConditionFalse, ReasonInvalid, e.invalid.Error()
		if errors.Is(e.invalid, policy.ErrUnsupported) {
			accepted.Reason = ReasonUnsupported
		}
		return accepted, conflict, 0
	}
	services := map[string]bool{}
	for _, a := range r.Attached {
		svc, _, _ := strings.Cut(a, "/")
		services[svc] = true
	}
	attached = int32(len(services))
	switch {
	case len(r.Attached) > 0:
		accepted.Message = "applies to " + strings.Join(r.Attached, ", ")
	case len(r.Overridden) > 0:
		accepted.Message = "every target is taken by another policy"
	default:
		accepted.Status, accepted.Reason, accepted.Message = metav1.ConditionFalse, ReasonTargetNotFound, "no Service matches the policy"
	}
	if len(r.Missing) > 0 {
		accepted.Message += "; not found: " + strings.Join(r.Missing, ", ")
		if len(r.Attached) == 0 && len(r.Overridden) == 0 {
			accepted.Message = "not found: " + strings.Join(r.Missing, ", ")
		}
	}
	if len(r.Overridden) > 0 {
		conflict.Status, conflict.Reason = metav1.ConditionTrue, ReasonOverridden
		conflict.Message = "another policy applies to " + strings.Join(r.Overridden, "; ")
	}
	return accepted, conflict, attached
}

// programmed says how many nodes with a ready agent report the policy's current generation
// in force, and whether that is all of them.
func programmed(kind string, obj client.Object, attached int32, agents []lbv1.NodeAgent) (metav1.Condition, int32) {
	c := metav1.Condition{Type: lbv1.ConditionProgrammed, Status: metav1.ConditionFalse}
	if attached == 0 {
		c.Reason, c.Message = ReasonNotAttached, "the policy applies to no Service"
		return c, 0
	}
	want := lbv1.ProgrammedPolicy{Kind: kind, Namespace: obj.GetNamespace(), Name: obj.GetName(), Generation: obj.GetGeneration()}
	var ready int
	var missing []string
	for _, a := range agents {
		if !meta.IsStatusConditionTrue(a.Status.Conditions, lbv1.ConditionReady) {
			continue
		}
		ready++
		if !slices.Contains(a.Status.Policies, want) {
			missing = append(missing, a.Name)
		}
	}
	done := int32(ready - len(missing))
	switch {
	case ready == 0:
		c.Reason, c.Message = ReasonNoAgents, "no node has a ready agent"
	case len(missing) == 0:
		c.Status, c.Reason, c.Message = metav1.ConditionTrue, ReasonProgrammed, fmt.Sprintf("programmed on all %d nodes with a ready agent", ready)
	default:
		slices.Sort(missing)
		more := ""
		if len(missing) > 5 {
			missing, more = missing[:5], fmt.Sprintf(" and %d more", len(missing)-5)
		}
		c.Reason = ReasonPending
		c.Message = fmt.Sprintf("programmed on %d of %d nodes with a ready agent; not yet on %s%s", done, ready, strings.Join(missing, ", "), more)
	}
	return c, done
}
