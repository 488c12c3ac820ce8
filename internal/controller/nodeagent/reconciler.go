// Package nodeagent marks the NodeAgents of agents that stopped: an agent renews a Lease
// (lbv1.AgentLeasePrefix + node) in the agents' namespace, and when it lapses the agent's
// last report is no longer true. Its NodeAgent then says Ready=Unknown and lists no
// announcements (its peers took them over), until the agent comes back and writes it again.
package nodeagent

import (
	"context"
	"fmt"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
)

// ReasonLost is the Ready reason of a NodeAgent whose agent's Lease lapsed.
const ReasonLost = "AgentLost"

// Reconciler marks lost agents' NodeAgents. Namespace is where the agents keep their Leases.
type Reconciler struct {
	Client    client.Client
	Recorder  record.EventRecorder
	Namespace string
	// Grace is how long a NodeAgent may go without a Lease after it turned Ready (an agent
	// writes its Lease first, so only an agent without one stays without); 0: 40 s.
	Grace time.Duration
}

// +kubebuilder:rbac:groups=lb.portico.dev,resources=nodeagents,verbs=get;list;watch
// +kubebuilder:rbac:groups=lb.portico.dev,resources=nodeagents/status,verbs=patch
// +kubebuilder:rbac:groups=coordination.k8s.io,resources=leases,verbs=get;list;watch,namespace=system

// SetupWithManager watches NodeAgents and the agents' Leases.
func (r *Reconciler) SetupWithManager(mgr ctrl.Manager) error {
	if r.Grace == 0 {
		r.Grace = 40 * time.Second
	}
	return ctrl.NewControllerManagedBy(mgr).Named("nodeagent").
		For(&lbv1.NodeAgent{}).
		Watches(&coordinationv1.Lease{}, handler.EnqueueRequestsFromMapFunc(func(_ context.Context, l client.Object) []reconcile.Request {
			return []reconcile.Request{{NamespacedName: types.NamespacedName{Name: strings.TrimPrefix(l.GetName(), lbv1.AgentLeasePrefix)}}}
		}), builder.WithPredicates(predicate.NewPredicateFuncs(func(l client.Object) bool {
			return l.GetNamespace() == r.Namespace && strings.HasPrefix(l.GetName(), lbv1.AgentLeasePrefix)
		}))).
		Complete(r)
}

// Reconcile checks one NodeAgent against its agent's Lease, and comes back when the Lease
// would lapse.
func (r *Reconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var agent lbv1.NodeAgent
	if err := r.Client.Get(ctx, req.NamespacedName, &agent); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	now := time.Now()
	name := types.NamespacedName{Namespace: r.Namespace, Name: lbv1.AgentLeasePrefix + agent.Name}
	// An agent that turned Ready after what the Lease in the cache says (it came back, and
	// its renewal is on its way) is given the grace.
	var readySince time.Time
	if ready := meta.FindStatusCondition(agent.Status.Conditions, lbv1.ConditionReady); ready != nil && ready.Status == metav1.ConditionTrue {
		readySince = ready.LastTransitionTime.Time
	}
	var lease coordinationv1.Lease
	var why string
	switch err := r.Client.Get(ctx, name, &lease); {
	case apierrors.IsNotFound(err):
		if now.Before(readySince.Add(r.Grace)) {
			return ctrl.Result{RequeueAfter: readySince.Add(r.Grace).Sub(now)}, nil
		}
		why = fmt.Sprintf("the agent holds no Lease %s: it stopped, or runs without --lease-namespace=%s", name, r.Namespace)
	case err != nil:
		return ctrl.Result{}, fmt.Errorf("get Lease %s: %w", name, err)
	default:
		until := expiry(&lease)
		if now.Before(until) {
			return ctrl.Result{RequeueAfter: until.Sub(now) + 100*time.Millisecond}, nil
		}
		if readySince.After(until) && now.Before(readySince.Add(r.Grace)) {
			return ctrl.Result{RequeueAfter: readySince.Add(r.Grace).Sub(now)}, nil
		}
		why = fmt.Sprintf("the agent's Lease %s lapsed at %s", name, until.UTC().Format(time.RFC3339))
	}
	return ctrl.Result{}, r.markLost(ctx, &agent, why)
}

// markLost says the agent is gone; the datapath keeps its last state (the pins stay).
func (r *Reconciler) markLost(ctx context.Context, agent *lbv1.NodeAgent, why string) error {
	ready := meta.FindStatusCondition(agent.Status.Conditions, lbv1.ConditionReady)
	if ready != nil && ready.Status == metav1.ConditionUnknown && len(agent.Status.Announcements) == 0 && len(agent.Status.LivePeers) == 0 {
		return nil
	}
	before := agent.DeepCopy()
	meta.SetStatusCondition(&agent.Status.Conditions, metav1.Condition{Type: lbv1.ConditionReady, Status: metav1.ConditionUnknown,
		Reason: ReasonLost, Message: why + "; the node forwards with the datapath state the agent left"})
	agent.Status.Announcements, agent.Status.LivePeers = nil, nil
	if err := r.Client.Status().Patch(ctx, agent, client.MergeFromWithOptions(before, client.MergeFromWithOptimisticLock{})); err != nil {
		return fmt.Errorf("mark NodeAgent %s lost: %w", agent.Name, err)
	}
	r.Recorder.Event(agent, corev1.EventTypeWarning, ReasonLost, why)
	return nil
}

// expiry is when a Lease lapses unless renewed (a Lease without a renewal time or duration
// has lapsed).
func expiry(l *coordinationv1.Lease) time.Time {
	if l.Spec.RenewTime == nil || l.Spec.LeaseDurationSeconds == nil {
		return time.Time{}
	}
	return l.Spec.RenewTime.Add(time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second)
}
