// Package speaker is the L2 announcement loop of a node's agent (docs/l2.md): it follows the
// API server's Services, EndpointSlices, Nodes and LBPools and its peers' heartbeats, runs
// the node decision of package announce, and answers ARP and NDP for the addresses this node
// wins.
package speaker

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/announce"
	"github.com/portico-dev/portico/internal/announce/l2"
	"github.com/portico-dev/portico/internal/announce/members"
	"github.com/portico-dev/portico/internal/notice"
	"github.com/portico-dev/portico/internal/poolconfig"
)

// +kubebuilder:rbac:groups=lb.portico.dev,resources=lbpools,verbs=get;list;watch

// Options turn on L2 announcement (docs/l2.md).
type Options struct {
	// Port is the heartbeat port, the same on every node.
	Port uint16
	// Interval is how often heartbeats go out; DeadAfter how long a silent peer stays alive.
	Interval, DeadAfter time.Duration
	// Key signs and checks heartbeats; every agent needs the same. Nil: unsigned. Next is
	// a key they may also be signed with, while the cluster changes keys.
	Key, Next []byte
	// RestartHold is how long peers keep this node's addresses when its agent stops to
	// restart (a rolling update), so that they do not move; 0: it says it is leaving.
	RestartHold time.Duration
}

// Config is what the speaker needs from the agent that runs it.
type Config struct {
	Options
	// Node is this node's name; ProxyName the agents' service-proxy-name.
	Node, ProxyName string
	// SliceIndex is the cache's field index of EndpointSlices by Service name.
	SliceIndex string
	// Ready is closed when the datapath's first sync is done: no address is announced
	// before the node can serve it.
	Ready <-chan struct{}
	// Report takes the addresses announced and the live peers after each sync (the NodeAgent).
	Report func(announced []lbv1.AnnouncedAddress, livePeers []string)
	// Registry takes the speaker's metrics.
	Registry prometheus.Registerer
	// Leaving, asked when the speaker stops, says whether the node goes away for longer
	// than a restart (Portico removed, the node cordoned or shutting down): then it says it
	// is leaving, whatever RestartHold. Nil: never.
	Leaving func(context.Context) bool
}

// Speaker announces the LoadBalancer addresses this node wins; it is a manager Runnable.
type Speaker struct {
	Config
	client    client.Client
	cache     cache.Cache
	recorder  record.EventRecorder
	members   *members.Members
	announcer *l2.Announcer
	changed   chan struct{}

	// announced is what the last sync set up: address -> Service; told, the last problem
	// Event of each Service.
	announced map[netip.Addr]types.NamespacedName
	told      notice.Last[types.NamespacedName]
}

// addressedIndex indexes the Services that have LoadBalancer addresses: the only ones the
// speaker reads, so that a sync costs what the LoadBalancer Services cost, not every
// Service of the cluster (a list copies each).
const addressedIndex = "portico.l2.addressed"

// New returns a speaker reading mgr's cache; add it to mgr to run it.
func New(mgr ctrl.Manager, c Config) (*Speaker, error) {
	err := mgr.GetFieldIndexer().IndexField(context.Background(), &corev1.Service{}, addressedIndex, func(obj client.Object) []string {
		if svc := obj.(*corev1.Service); svc.Spec.Type == corev1.ServiceTypeLoadBalancer && len(svc.Status.LoadBalancer.Ingress) > 0 {
			return []string{"true"}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index Services with LoadBalancer addresses: %w", err)
	}
	rejected := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "portico_l2_heartbeats_rejected_total",
		Help: "Heartbeats from a peer's address refused: unauthenticated (not signed), forged (signed with another key) or stale (replayed)."},
		[]string{"reason"})
	if err := c.Registry.Register(rejected); err != nil {
		return nil, fmt.Errorf("register heartbeat metrics: %w", err)
	}
	refused := &refusals{log: ctrl.Log.WithName("heartbeats"), last: map[[2]string]time.Time{}}
	m, err := members.New(members.Config{Self: c.Node, Port: c.Port, Interval: c.Interval, DeadAfter: c.DeadAfter,
		Key: c.Key, Next: c.Next, Rejected: func(peer, why string) {
			rejected.WithLabelValues(why).Inc()
			refused.tell(peer, why)
		}})
	if err != nil {
		return nil, err
	}
	metrics, err := l2.NewMetrics(c.Registry)
	if err != nil {
		return nil, err
	}
	return &Speaker{Config: c, client: mgr.GetClient(), cache: mgr.GetCache(), recorder: mgr.GetEventRecorderFor("portico-agent"),
		members: m, announcer: l2.NewAnnouncer(metrics), changed: make(chan struct{}, 1),
		announced: map[netip.Addr]types.NamespacedName{}}, nil
}

// WarmedUp says whether the speaker has listened to its peers long enough to announce.
func (s *Speaker) WarmedUp() bool { return s.members.WarmedUp() }

func (s *Speaker) leaving() bool {
	if s.Leaving == nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return s.Leaving(ctx)
}

func (s *Speaker) poke() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// Start announces until ctx ends (a manager Runnable); then it stops answering first and
// tells its peers second that it restarts (they keep its addresses for RestartHold, or
// until it is back) or, when Portico is being removed, that it is leaving (they take over
// at once).
func (s *Speaker) Start(ctx context.Context) error {
	for _, obj := range []client.Object{&corev1.Service{}, &discoveryv1.EndpointSlice{}, &corev1.Node{}, &lbv1.LBPool{}} {
		inf, err := s.cache.GetInformer(ctx, obj)
		if err != nil {
			return fmt.Errorf("watch for L2 announcement: %w", err)
		}
		poke := func(any) { s.poke() }
		if _, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{AddFunc: poke, UpdateFunc: func(_, o any) { poke(o) }, DeleteFunc: poke}); err != nil {
			return fmt.Errorf("watch for L2 announcement: %w", err)
		}
	}
	// The peers come first: the warm-up, which starts with Run, must hear them. A restarted
	// agent whose first sync takes longer than the warm-up would otherwise decide before it
	// has heard anyone, and take the addresses of live peers.
	if !s.cache.WaitForCacheSync(ctx) {
		return nil
	}
	if err := s.setPeers(ctx); err != nil {
		return err
	}
	mctx, stopMembers := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan error, 1)
	go func() { done <- s.members.Run(mctx) }()
	stop := func() error {
		s.announcer.Close()
		if s.RestartHold > 0 && !s.leaving() {
			ctrl.LoggerFrom(ctx).Info("Stopping to restart: peers keep this node's addresses until it is back", "hold", s.RestartHold)
			s.members.RestartOnStop(s.RestartHold)
		} else {
			ctrl.LoggerFrom(ctx).Info("Stopping for good: peers take this node's addresses over")
		}
		stopMembers()
		return <-done
	}
	for waiting := true; waiting; {
		select {
		case <-s.Ready:
			waiting = false
		case <-s.changed:
			if err := s.setPeers(ctx); err != nil {
				ctrl.LoggerFrom(ctx).Error(err, "Failed to follow the peers")
			}
		case <-ctx.Done():
			return stop()
		case err := <-done:
			return err
		}
	}
	// Interfaces come and go without an event the agent watches: look again now and then.
	recheck := time.NewTicker(10 * time.Second)
	defer recheck.Stop()
	for {
		if err := s.sync(ctx); err != nil {
			ctrl.LoggerFrom(ctx).Error(err, "Failed to announce")
		}
		select {
		case <-ctx.Done():
			return stop()
		case err := <-done:
			s.announcer.Close()
			return err
		case <-s.changed:
		case <-s.members.Changed():
		case <-recheck.C:
		}
	}
}

// sync works out the addresses this node announces and sets them up.
func (s *Speaker) sync(ctx context.Context) error {
	in, err := s.inputs(ctx)
	if err != nil {
		return err
	}
	self := s.peers(in.Nodes)
	ready := s.members.WarmedUp()
	live := s.members.Live()
	var links []announce.Link
	if self != nil {
		links, err = localLinks(nodeIPs(self))
		if err != nil {
			return err
		}
	}
	addresses := announce.Addresses(in)
	ifaces, noInterface := announce.PoolInterfaces(links, addresses)
	held, problems := announce.View{Self: s.Node, Ready: ready, Live: live, Ifaces: ifaces}.Decide(addresses)
	byIface := map[string][]netip.Addr{}
	mine := make([]netip.Addr, 0, len(held))
	report := make([]lbv1.AnnouncedAddress, 0, len(held))
	for _, h := range held {
		mine = append(mine, h.IP)
		for _, i := range h.Interfaces {
			byIface[i] = append(byIface[i], h.IP)
		}
		report = append(report, lbv1.AnnouncedAddress{Address: h.IP.String(), Service: h.Service.String(), Interfaces: h.Interfaces})
	}
	hears := slices.Sorted(maps.Keys(live))
	if len(held) != len(s.announced) || slices.ContainsFunc(held, func(h announce.Holding) bool { _, ok := s.announced[h.IP]; return !ok }) {
		ctrl.LoggerFrom(ctx).Info("Announcing", "addresses", mine, "livePeers", hears, "warmedUp", ready)
	}
	err = s.announcer.Set(byIface)
	s.members.SetSelf(ready, members.Peer{Claims: mine, NoInterface: noInterface})
	s.Report(report, hears)
	s.tell(ctx, held, problems)
	return err
}

// tell writes an Event on each Service whose address this node has just taken over, and on
// each Service with a new problem.
func (s *Speaker) tell(ctx context.Context, held []announce.Holding, problems map[types.NamespacedName][]string) {
	now := map[netip.Addr]types.NamespacedName{}
	for _, h := range held {
		now[h.IP] = h.Service
		if s.announced[h.IP] != h.Service {
			s.event(ctx, h.Service, corev1.EventTypeNormal, "Announced", fmt.Sprintf("Node %s announces %s on %s", s.Node, h.IP, strings.Join(h.Interfaces, ",")))
		}
	}
	s.announced = now
	for svc, msgs := range problems {
		if msg := strings.Join(msgs, "; "); s.told.Changed(svc, msg) {
			s.event(ctx, svc, corev1.EventTypeWarning, "NotAnnounced", msg)
		}
	}
	s.told.Keep(func(svc types.NamespacedName) bool { _, ok := problems[svc]; return ok })
}

func (s *Speaker) event(ctx context.Context, name types.NamespacedName, kind, reason, msg string) {
	var svc corev1.Service
	if err := s.client.Get(ctx, name, &svc); err != nil {
		return // gone: nobody to tell
	}
	s.recorder.Event(&svc, kind, reason, msg)
}

// setPeers tells the heartbeats where every other agent is, from the Nodes.
func (s *Speaker) setPeers(ctx context.Context) error {
	var nodes corev1.NodeList
	if err := s.client.List(ctx, &nodes); err != nil {
		return fmt.Errorf("list Nodes for L2 announcement: %w", err)
	}
	in := make([]*corev1.Node, len(nodes.Items))
	for i := range nodes.Items {
		in[i] = &nodes.Items[i]
	}
	s.peers(in)
	return nil
}

// peers sets the heartbeats' peers from nodes and returns this node's Node (nil: none).
func (s *Speaker) peers(nodes []*corev1.Node) (self *corev1.Node) {
	peers := map[string][]netip.Addr{}
	for _, n := range nodes {
		if n.Name == s.Node {
			self = n
		}
		peers[n.Name] = nodeIPs(n)
	}
	s.members.SetPeers(peers)
	return self
}

// inputs reads what the decision needs from the cache.
func (s *Speaker) inputs(ctx context.Context) (announce.Inputs, error) {
	var pools lbv1.LBPoolList
	var services corev1.ServiceList
	var nodes corev1.NodeList
	for _, l := range []client.ObjectList{&pools, &nodes} {
		if err := s.client.List(ctx, l); err != nil {
			return announce.Inputs{}, fmt.Errorf("list for L2 announcement: %w", err)
		}
	}
	if err := s.client.List(ctx, &services, client.MatchingFields{addressedIndex: "true"}); err != nil {
		return announce.Inputs{}, fmt.Errorf("list LoadBalancer Services for L2 announcement: %w", err)
	}
	in := announce.Inputs{Pools: poolconfig.Parse(pools.Items), ProxyName: s.ProxyName,
		Slices: map[types.NamespacedName][]*discoveryv1.EndpointSlice{}}
	for i := range services.Items {
		svc := &services.Items[i]
		in.Services = append(in.Services, svc)
		if svc.Spec.ExternalTrafficPolicy != corev1.ServiceExternalTrafficPolicyLocal || len(svc.Status.LoadBalancer.Ingress) == 0 {
			continue
		}
		var es discoveryv1.EndpointSliceList
		if err := s.client.List(ctx, &es, client.InNamespace(svc.Namespace), client.MatchingFields{s.SliceIndex: svc.Name}); err != nil {
			return announce.Inputs{}, fmt.Errorf("list EndpointSlices: %w", err)
		}
		name := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
		for j := range es.Items {
			in.Slices[name] = append(in.Slices[name], &es.Items[j])
		}
	}
	for i := range nodes.Items {
		in.Nodes = append(in.Nodes, &nodes.Items[i])
	}
	return in, nil
}

// refusals logs refused heartbeats, once a minute per peer and reason: a peer with another
// key (or none) is refused ten times a second, and believed dead.
type refusals struct {
	log  logr.Logger
	mu   sync.Mutex
	last map[[2]string]time.Time
}

func (r *refusals) tell(peer, why string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := [2]string{peer, why}
	if time.Since(r.last[k]) < time.Minute {
		return
	}
	r.last[k] = time.Now()
	r.log.Info("Refusing heartbeats: the peer counts as dead while they are (docs/l2.md)", "peer", peer, "reason", why)
}

// nodeIPs are a Node's InternalIP addresses, IPv4 first: heartbeats go to the first.
func nodeIPs(n *corev1.Node) []netip.Addr {
	var out []netip.Addr
	for _, a := range n.Status.Addresses {
		if ip, err := netip.ParseAddr(a.Address); err == nil && a.Type == corev1.NodeInternalIP {
			out = append(out, ip)
		}
	}
	slices.SortStableFunc(out, func(a, b netip.Addr) int { return cmp.Compare(a.BitLen(), b.BitLen()) })
	return out
}

// localLinks lists the node's interfaces that can announce: up, Ethernet, not loopback.
func localLinks(nodeIPs []netip.Addr) ([]announce.Link, error) {
	ifaces, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var out []announce.Link
	for _, ifi := range ifaces {
		if ifi.Flags&net.FlagUp == 0 || ifi.Flags&net.FlagLoopback != 0 || len(ifi.HardwareAddr) != 6 {
			continue
		}
		l := announce.Link{Name: ifi.Name}
		addrs, err := ifi.Addrs()
		if err != nil {
			return nil, fmt.Errorf("addresses of %s: %w", ifi.Name, err)
		}
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil && slices.Contains(nodeIPs, p.Addr()) {
				l.Own = true
			}
		}
		out = append(out, l)
	}
	return out, nil
}
