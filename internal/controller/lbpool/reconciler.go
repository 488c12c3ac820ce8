// Package lbpool reports each LBPool's state in its status: Ready and Conflict conditions,
// and how many addresses of each family are allocated and available.
package lbpool

import (
	"context"
	"fmt"
	"math/big"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/allocator"
	"github.com/portico-dev/portico/internal/controller/statuspatch"
	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/internal/poolconfig"
)

// Reconciler writes LBPool status. It counts addresses from Service status, so it needs no
// state of its own and agrees with what users see on their Services.
type Reconciler struct {
	Client   client.Client
	Recorder record.EventRecorder
	// Addresses, when set, is the portico_pool_addresses gauge (NewAddressesGauge).
	Addresses *prometheus.GaugeVec
}

// NewAddressesGauge makes and registers portico_pool_addresses{pool,family,state}: the
// addresses each pool has allocated and still available, per family (what its status says).
func NewAddressesGauge(reg prometheus.Registerer) (*prometheus.GaugeVec, error) {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "portico_pool_addresses",
		Help: "Addresses of each LBPool by family (ipv4, ipv6) and state (allocated, available)."}, []string{"pool", "family", "state"})
	if err := reg.Register(g); err != nil {
		return nil, fmt.Errorf("register portico_pool_addresses: %w", err)
	}
	return g, nil
}

// +kubebuilder:rbac:groups=lb.portico.dev,resources=lbpools,verbs=get;list;watch
// +kubebuilder:rbac:groups=lb.portico.dev,resources=lbpools/status,verbs=patch

// countDelay gathers the Service changes of a burst into one recount per pool: a recount
// lists every Service, and thousands of Services may change in a second.
const countDelay = time.Second

// SetupWithManager registers the reconciler: any pool change re-queues every pool, since
// overlaps cross pools; Service changes re-queue them after countDelay.
func (r *Reconciler) SetupWithManager(mgr ctrl.Manager) error {
	pools := func(ctx context.Context) []reconcile.Request {
		var pools lbv1.LBPoolList
		if err := r.Client.List(ctx, &pools); err != nil {
			logf.FromContext(ctx).Error(err, "Failed to list LBPools to re-queue")
			return nil
		}
		out := make([]reconcile.Request, len(pools.Items))
		for i := range pools.Items {
			out[i] = reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&pools.Items[i])}
		}
		return out
	}
	later := func(ctx context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
		for _, req := range pools(ctx) {
			q.AddAfter(req, countDelay)
		}
	}
	return ctrl.NewControllerManagedBy(mgr).
		Named("lbpool").
		For(&lbv1.LBPool{}).
		// Another pool's spec decides overlaps; its status (written here) does not.
		Watches(&lbv1.LBPool{}, handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, _ client.Object) []reconcile.Request { return pools(ctx) }),
			builder.WithPredicates(predicate.GenerationChangedPredicate{})).
		Watches(&corev1.Service{}, handler.TypedFuncs[client.Object, reconcile.Request]{
			CreateFunc: func(ctx context.Context, _ event.TypedCreateEvent[client.Object], q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
				later(ctx, q)
			},
			UpdateFunc: func(ctx context.Context, _ event.TypedUpdateEvent[client.Object], q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
				later(ctx, q)
			},
			DeleteFunc: func(ctx context.Context, _ event.TypedDeleteEvent[client.Object], q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
				later(ctx, q)
			},
		}).
		Complete(r)
}

// Reconcile writes one pool's status.
func (r *Reconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	var pools lbv1.LBPoolList
	if err := r.Client.List(ctx, &pools); err != nil {
		return ctrl.Result{}, fmt.Errorf("list LBPools: %w", err)
	}
	var pool *lbv1.LBPool
	for i := range pools.Items {
		if pools.Items[i].Name == req.Name {
			pool = &pools.Items[i]
		}
	}
	if pool == nil {
		if r.Addresses != nil {
			r.Addresses.DeletePartialMatch(prometheus.Labels{"pool": req.Name})
		}
		return ctrl.Result{}, nil
	}
	st := poolconfig.Parse(pools.Items).States[pool.Name]
	var svcs corev1.ServiceList
	if err := r.Client.List(ctx, &svcs); err != nil {
		return ctrl.Result{}, fmt.Errorf("list Services: %w", err)
	}

	orig := pool.DeepCopy()
	status := &pool.Status
	status.Blocks = st.Blocks
	status.IPv4, status.IPv6 = counts(st, svcs.Items)
	r.record(pool.Name, "ipv4", status.IPv4)
	r.record(pool.Name, "ipv6", status.IPv6)
	gen := pool.Generation
	ready := metav1.Condition{Type: lbv1.ConditionReady, Status: metav1.ConditionTrue, Reason: lbv1.ReasonPoolReady, ObservedGeneration: gen,
		Message: "the pool hands out addresses"}
	conflict := metav1.Condition{Type: lbv1.ConditionConflict, Status: metav1.ConditionFalse, Reason: lbv1.ReasonPoolNoConflict, ObservedGeneration: gen,
		Message: "no older pool holds any of these addresses"}
	switch {
	case st.Err != nil:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, lbv1.ReasonPoolInvalid, st.Err.Error()
	case st.Disabled:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, lbv1.ReasonPoolDisabled, "spec.disabled is set: the pool's addresses are withdrawn"
	case len(st.Addresses.Ranges()) == 0:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, lbv1.ReasonPoolNoAddresses, "every address of the pool belongs to an older pool"
	}
	if len(st.Overlaps) > 0 {
		conflict.Status, conflict.Reason = metav1.ConditionTrue, lbv1.ReasonPoolOverlaps
		conflict.Message = "addresses also in older pools stay theirs: " + strings.Join(st.Overlaps, ", ")
	}
	prevReady := meta.FindStatusCondition(orig.Status.Conditions, lbv1.ConditionReady)
	prevConflict := meta.FindStatusCondition(orig.Status.Conditions, lbv1.ConditionConflict)
	meta.SetStatusCondition(&status.Conditions, ready)
	meta.SetStatusCondition(&status.Conditions, conflict)
	if equality.Semantic.DeepEqual(orig.Status, pool.Status) {
		return ctrl.Result{}, nil
	}
	if res, err := statuspatch.Patch(ctx, r.Client, pool, orig); err != nil || res.Requeue {
		return res, err
	}
	if ready.Status == metav1.ConditionFalse && (prevReady == nil || prevReady.Message != ready.Message) {
		r.Recorder.Event(pool, corev1.EventTypeWarning, ready.Reason, ready.Message)
	}
	if conflict.Status == metav1.ConditionTrue && (prevConflict == nil || prevConflict.Message != conflict.Message) {
		r.Recorder.Event(pool, corev1.EventTypeWarning, conflict.Reason, conflict.Message)
	}
	return ctrl.Result{}, nil
}

// record sets a pool's gauges for one family (none: the pool has no address of it).
func (r *Reconciler) record(pool, family string, c *lbv1.AddressCounts) {
	if r.Addresses == nil {
		return
	}
	if c == nil {
		r.Addresses.DeletePartialMatch(prometheus.Labels{"pool": pool, "family": family})
		return
	}
	available, _ := strconv.ParseFloat(c.Available, 64) // an IPv6 pool's count may only fit a float
	r.Addresses.WithLabelValues(pool, family, "allocated").Set(float64(c.Allocated))
	r.Addresses.WithLabelValues(pool, family, "available").Set(available)
}

// counts tallies, per family, the pool's addresses that Services hold (once each, shared or
// not) and the ones still free.
func counts(st *poolconfig.State, svcs []corev1.Service) (v4, v6 *lbv1.AddressCounts) {
	if st.Err != nil || st.Addresses == nil {
		return nil, nil
	}
	capV4, capV6 := allocator.Capacity(st.Addresses, st.AvoidBuggyIPs)
	used := map[netip.Addr]struct{}{}
	for i := range svcs {
		for _, ip := range loadbalancer.IngressIPs(&svcs[i]) {
			if st.Addresses.Contains(ip) {
				used[ip] = struct{}{}
			}
		}
	}
	var n4, n6 int64
	for ip := range used {
		if ip.Is4() {
			n4++
		} else {
			n6++
		}
	}
	family := func(capacity *big.Int, n int64) *lbv1.AddressCounts {
		if capacity.Sign() == 0 && n == 0 {
			return nil
		}
		free := new(big.Int).Sub(capacity, big.NewInt(n))
		if free.Sign() < 0 {
			free.SetInt64(0)
		}
		return &lbv1.AddressCounts{Allocated: n, Available: free.String()}
	}
	return family(capV4, n4), family(capV6, n6)
}
