package agent

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/loadbalancer"
)

// +kubebuilder:rbac:groups=lb.portico.dev,resources=nodeagents,verbs=get;create;patch
// +kubebuilder:rbac:groups=lb.portico.dev,resources=nodeagents/status,verbs=patch

// fieldOwner is the agent's name in managed fields.
const fieldOwner = "portico-agent"

// reporter keeps the node's NodeAgent equal to what the agent programmed: written once the
// first sync is done, then after changes, at most once per interval. The operator reads it
// for the policies' Programmed condition; users read it with kubectl get nodeagents.
type reporter struct {
	client   client.Client
	node     string
	version  string
	syncer   *loadbalancer.Syncer
	ready    <-chan struct{}
	interval time.Duration
	changed  chan struct{}
	// full is the MapsFull condition last reported, for its transition time (Start's
	// goroutine only).
	full metav1.Condition

	mu            sync.Mutex
	policies      map[types.NamespacedName][]lbv1.ProgrammedPolicy // by Service
	announcements []lbv1.AnnouncedAddress
	livePeers     []string
	stale         bool // the NodeAgent may differ from what was last written
}

func newReporter(c client.Client, node, version string, syncer *loadbalancer.Syncer, ready <-chan struct{}) *reporter {
	return &reporter{client: c, node: node, version: version, syncer: syncer, ready: ready, interval: time.Second,
		changed: make(chan struct{}, 1), policies: map[types.NamespacedName][]lbv1.ProgrammedPolicy{}}
}

// setPolicies records the policies programmed for a Service and schedules a write.
func (p *reporter) setPolicies(svc types.NamespacedName, pols []lbv1.ProgrammedPolicy) {
	p.mu.Lock()
	if len(pols) == 0 {
		delete(p.policies, svc)
	} else {
		p.policies[svc] = pols
	}
	p.mu.Unlock()
	p.poke()
}

// setL2 records the addresses the node announces and the peers it hears, and schedules a
// write.
func (p *reporter) setL2(a []lbv1.AnnouncedAddress, livePeers []string) {
	p.mu.Lock()
	p.announcements, p.livePeers = a, livePeers
	p.mu.Unlock()
	p.poke()
}

// rewrite schedules a write even if nothing changed: someone else (the operator marking a
// lost agent) may have changed the NodeAgent.
func (p *reporter) rewrite() {
	p.mu.Lock()
	p.stale = true
	p.mu.Unlock()
	p.poke()
}

// poke schedules a write.
func (p *reporter) poke() {
	select {
	case p.changed <- struct{}{}:
	default:
	}
}

// Start writes the NodeAgent until ctx ends (a manager Runnable). A failed write is tried
// again after five intervals.
func (p *reporter) Start(ctx context.Context) error {
	select {
	case <-p.ready:
	case <-ctx.Done():
		return nil
	}
	since := metav1.Now()
	var last *lbv1.NodeAgentStatus
	for {
		status := p.status(since)
		wait := p.interval
		p.mu.Lock()
		stale := p.stale
		p.stale = false
		p.mu.Unlock()
		if last == nil || stale || !equality.Semantic.DeepEqual(*last, status) {
			if err := p.write(ctx, status); err != nil {
				ctrl.LoggerFrom(ctx).Error(err, "Failed to report to the NodeAgent")
				wait = 5 * p.interval
				p.rewrite()
			} else {
				last = &status
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		select {
		case <-ctx.Done():
			return nil
		case <-p.changed:
		}
	}
}

func (p *reporter) status(since metav1.Time) lbv1.NodeAgentStatus {
	services, frontends := p.syncer.Counts()
	s := lbv1.NodeAgentStatus{
		Conditions: []metav1.Condition{{Type: lbv1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Synced", LastTransitionTime: since,
			Message: "the datapath follows the API server's Services, EndpointSlices and ServicePolicies"}},
		Version: p.version, Services: int32(services), Frontends: int32(frontends),
	}
	full := metav1.Condition{Type: lbv1.ConditionMapsFull, Status: metav1.ConditionFalse, Reason: "Room",
		Message: "every Service fits in the datapath's maps"}
	if n := p.syncer.Waiting(); n > 0 {
		full.Status, full.Reason = metav1.ConditionTrue, "ServicesWaiting"
		full.Message = fmt.Sprintf("%d Services do not fit in the datapath's maps; they are programmed as others free room (agent flags --service-map-size, --backend-map-size; docs/datapath.md)", n)
	}
	full.LastTransitionTime = since
	if p.full.Type != "" {
		full.LastTransitionTime = p.full.LastTransitionTime
		if p.full.Status != full.Status {
			full.LastTransitionTime = metav1.Now()
		}
	}
	p.full = full
	s.Conditions = append(s.Conditions, full)
	p.mu.Lock()
	s.Announcements, s.LivePeers = p.announcements, p.livePeers
	seen := map[lbv1.ProgrammedPolicy]bool{}
	for _, pols := range p.policies {
		for _, pol := range pols {
			if !seen[pol] {
				seen[pol] = true
				s.Policies = append(s.Policies, pol)
			}
		}
	}
	p.mu.Unlock()
	slices.SortFunc(s.Policies, func(a, b lbv1.ProgrammedPolicy) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name), cmp.Compare(a.Generation, b.Generation))
	})
	return s
}

// write applies the NodeAgent (owned by the Node, so that it goes with it) and its status.
func (p *reporter) write(ctx context.Context, status lbv1.NodeAgentStatus) error {
	obj := &lbv1.NodeAgent{
		TypeMeta:   metav1.TypeMeta{APIVersion: lbv1.GroupVersion.String(), Kind: "NodeAgent"},
		ObjectMeta: metav1.ObjectMeta{Name: p.node},
	}
	var node corev1.Node
	if err := p.client.Get(ctx, types.NamespacedName{Name: p.node}, &node); err == nil {
		obj.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}}
	}
	if err := p.client.Patch(ctx, obj, client.Apply, client.FieldOwner(fieldOwner), client.ForceOwnership); err != nil {
		return fmt.Errorf("apply NodeAgent %s: %w", p.node, err)
	}
	applied := &lbv1.NodeAgent{TypeMeta: obj.TypeMeta, ObjectMeta: metav1.ObjectMeta{Name: p.node}, Status: status}
	if err := p.client.Status().Patch(ctx, applied, client.Apply, client.FieldOwner(fieldOwner), client.ForceOwnership); err != nil {
		return fmt.Errorf("apply NodeAgent %s status: %w", p.node, err)
	}
	return nil
}
