// Package agent runs on every node: it watches Services, EndpointSlices and its Node, and
// keeps the node's datapath equal to what they ask for (docs/agent.md).
package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/pprof"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	crmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/controller/requeue"
	"github.com/portico-dev/portico/internal/l7"
	"github.com/portico-dev/portico/internal/l7/proxy"
	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/internal/maglev"
	"github.com/portico-dev/portico/internal/notice"
	"github.com/portico-dev/portico/internal/policy"
	"github.com/portico-dev/portico/internal/scheme"
	"github.com/portico-dev/portico/internal/speaker"
)

// Options configure one agent.
type Options struct {
	// NodeName is the Node this agent programs.
	NodeName string
	// ProxyName, when set, serves only Services labelled service.kubernetes.io/service-proxy-name
	// with it; empty serves only Services without the label.
	ProxyName string
	// MetricsAddr and ProbeAddr are the metrics and health endpoints ("0": off).
	MetricsAddr, ProbeAddr string
	// SeveralPerProcess lets tests run several agents in one process.
	SeveralPerProcess bool
	// MaglevTableSize is the datapath's Maglev table size, to tell policies that ask another.
	MaglevTableSize uint32
	// HealthCheckAddr is the IP the healthCheckNodePorts listen on ("": every address).
	HealthCheckAddr string
	// Registry takes the agent's metrics; nil: controller-runtime's, which MetricsAddr serves.
	Registry prometheus.Registerer
	// Version is reported in the node's NodeAgent.
	Version string
	// Profiling serves Go's /debug/pprof/ on the metrics endpoint.
	Profiling bool
	// Recheck is how often a Service that could not be programmed fully is looked at again
	// (a port freed, an older Service gone); 0: every minute.
	Recheck time.Duration
	// L2, when set, announces the LoadBalancer addresses this node wins with ARP and NDP.
	L2 *speaker.Options
	// L7, when set, runs the node's L7 proxy for Service ports with an L7Policy.
	L7 *l7.Options
	// LeaseNamespace, when set, is where the agent renews its Lease (lbv1.AgentLeasePrefix +
	// node), which the operator reads to mark the NodeAgents of dead agents; it must be the
	// operator's --agent-namespace. LeaseDuration is the Lease's duration (0: 40 s; at least 1 s).
	LeaseNamespace string
	LeaseDuration  time.Duration
	// DaemonSet is the agents' DaemonSet in LeaseNamespace, when the operator runs them: a
	// stop while it stays is a restart, one while it goes is Portico's removal (Removed).
	// Empty: every stop is a restart.
	DaemonSet string
}

// serviceNameIndex indexes EndpointSlices by the Service they belong to.
const serviceNameIndex = "portico.serviceName"

// +kubebuilder:rbac:groups="",resources=services;nodes,verbs=get;list;watch
// +kubebuilder:rbac:groups=discovery.k8s.io,resources=endpointslices,verbs=get;list;watch
// +kubebuilder:rbac:groups=lb.portico.dev,resources=servicepolicies;l7policies,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=events,verbs=create;patch

// NewManager returns a manager running the agent for one node over dp. Nothing is written
// to the maps before the caches have synced; then one Resync adopts what is pinned.
func NewManager(cfg *rest.Config, dp loadbalancer.Programmer, o Options) (ctrl.Manager, error) {
	if o.NodeName == "" {
		return nil, fmt.Errorf("no node name")
	}
	if o.MaglevTableSize == 0 {
		o.MaglevTableSize = maglev.DefaultTableSize
	}
	if o.LeaseDuration == 0 {
		o.LeaseDuration = 40 * time.Second
	}
	if o.LeaseDuration < time.Second {
		return nil, fmt.Errorf("lease duration %v is under the 1 s a Lease can say", o.LeaseDuration)
	}
	s, err := scheme.New()
	if err != nil {
		return nil, err
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme: s,
		Cache: cache.Options{
			// The cache keeps only what the translation reads, and hands out its objects
			// without copying them: nothing here modifies what it reads.
			DefaultTransform:             keepWhatIsRead,
			DefaultUnsafeDisableDeepCopy: ptr.To(true),
			// Only this node's Node object, unless L2 announcement needs every node's labels
			// and addresses.
			ByObject: nodeCache(o),
		},
		Metrics:                metricsserver.Options{BindAddress: o.MetricsAddr, ExtraHandlers: profiling(o.Profiling)},
		HealthProbeBindAddress: o.ProbeAddr,
		Controller:             config.Controller{SkipNameValidation: &o.SeveralPerProcess},
	})
	if err != nil {
		return nil, fmt.Errorf("create manager: %w", err)
	}
	err = mgr.GetFieldIndexer().IndexField(context.Background(), &discoveryv1.EndpointSlice{}, serviceNameIndex, func(obj client.Object) []string {
		if name := obj.GetLabels()[discoveryv1.LabelServiceName]; name != "" {
			return []string{name}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index EndpointSlices: %w", err)
	}
	reg := o.Registry
	if reg == nil {
		reg = crmetrics.Registry
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	r := &reconciler{client: mgr.GetClient(), recorder: mgr.GetEventRecorderFor("portico-agent"), syncer: loadbalancer.NewSyncer(dp), opts: o,
		metrics: m, health: newHealthChecks(o.HealthCheckAddr), ready: make(chan struct{}), requeue: requeue.New()}
	if err := mgr.Add(r.health); err != nil {
		return nil, fmt.Errorf("add the health checks: %w", err)
	}
	if o.L7 != nil {
		p, err := proxy.New(reg)
		if err != nil {
			return nil, err
		}
		r.l7 = l7.NewListeners(p, *o.L7)
		// The proxy stops with the agent; requests in flight are reset.
		if err := mgr.Add(manager.RunnableFunc(func(ctx context.Context) error { <-ctx.Done(); p.Close(); return nil })); err != nil {
			return nil, fmt.Errorf("add the L7 proxy: %w", err)
		}
	}
	r.report = newReporter(mgr.GetClient(), o.NodeName, o.Version, r.syncer, r.ready)
	if err := mgr.Add(r.report); err != nil {
		return nil, fmt.Errorf("add the NodeAgent report: %w", err)
	}
	if o.LeaseNamespace != "" {
		lease := &leaseKeeper{client: mgr.GetClient(), namespace: o.LeaseNamespace, node: o.NodeName, duration: o.LeaseDuration, report: r.report}
		if err := mgr.Add(lease); err != nil {
			return nil, fmt.Errorf("add the agent's Lease: %w", err)
		}
	}
	if o.L2 != nil {
		cfg := speaker.Config{Options: *o.L2, Node: o.NodeName, ProxyName: o.ProxyName,
			SliceIndex: serviceNameIndex, Ready: r.ready, Report: r.report.setL2, Registry: reg}
		ds := types.NamespacedName{Namespace: o.LeaseNamespace, Name: o.DaemonSet}
		cfg.Leaving = func(ctx context.Context) bool {
			return Leaving(ctx, mgr.GetAPIReader(), o.NodeName, ds)
		}
		sp, err := speaker.New(mgr, cfg)
		if err != nil {
			return nil, fmt.Errorf("set up L2 announcement: %w", err)
		}
		r.warm = sp.WarmedUp
		if err := mgr.Add(sp); err != nil {
			return nil, fmt.Errorf("add L2 announcement: %w", err)
		}
	}
	if err := mgr.Add(manager.RunnableFunc(r.resync(mgr.GetCache()))); err != nil {
		return nil, fmt.Errorf("add the first sync: %w", err)
	}
	err = ctrl.NewControllerManagedBy(mgr).Named("agent").
		WithOptions(controller.Options{MaxConcurrentReconciles: 4}).
		For(&corev1.Service{}).
		Watches(&discoveryv1.EndpointSlice{}, handler.EnqueueRequestsFromMapFunc(func(_ context.Context, obj client.Object) []reconcile.Request {
			name := obj.GetLabels()[discoveryv1.LabelServiceName]
			if name == "" {
				return nil
			}
			return []reconcile.Request{{NamespacedName: types.NamespacedName{Namespace: obj.GetNamespace(), Name: name}}}
		})).
		WatchesRawSource(r.requeue.Source()).
		Watches(&lbv1.ServicePolicy{}, handler.EnqueueRequestsFromMapFunc(r.servicesOf)).
		Watches(&lbv1.L7Policy{}, handler.EnqueueRequestsFromMapFunc(r.servicesOf)).
		Watches(&corev1.Node{}, handler.EnqueueRequestsFromMapFunc(r.everyService), builder.WithPredicates(
			predicate.NewPredicateFuncs(func(n client.Object) bool { return n.GetName() == o.NodeName }),
			predicate.Funcs{UpdateFunc: func(e event.UpdateEvent) bool {
				old, cur := e.ObjectOld.(*corev1.Node), e.ObjectNew.(*corev1.Node)
				return !equalAddresses(old, cur) || old.Labels[corev1.LabelTopologyZone] != cur.Labels[corev1.LabelTopologyZone]
			}})).
		Complete(r)
	if err != nil {
		return nil, fmt.Errorf("set up the agent controller: %w", err)
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return nil, fmt.Errorf("add health check: %w", err)
	}
	if err := mgr.AddReadyzCheck("readyz", r.readyz); err != nil {
		return nil, fmt.Errorf("add ready check: %w", err)
	}
	return mgr, nil
}

// nodeCache limits the cached Nodes to this node's, unless L2 announcement is on.
func nodeCache(o Options) map[client.Object]cache.ByObject {
	if o.L2 != nil {
		return nil
	}
	return map[client.Object]cache.ByObject{&corev1.Node{}: {Field: fields.OneTermEqualSelector("metadata.name", o.NodeName)}}
}

// profiling returns Go's profiling handlers, when on.
func profiling(on bool) map[string]http.Handler {
	if !on {
		return nil
	}
	return map[string]http.Handler{
		"/debug/pprof/":        http.HandlerFunc(pprof.Index),
		"/debug/pprof/profile": http.HandlerFunc(pprof.Profile),
	}
}

// keepWhatIsRead drops from cached objects what the agent never reads: managed fields and
// annotations of everything, the images of Nodes, and per endpoint the target reference,
// hostname and zone (the hints say which zones an endpoint is for).
func keepWhatIsRead(obj any) (any, error) {
	if m, ok := obj.(metav1.Object); ok {
		m.SetManagedFields(nil)
		m.SetAnnotations(nil)
	}
	if n, ok := obj.(*corev1.Node); ok {
		n.Status.Images = nil
	}
	if es, ok := obj.(*discoveryv1.EndpointSlice); ok {
		// Only the Service's name is read of the labels (the cache's index), nothing of
		// the owner.
		if name, ok := es.Labels[discoveryv1.LabelServiceName]; !ok {
			es.Labels = nil
		} else if len(es.Labels) > 1 {
			es.Labels = map[string]string{discoveryv1.LabelServiceName: name}
		}
		es.OwnerReferences = nil
		for i := range es.Endpoints {
			ep := &es.Endpoints[i]
			ep.TargetRef, ep.Hostname, ep.Zone, ep.DeprecatedTopology = nil, nil, nil, nil
			c := &ep.Conditions
			c.Ready, c.Serving, c.Terminating = shared(c.Ready), shared(c.Serving), shared(c.Terminating)
		}
	}
	return obj, nil
}

// yes and no are what every cached endpoint condition points to: 200,000 endpoints hold
// three conditions each, a small allocation apiece otherwise. Nothing writes through them
// (cached objects are read-only).
var yes, no = true, false

func shared(b *bool) *bool {
	switch {
	case b == nil:
		return nil
	case *b:
		return &yes
	}
	return &no
}

// reconciler programs one Service at a time, once the first sync is done.
type reconciler struct {
	client   client.Client
	recorder record.EventRecorder
	syncer   *loadbalancer.Syncer
	opts     Options
	metrics  *metrics
	health   *healthChecks
	l7       *l7.Listeners // nil: no L7 proxy on this node
	report   *reporter
	ready    chan struct{}
	// warm, with L2 announcement, says whether the speaker has heard its peers: until
	// then the agent is not ready, so that a DaemonSet's rolling update waits for it
	// before it restarts the next node (whose addresses it would otherwise take).
	warm func() bool
	// requeue takes Services whose frontends another Service's change moved.
	requeue *requeue.Services
	told    notice.Last[types.NamespacedName] // the last NotProgrammed message of each Service
}

// resync waits for the caches, programs every Service at once, and then lets the
// reconciler go.
func (r *reconciler) resync(c cache.Cache) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		if !c.WaitForCacheSync(ctx) {
			return ctx.Err()
		}
		t0 := time.Now()
		var services corev1.ServiceList
		if err := r.client.List(ctx, &services); err != nil {
			return fmt.Errorf("list Services: %w", err)
		}
		node, err := r.node(ctx)
		if err != nil {
			return err
		}
		claims := make([]loadbalancer.Claim, 0, len(services.Items))
		policies := make([][]lbv1.ProgrammedPolicy, 0, len(services.Items))
		for i := range services.Items {
			c, pol, _, err := r.claim(ctx, node, &services.Items[i])
			if err != nil {
				return err
			}
			claims = append(claims, c)
			policies = append(policies, pol)
		}
		incomplete, err := r.syncer.Resync(claims)
		if err != nil {
			r.metrics.errors.Inc()
			return fmt.Errorf("first sync: %w", err)
		}
		if len(incomplete) > 0 {
			// The maps are full: the youngest Services wait, every other one works. Each is
			// synced again below, which tells its owner (an Event) and retries.
			r.metrics.errors.Inc()
			ctrl.LoggerFrom(ctx).Error(errors.New("datapath maps full"), "First sync left Services out", "services", len(incomplete))
		}
		for i, c := range claims {
			r.report.setPolicies(c.Service, policies[i])
		}
		took := time.Since(t0)
		r.metrics.sync.WithLabelValues("full").Observe(took.Seconds())
		r.metrics.programmed(r.syncer)
		svcs, fs := r.syncer.Counts()
		ctrl.LoggerFrom(ctx).Info("Programmed the datapath", "services", svcs, "frontends", fs, "took", took)
		close(r.ready)
		r.requeue.Add(ctx, incomplete...)
		return nil
	}
}

func (r *reconciler) readyz(_ *http.Request) error {
	select {
	case <-r.ready:
	default:
		return fmt.Errorf("first sync not done")
	}
	if r.warm != nil && !r.warm() {
		return fmt.Errorf("L2 announcement has not heard its peers yet")
	}
	return nil
}

func (r *reconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	select {
	case <-r.ready:
	case <-ctx.Done():
		return ctrl.Result{}, ctx.Err()
	}
	t0 := time.Now()
	node, err := r.node(ctx)
	if err != nil {
		return ctrl.Result{}, err
	}
	var svc corev1.Service
	if err := r.client.Get(ctx, req.NamespacedName, &svc); err != nil {
		if !apierrors.IsNotFound(err) {
			return ctrl.Result{}, fmt.Errorf("get Service: %w", err)
		}
		svc.Namespace, svc.Name = req.Namespace, req.Name // gone: claims nothing
	}
	c, pol, problems, err := r.claim(ctx, node, &svc)
	if err != nil {
		return ctrl.Result{}, err
	}
	lost, affected, err := r.syncer.Set(c)
	if err == nil {
		r.report.setPolicies(c.Service, pol)
	}
	r.metrics.sync.WithLabelValues("service").Observe(time.Since(t0).Seconds())
	r.metrics.programmed(r.syncer)
	// Synced again, they learn (and say in an Event) what they hold now.
	r.requeue.Add(ctx, affected...)
	if err != nil {
		r.metrics.errors.Inc()
		r.report.poke() // what waits for room shows in the NodeAgent
		if svc.UID != "" {
			r.recorder.Eventf(&svc, corev1.EventTypeWarning, "ProgrammingFailed", "Node %s: %v", r.opts.NodeName, err)
		}
		return ctrl.Result{}, err
	}
	if len(problems)+len(lost) > 0 && svc.UID != "" {
		// Said once, not at every recheck: a thousand nodes repeating a permanent problem
		// every minute would be load on the API server and noise for the user.
		if msg := strings.Join(append(problems, lost...), "; "); r.told.Changed(c.Service, msg) {
			r.recorder.Eventf(&svc, corev1.EventTypeWarning, "NotProgrammed", "Node %s: %s", r.opts.NodeName, msg)
		}
		return ctrl.Result{RequeueAfter: cmp.Or(r.opts.Recheck, time.Minute)}, nil
	}
	r.told.Changed(c.Service, "")
	return ctrl.Result{}, nil
}

// claim computes what a Service asks of this node and which policies it programs for it
// (its ServicePolicy, the L7Policies whose listeners opened), and sets its health check and
// L7 listeners.
func (r *reconciler) claim(ctx context.Context, node loadbalancer.Node, svc *corev1.Service) (loadbalancer.Claim, []lbv1.ProgrammedPolicy, []string, error) {
	c := loadbalancer.Claim{Service: types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}, Created: svc.CreationTimestamp.Time}
	if svc.UID == "" {
		r.setL7(c.Service, nil)
		return c, nil, nil, r.health.set(c.Service, 0, loadbalancer.Local{}) // closing cannot fail
	}
	// The policy counts as programmed for a Service this node does not serve (headless, or
	// another proxy's): there is nothing to program.
	set, pol, problems, err := r.policy(ctx, svc)
	var pols []lbv1.ProgrammedPolicy
	if pol != nil {
		pols = append(pols, *pol)
	}
	if err != nil || !loadbalancer.Serves(svc, r.opts.ProxyName) {
		r.setL7(c.Service, nil)
		return c, pols, nil, errors.Join(err, r.health.set(c.Service, 0, loadbalancer.Local{}))
	}
	var slices discoveryv1.EndpointSliceList
	if err := r.client.List(ctx, &slices, client.InNamespace(svc.Namespace), client.MatchingFields{serviceNameIndex: svc.Name}); err != nil {
		return c, nil, nil, fmt.Errorf("list EndpointSlices: %w", err)
	}
	ptrs := make([]*discoveryv1.EndpointSlice, len(slices.Items))
	for i := range slices.Items {
		ptrs[i] = &slices.Items[i]
	}
	var more []string
	if r.l7 != nil {
		won, err := r.l7Policies(ctx, svc)
		if err != nil {
			return c, nil, nil, err
		}
		want, wrong := l7.Want(node, svc, ptrs, won)
		set.Proxied, more = r.l7.Set(c.Service, want)
		problems = append(append(problems, wrong...), more...)
		pols = append(pols, l7.Programmed(svc, won, want, set.Proxied)...)
	}
	c.Frontends, more = loadbalancer.Frontends(node, svc, ptrs, set)
	problems = append(problems, more...)
	port, local := int32(0), loadbalancer.Local{}
	if svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal && svc.Spec.HealthCheckNodePort != 0 {
		port, local = svc.Spec.HealthCheckNodePort, loadbalancer.LocalReady(node.Name, svc, ptrs)
	}
	// A health check that cannot listen (port taken) does not stop the Service's traffic.
	if err := r.health.set(c.Service, port, local); err != nil {
		problems = append(problems, err.Error())
	}
	return c, pols, problems, nil
}

// policy returns the settings of the ServicePolicy that applies to svc (the same choice
// the operator reports in the policies' status), and what of it this node cannot do.
func (r *reconciler) policy(ctx context.Context, svc *corev1.Service) (loadbalancer.Settings, *lbv1.ProgrammedPolicy, []string, error) {
	var list lbv1.ServicePolicyList
	if err := r.client.List(ctx, &list, client.InNamespace(svc.Namespace)); err != nil {
		return loadbalancer.Settings{}, nil, nil, fmt.Errorf("list ServicePolicies: %w", err)
	}
	if len(list.Items) == 0 {
		return loadbalancer.Settings{}, nil, nil, nil
	}
	// Rejected policies (policy.FromServicePolicy) apply to nothing, as the operator reports.
	attach := make([]policy.Policy, 0, len(list.Items))
	for i := range list.Items {
		if p, err := policy.FromServicePolicy(&list.Items[i]); err == nil {
			attach = append(attach, p)
		}
	}
	results := policy.Resolve(attach, []policy.Service{{Name: svc.Name, Labels: labels.Set(svc.Labels)}}, false)
	for i := range list.Items {
		if res := results[list.Items[i].Name]; res != nil && slices.Contains(res.Attached, svc.Name) {
			p := &list.Items[i]
			set, problems := settings(&p.Spec, r.opts.MaglevTableSize)
			for j := range problems {
				problems[j] = fmt.Sprintf("ServicePolicy %s: %s", p.Name, problems[j])
			}
			return set, &lbv1.ProgrammedPolicy{Kind: "ServicePolicy", Namespace: p.Namespace, Name: p.Name, Generation: p.Generation}, problems, nil
		}
	}
	return loadbalancer.Settings{}, nil, nil, nil
}

// setL7 removes or sets a Service's L7 listeners, when the node runs the proxy.
func (r *reconciler) setL7(svc types.NamespacedName, want map[loadbalancer.ProxyKey]proxy.Config) {
	if r.l7 != nil {
		r.l7.Set(svc, want)
	}
}

// l7Policies returns the L7Policy that applies to each port of svc, by port name (the same
// choice the operator reports in the policies' status).
func (r *reconciler) l7Policies(ctx context.Context, svc *corev1.Service) (map[string]*lbv1.L7Policy, error) {
	var list lbv1.L7PolicyList
	if err := r.client.List(ctx, &list, client.InNamespace(svc.Namespace)); err != nil {
		return nil, fmt.Errorf("list L7Policies: %w", err)
	}
	if len(list.Items) == 0 {
		return nil, nil
	}
	attach := make([]policy.Policy, len(list.Items))
	for i := range list.Items {
		attach[i] = policy.FromL7Policy(&list.Items[i])
	}
	target := policy.Service{Name: svc.Name, Labels: labels.Set(svc.Labels)}
	for _, p := range svc.Spec.Ports {
		target.Ports = append(target.Ports, p.Name)
	}
	won := map[string]*lbv1.L7Policy{}
	results := policy.Resolve(attach, []policy.Service{target}, true)
	for i := range list.Items {
		if res := results[list.Items[i].Name]; res != nil {
			for _, a := range res.Attached {
				if port, ok := strings.CutPrefix(a, svc.Name+"/"); ok {
					won[port] = &list.Items[i]
				}
			}
		}
	}
	return won, nil
}

// node reads this node's addresses and zone; a Node not (yet) there has none.
func (r *reconciler) node(ctx context.Context) (loadbalancer.Node, error) {
	var obj corev1.Node
	if err := r.client.Get(ctx, types.NamespacedName{Name: r.opts.NodeName}, &obj); err != nil {
		if apierrors.IsNotFound(err) {
			return loadbalancer.Node{Name: r.opts.NodeName}, nil
		}
		return loadbalancer.Node{Name: r.opts.NodeName}, fmt.Errorf("get Node: %w", err)
	}
	return loadbalancer.NodeOf(&obj), nil
}

// everyService requeues every Service (the node's addresses changed: NodePorts move; or its
// zone: topology hints choose other endpoints).
func (r *reconciler) everyService(ctx context.Context, _ client.Object) []reconcile.Request {
	return r.services(ctx)
}

// servicesOf requeues the Services of a policy's namespace (which it selected before and
// after a change is not known).
func (r *reconciler) servicesOf(ctx context.Context, p client.Object) []reconcile.Request {
	return r.services(ctx, client.InNamespace(p.GetNamespace()))
}

func (r *reconciler) services(ctx context.Context, opts ...client.ListOption) []reconcile.Request {
	var services corev1.ServiceList
	if err := r.client.List(ctx, &services, opts...); err != nil {
		ctrl.LoggerFrom(ctx).Error(err, "List Services to sync again")
		return nil
	}
	out := make([]reconcile.Request, len(services.Items))
	for i, s := range services.Items {
		out[i] = reconcile.Request{NamespacedName: types.NamespacedName{Namespace: s.Namespace, Name: s.Name}}
	}
	return out
}

func equalAddresses(a, b *corev1.Node) bool {
	if len(a.Status.Addresses) != len(b.Status.Addresses) {
		return false
	}
	for i := range a.Status.Addresses {
		if a.Status.Addresses[i] != b.Status.Addresses[i] {
			return false
		}
	}
	return true
}
