// Package servicelb gives LoadBalancer Services their addresses: it feeds Services and
// LBPools to the allocator and writes the result to the Service's status, a condition and
// Events. It never writes a Service's spec or metadata.
package servicelb

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/allocator"
	"github.com/portico-dev/portico/internal/controller/requeue"
	"github.com/portico-dev/portico/internal/controller/statuspatch"
	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/internal/poolconfig"
)

// Reconciler allocates addresses for the LoadBalancer Services Portico serves.
type Reconciler struct {
	Client   client.Client
	Recorder record.EventRecorder
	Class    Class
	// Workers is how many Services are reconciled at once; allocation itself is serialised.
	Workers int
	// Metrics, when set, are the allocator's gauges and histogram (NewMetrics).
	Metrics *Metrics

	mu        sync.Mutex
	alloc     *allocator.Allocator
	poolsSeen string // fingerprint of the LBPools the allocator was last given
	restored  bool
	// waiting holds the Services that lack an address they want; when another Service gives
	// addresses back they are re-queued through retry.
	waiting map[types.NamespacedName]struct{}
	retry   *requeue.Services
}

// Metrics are the allocator's: portico_services_waiting (LoadBalancer Services without an
// address they want) and portico_allocation_duration_seconds (one Service's allocation).
type Metrics struct {
	Waiting    prometheus.Gauge
	Allocation prometheus.Histogram
}

// NewMetrics makes and registers the allocator's metrics.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		Waiting: prometheus.NewGauge(prometheus.GaugeOpts{Name: "portico_services_waiting",
			Help: "LoadBalancer Services that lack an address they want (no pool fits, pool exhausted, address taken, ...)."}),
		Allocation: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "portico_allocation_duration_seconds",
			Help: "Time to allocate one Service's addresses (the allocator alone, not the status write).", Buckets: prometheus.ExponentialBuckets(1e-6, 4, 10)}),
	}
	for _, c := range []prometheus.Collector{m.Waiting, m.Allocation} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register the allocator's metrics: %w", err)
		}
	}
	return m, nil
}

// +kubebuilder:rbac:groups="",resources=services,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=services/status,verbs=patch
// +kubebuilder:rbac:groups="",resources=namespaces,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=events,verbs=create;patch
// +kubebuilder:rbac:groups=lb.portico.dev,resources=lbpools,verbs=get;list;watch

// SetupWithManager registers the reconciler. Pool and namespace changes re-queue the Services
// they may affect. Only a pool's spec matters here: its status changes every time a count
// does, and re-queueing every Service for each would flood the queue.
func (r *Reconciler) SetupWithManager(mgr ctrl.Manager) error {
	r.alloc = allocator.New()
	r.waiting = map[types.NamespacedName]struct{}{}
	r.retry = requeue.New()
	return ctrl.NewControllerManagedBy(mgr).
		Named("servicelb").
		For(&corev1.Service{}).
		WatchesRawSource(r.retry.Source()).
		Watches(&lbv1.LBPool{}, handler.EnqueueRequestsFromMapFunc(r.servicesIn("")), builder.WithPredicates(predicate.GenerationChangedPredicate{})).
		Watches(&corev1.Namespace{}, handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
			return r.servicesIn(o.GetName())(ctx, o)
		})).
		WithOptions(controller.Options{MaxConcurrentReconciles: max(1, r.Workers)}).
		Complete(r)
}

// servicesIn maps an event to every Service Portico serves, in one namespace or in all.
func (r *Reconciler) servicesIn(namespace string) handler.MapFunc {
	return func(ctx context.Context, _ client.Object) []reconcile.Request {
		var list corev1.ServiceList
		if err := r.Client.List(ctx, &list, client.InNamespace(namespace)); err != nil {
			logf.FromContext(ctx).Error(err, "Failed to list Services to re-queue")
			return nil
		}
		var out []reconcile.Request
		for i := range list.Items {
			if r.Class.Serves(&list.Items[i]) || hasOurCondition(&list.Items[i]) {
				out = append(out, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(&list.Items[i])})
			}
		}
		return out
	}
}

// Reconcile brings one Service's addresses in line with its spec and the pools.
func (r *Reconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	if err := r.prepare(ctx); err != nil {
		return ctrl.Result{}, err
	}
	var svc corev1.Service
	if err := r.Client.Get(ctx, req.NamespacedName, &svc); err != nil {
		if apierrors.IsNotFound(err) {
			r.release(ctx, req.NamespacedName)
			return ctrl.Result{}, nil
		}
		return ctrl.Result{}, fmt.Errorf("get Service %s: %w", req, err)
	}
	if !r.Class.Serves(&svc) {
		return r.forget(ctx, &svc)
	}
	nsLabels, err := r.namespaceLabels(ctx, svc.Namespace)
	if err != nil {
		return ctrl.Result{}, err
	}
	request, parseErr := Request(&svc, nsLabels)

	r.mu.Lock()
	var got allocator.Assignment
	var allocErr error
	held := len(r.alloc.Claim(request, loadbalancer.IngressIPs(&svc)))
	if parseErr != nil {
		// Keep what the Service has; a typo must not cost it its address.
		got = r.alloc.Assigned(request.Key)
	} else {
		t0 := time.Now()
		got, allocErr = r.alloc.Assign(request)
		if r.Metrics != nil {
			r.Metrics.Allocation.Observe(time.Since(t0).Seconds())
		}
	}
	r.setWaiting(req.NamespacedName, allocErr != nil)
	gaveBack := len(got.IPs) < held
	r.mu.Unlock()
	if gaveBack {
		r.retryWaiting(ctx)
	}

	cond := metav1.Condition{Type: lbv1.ServiceConditionIPAllocated, Status: metav1.ConditionTrue, Reason: lbv1.ReasonAllocated, Message: describe(got)}
	switch {
	case parseErr != nil:
		cond.Status, cond.Reason = metav1.ConditionFalse, lbv1.ReasonInvalidAnnotation
		cond.Message = parseErr.Error() + "; the Service keeps " + describe(got)
	case allocErr != nil:
		cond.Status, cond.Reason = metav1.ConditionFalse, reasonOf(allocErr)
		cond.Message = strings.ReplaceAll(allocErr.Error(), "\n", "; ")
		if len(got.IPs) > 0 {
			cond.Message += "; the Service has " + describe(got)
		}
	}
	return r.writeStatus(ctx, &svc, got.IPs, cond, got)
}

// prepare gives the allocator the current pools and, the first time, every address the
// Services already have, before any new address is handed out: a restart moves no Service.
func (r *Reconciler) prepare(ctx context.Context) error {
	var pools lbv1.LBPoolList
	if err := r.Client.List(ctx, &pools); err != nil {
		return fmt.Errorf("list LBPools: %w", err)
	}
	fp := fingerprint(pools.Items)

	r.mu.Lock()
	defer r.mu.Unlock()
	if fp != r.poolsSeen {
		affected := r.alloc.SetPools(poolconfig.Parse(pools.Items).Pools)
		r.poolsSeen = fp
		if len(affected) > 0 {
			logf.FromContext(ctx).Info("Took back addresses that left their pools", "services", affected)
		}
	}
	if r.restored {
		return nil
	}
	var svcs corev1.ServiceList
	if err := r.Client.List(ctx, &svcs); err != nil {
		return fmt.Errorf("list Services to restore their addresses: %w", err)
	}
	// Oldest first: if two Services claim one address they may not share, the older keeps it.
	slices.SortFunc(svcs.Items, func(x, y corev1.Service) int {
		return cmp.Or(x.CreationTimestamp.Compare(y.CreationTimestamp.Time), strings.Compare(x.Namespace+"/"+x.Name, y.Namespace+"/"+y.Name))
	})
	nsLabels := map[string]map[string]string{}
	restored := 0
	for i := range svcs.Items {
		svc := &svcs.Items[i]
		ips := loadbalancer.IngressIPs(svc)
		if !r.Class.Serves(svc) || len(ips) == 0 {
			continue
		}
		if _, ok := nsLabels[svc.Namespace]; !ok {
			l, err := r.namespaceLabels(ctx, svc.Namespace)
			if err != nil {
				return err
			}
			nsLabels[svc.Namespace] = l
		}
		req, _ := Request(svc, nsLabels[svc.Namespace])
		restored += len(r.alloc.Claim(req, ips))
	}
	r.restored = true
	logf.FromContext(ctx).Info("Restored addresses from Service status", "addresses", restored)
	return nil
}

func (r *Reconciler) namespaceLabels(ctx context.Context, name string) (map[string]string, error) {
	var ns corev1.Namespace
	if err := r.Client.Get(ctx, types.NamespacedName{Name: name}, &ns); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("get Namespace %s: %w", name, err)
	}
	return ns.Labels, nil
}

// forget releases a Service Portico no longer serves (its type changed) and removes what
// Portico wrote to its status.
func (r *Reconciler) forget(ctx context.Context, svc *corev1.Service) (ctrl.Result, error) {
	held := r.release(ctx, client.ObjectKeyFromObject(svc))
	if !hasOurCondition(svc) {
		return ctrl.Result{}, nil
	}
	orig := svc.DeepCopy()
	meta.RemoveStatusCondition(&svc.Status.Conditions, lbv1.ServiceConditionIPAllocated)
	svc.Status.LoadBalancer.Ingress = slices.DeleteFunc(svc.Status.LoadBalancer.Ingress, func(in corev1.LoadBalancerIngress) bool {
		ip, err := netip.ParseAddr(in.IP)
		return err == nil && slices.Contains(held.IPs, ip)
	})
	if res, err := statuspatch.Patch(ctx, r.Client, svc, orig); err != nil || res.Requeue {
		return res, err
	}
	if len(held.IPs) > 0 {
		r.Recorder.Eventf(svc, corev1.EventTypeNormal, "IPReleased", "Released %s: the Service is no longer a LoadBalancer Portico serves", ipList(held.IPs))
	}
	return ctrl.Result{}, nil
}

// release takes back every address of a Service and, if that freed any, re-queues the
// Services waiting for one. It returns what the Service held.
func (r *Reconciler) release(ctx context.Context, name types.NamespacedName) allocator.Assignment {
	r.mu.Lock()
	held := r.alloc.Assigned(name.String())
	r.alloc.Release(name.String())
	r.setWaiting(name, false)
	r.mu.Unlock()
	if len(held.IPs) > 0 {
		r.retryWaiting(ctx)
	}
	return held
}

// setWaiting records whether a Service lacks an address it wants. Callers hold r.mu.
func (r *Reconciler) setWaiting(name types.NamespacedName, waiting bool) {
	if waiting {
		r.waiting[name] = struct{}{}
	} else {
		delete(r.waiting, name)
	}
	if r.Metrics != nil {
		r.Metrics.Waiting.Set(float64(len(r.waiting)))
	}
}

// retryWaiting re-queues every Service that lacks an address. It must not hold r.mu: the
// channel may be full until the controller drains it.
func (r *Reconciler) retryWaiting(ctx context.Context) {
	r.mu.Lock()
	names := make([]types.NamespacedName, 0, len(r.waiting))
	for n := range r.waiting {
		names = append(names, n)
	}
	r.mu.Unlock()
	r.retry.Add(ctx, names...)
}

// writeStatus writes addresses and condition, and tells what changed in Events.
func (r *Reconciler) writeStatus(ctx context.Context, svc *corev1.Service, ips []netip.Addr, cond metav1.Condition, got allocator.Assignment) (ctrl.Result, error) {
	before := loadbalancer.IngressIPs(svc)
	orig := svc.DeepCopy()
	prevCond := meta.FindStatusCondition(orig.Status.Conditions, cond.Type)
	ingress := make([]corev1.LoadBalancerIngress, 0, len(ips))
	vip := corev1.LoadBalancerIPModeVIP
	for _, ip := range ips {
		ingress = append(ingress, corev1.LoadBalancerIngress{IP: ip.String(), IPMode: &vip})
	}
	svc.Status.LoadBalancer.Ingress = ingress
	cond.ObservedGeneration = svc.Generation
	meta.SetStatusCondition(&svc.Status.Conditions, cond)
	if equalStatus(orig, svc) {
		return ctrl.Result{}, nil
	}
	if res, err := statuspatch.Patch(ctx, r.Client, svc, orig); err != nil || res.Requeue {
		return res, err
	}
	added, removed := diff(before, ips)
	if len(removed) > 0 {
		r.Recorder.Eventf(svc, corev1.EventTypeNormal, "IPReleased", "Released %s", ipList(removed))
	}
	if len(added) > 0 {
		r.Recorder.Eventf(svc, corev1.EventTypeNormal, "IPAllocated", "Allocated %s", describeSome(got, added))
	}
	if cond.Status == metav1.ConditionFalse && (prevCond == nil || prevCond.Reason != cond.Reason || prevCond.Message != cond.Message) {
		r.Recorder.Event(svc, corev1.EventTypeWarning, cond.Reason, cond.Message)
	}
	return ctrl.Result{}, nil
}

func equalStatus(a, b *corev1.Service) bool {
	if len(a.Status.LoadBalancer.Ingress) != len(b.Status.LoadBalancer.Ingress) {
		return false
	}
	for i := range a.Status.LoadBalancer.Ingress {
		x, y := a.Status.LoadBalancer.Ingress[i], b.Status.LoadBalancer.Ingress[i]
		if x.IP != y.IP || x.Hostname != y.Hostname || (x.IPMode == nil) != (y.IPMode == nil) || (x.IPMode != nil && *x.IPMode != *y.IPMode) {
			return false
		}
	}
	ca := meta.FindStatusCondition(a.Status.Conditions, lbv1.ServiceConditionIPAllocated)
	cb := meta.FindStatusCondition(b.Status.Conditions, lbv1.ServiceConditionIPAllocated)
	return ca != nil && cb != nil && ca.Status == cb.Status && ca.Reason == cb.Reason && ca.Message == cb.Message && ca.ObservedGeneration == cb.ObservedGeneration
}

func hasOurCondition(svc *corev1.Service) bool {
	return meta.FindStatusCondition(svc.Status.Conditions, lbv1.ServiceConditionIPAllocated) != nil
}

func reasonOf(err error) string {
	var e *allocator.Error
	if errors.As(err, &e) {
		return string(e.Reason)
	}
	return "AllocationFailed"
}

func describe(a allocator.Assignment) string {
	if len(a.IPs) == 0 {
		return "no address"
	}
	return describeSome(a, a.IPs)
}

func describeSome(a allocator.Assignment, ips []netip.Addr) string {
	parts := make([]string, 0, len(ips))
	for i, ip := range a.IPs {
		if slices.Contains(ips, ip) {
			parts = append(parts, fmt.Sprintf("%s from pool %s", ip, a.Pools[i]))
		}
	}
	return strings.Join(parts, ", ")
}

func ipList(ips []netip.Addr) string {
	s := make([]string, len(ips))
	for i, ip := range ips {
		s[i] = ip.String()
	}
	return strings.Join(s, ", ")
}

func diff(before, after []netip.Addr) (added, removed []netip.Addr) {
	for _, ip := range after {
		if !slices.Contains(before, ip) {
			added = append(added, ip)
		}
	}
	for _, ip := range before {
		if !slices.Contains(after, ip) {
			removed = append(removed, ip)
		}
	}
	return added, removed
}

// fingerprint identifies a set of LBPools by name, UID and generation: any spec change,
// creation or deletion changes it.
func fingerprint(pools []lbv1.LBPool) string {
	parts := make([]string, len(pools))
	for i, p := range pools {
		parts[i] = fmt.Sprintf("%s/%s/%d", p.Name, p.UID, p.Generation)
	}
	slices.Sort(parts)
	return strings.Join(parts, ",")
}
