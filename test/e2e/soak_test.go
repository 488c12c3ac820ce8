package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/wait"
)

// TestSoak changes a lab cluster at random for SOAK_DURATION (2 minutes unless set; `make
// soak` runs 30): Services' endpoints, Services deleted and created again, Maglev policies
// on and off, a second pool added and removed, agents restarted and crashed, the operator
// restarted, a node cut off from the API server and back. After each change settles it
// checks the invariants: no address is held by two Services; every Service answers from
// the client through each of its addresses and through every node's NodePort, from one
// of its endpoints; every NodeAgent is Ready with every Service
// programmed. The bound is settle (75 s), not wait.Timeout: an agent cut off from the API
// server again and again resumes its watches when client-go's backoff says, which grows
// with each failed attempt up to 30 s. A client meanwhile dials every Service continuously; its failures are
// counted, not asserted (a change takes the time it takes). node-3's agent is never
// restarted: its goroutines and memory at the end are checked against the first settle.
// SOAK_SEED replays a run.
func TestSoak(t *testing.T) {
	duration := 2 * time.Minute
	if v := os.Getenv("SOAK_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("SOAK_DURATION: %v", err)
		}
		duration = d
	}
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("SOAK_SEED"); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("SOAK_SEED: %v", err)
		}
		seed = s
	}
	c := start(t)
	t.Logf("soak for %v, SOAK_SEED=%d", duration, seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	s := &soak{c: c, rng: rng, members: map[string][]*lab.Pod{}}
	for i := range 6 {
		s.create(t, fmt.Sprintf("soak-%d", i))
	}
	s.check(t)
	baseline := c.usage(t, 2)
	stop := s.probe(t)

	actions := []struct {
		name string
		do   func(*testing.T) string
	}{
		{"endpoints", s.changeEndpoints}, {"endpoints", s.changeEndpoints}, {"endpoints", s.changeEndpoints},
		{"recreate", s.recreate}, {"policy", s.togglePolicy}, {"pool", s.togglePool},
		{"agent", s.restartAgent}, {"operator", s.restartOperator}, {"cut", s.cutNode},
	}
	counts := map[string]int{}
	for deadline := time.Now().Add(duration); time.Now().Before(deadline); {
		a := actions[rng.IntN(len(actions))]
		what := a.do(t)
		counts[a.name]++
		t.Logf("%s: %s", time.Now().Format("15:04:05.000"), what)
		s.check(t)
	}
	dials, failed, longest := stop()
	end := c.usage(t, 2)
	t.Logf("changes: %v", counts)
	t.Logf("continuous client: %d dials, %d failed, longest run of failures for one address %v", dials, failed, longest.Round(time.Millisecond))
	t.Logf("node-3's agent: goroutines %d -> %d, RSS %.0f -> %.0f MiB", baseline.goroutines, end.goroutines, baseline.rssMiB, end.rssMiB)
	if end.goroutines > baseline.goroutines+50 {
		t.Errorf("node-3's agent went from %d to %d goroutines", baseline.goroutines, end.goroutines)
	}
	if end.rssMiB > 1.5*baseline.rssMiB+32 {
		t.Errorf("node-3's agent went from %.0f to %.0f MiB", baseline.rssMiB, end.rssMiB)
	}
}

// soak is the state of TestSoak: which pods each Service selects, whether a policy or the
// second pool is there.
type soak struct {
	c       *cluster
	rng     *rand.Rand
	mu      sync.Mutex // members, read by the prober
	members map[string][]*lab.Pod
	policy  map[string]bool
	pool    bool
}

func (s *soak) names() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for name := range s.members {
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}

func (s *soak) pick() string {
	names := s.names()
	return names[s.rng.IntN(len(names))]
}

// subset is a random non-empty set of the web pods.
func (s *soak) subset() []*lab.Pod {
	for {
		var out []*lab.Pod
		for _, p := range s.c.web {
			if s.rng.IntN(2) == 0 {
				out = append(out, p)
			}
		}
		if len(out) > 0 {
			return out
		}
	}
}

func (s *soak) create(t *testing.T, name string) {
	s.c.service(t, name, func(svc *corev1.Service) { svc.Spec.Type = corev1.ServiceTypeLoadBalancer })
	pods := s.subset()
	s.c.endpoints(t, name, pods...)
	s.mu.Lock()
	s.members[name] = pods
	s.mu.Unlock()
}

func (s *soak) changeEndpoints(t *testing.T) string {
	name, pods := s.pick(), s.subset()
	s.c.endpoints(t, name, pods...)
	s.mu.Lock()
	s.members[name] = pods
	s.mu.Unlock()
	return fmt.Sprintf("%s now selects %s", name, names(pods))
}

func (s *soak) recreate(t *testing.T) string {
	name := s.pick()
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name}}
	if err := s.c.c.Delete(context.Background(), svc); err != nil {
		t.Fatal(err)
	}
	wait.For(t, name+" deleted", func() error {
		if err := s.c.c.Get(context.Background(), client.ObjectKeyFromObject(svc), svc); err == nil {
			return fmt.Errorf("still there")
		}
		return nil
	})
	s.mu.Lock()
	delete(s.members, name)
	s.mu.Unlock()
	s.create(t, name)
	return "deleted and created " + name
}

func (s *soak) togglePolicy(t *testing.T) string {
	name := s.pick()
	if s.policy == nil {
		s.policy = map[string]bool{}
	}
	p := &lbv1.ServicePolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name}, Spec: lbv1.ServicePolicySpec{
		TargetRefs:    []lbv1.ServiceTargetReference{{Name: name}},
		LoadBalancing: &lbv1.LoadBalancing{Algorithm: lbv1.AlgorithmMaglev}}}
	if s.policy[name] {
		if err := s.c.c.Delete(context.Background(), p); err != nil {
			t.Fatal(err)
		}
		s.policy[name] = false
		return "Maglev off for " + name
	}
	if err := s.c.c.Create(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	s.policy[name] = true
	return "Maglev on for " + name
}

// togglePool adds a second pool on the segment, or removes it: the Services that had its
// addresses get others.
func (s *soak) togglePool(t *testing.T) string {
	pool := &lbv1.LBPool{ObjectMeta: metav1.ObjectMeta{Name: "soak-extra"}, Spec: lbv1.LBPoolSpec{
		Blocks: []lbv1.IPBlock{{CIDR: "192.0.2.64/29"}, {CIDR: "2001:db8::200/125"}}}}
	if s.pool {
		if err := s.c.c.Delete(context.Background(), pool); err != nil {
			t.Fatal(err)
		}
		s.pool = false
		return "pool soak-extra removed"
	}
	if err := s.c.c.Create(context.Background(), pool); err != nil {
		t.Fatal(err)
	}
	s.pool = true
	return "pool soak-extra added"
}

// restartAgent stops or crashes node-1's or node-2's agent and starts it again.
func (s *soak) restartAgent(t *testing.T) string {
	i := s.rng.IntN(2)
	how, stop := "restarted", (*lab.Process).Stop
	if s.rng.IntN(2) == 0 {
		how, stop = "crashed and started", (*lab.Process).Kill
	}
	if err := stop(s.c.lab.Agents[i]); err != nil {
		t.Fatal(err)
	}
	s.c.restartAgent(t, i)
	return fmt.Sprintf("%s's agent %s", s.c.net.Nodes[i].Name, how)
}

func (s *soak) restartOperator(t *testing.T) string {
	if err := s.c.lab.RestartOperator(); err != nil {
		t.Fatal(err)
	}
	return "operator restarted"
}

// cutNode cuts a node off from the API server for a few seconds while a Service changes.
func (s *soak) cutNode(t *testing.T) string {
	i := s.rng.IntN(len(s.c.net.Nodes))
	s.c.lab.DisconnectAPI(i)
	what := s.changeEndpoints(t)
	time.Sleep(time.Duration(1+s.rng.IntN(4)) * time.Second)
	if err := s.c.lab.ConnectAPI(i); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%s cut off from the API server while %s, and back", s.c.net.Nodes[i].Name, what)
}

// settle bounds how long each invariant may take to hold again after a change: the
// change's own propagation, plus up to 30 s of a cut-off agent's watch backoff.
const settle = 75 * time.Second

// check waits for the invariants to hold (each within settle).
func (s *soak) check(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	services := map[string]*corev1.Service{}
	wait.Within(t, settle, "every Service with an address per family, none held twice", func() error {
		var list corev1.ServiceList
		if err := s.c.c.List(ctx, &list, client.InNamespace("default")); err != nil {
			return err
		}
		held := map[netip.Addr]string{}
		for i := range list.Items {
			svc := &list.Items[i]
			if svc.Spec.Type != corev1.ServiceTypeLoadBalancer {
				continue
			}
			ips := loadbalancer.IngressIPs(svc)
			if len(ips) != 2 {
				return fmt.Errorf("%s has addresses %v", svc.Name, ips)
			}
			for _, a := range ips {
				if other, ok := held[a]; ok {
					return fmt.Errorf("%s is held by %s and %s", a, other, svc.Name)
				}
				held[a] = svc.Name
			}
			services[svc.Name] = svc
		}
		return nil
	})
	for _, node := range s.c.net.Nodes {
		wait.Within(t, settle, node.Name+"'s NodeAgent Ready with every Service", func() error {
			var agent lbv1.NodeAgent
			if err := s.c.c.Get(ctx, client.ObjectKey{Name: node.Name}, &agent); err != nil {
				return err
			}
			if !meta.IsStatusConditionTrue(agent.Status.Conditions, lbv1.ConditionReady) || agent.Status.Services < int32(len(services)) {
				return fmt.Errorf("Ready %v, %d Services programmed, want %d", meta.FindStatusCondition(agent.Status.Conditions, lbv1.ConditionReady), agent.Status.Services, len(services))
			}
			return nil
		})
	}
	for _, name := range s.names() {
		svc := services[name]
		s.mu.Lock()
		pods := s.members[name]
		s.mu.Unlock()
		for f := range families {
			targets := []netip.AddrPort{}
			for _, a := range loadbalancer.IngressIPs(svc) {
				if a.Is4() == (f == 0) {
					targets = append(targets, netip.AddrPortFrom(a, 80))
				}
			}
			for _, node := range s.c.net.Nodes {
				targets = append(targets, netip.AddrPortFrom(node.IPs[f], uint16(svc.Spec.Ports[0].NodePort)))
			}
			for _, to := range targets {
				wait.Within(t, settle, fmt.Sprintf("%s through %s", name, to), func() error {
					answer, err := s.c.dial(netip.AddrPort{}, to)
					if err != nil {
						return err
					}
					_, err = answeredBy(answer, f, pods...)
					return err
				})
			}
		}
	}
}

// probe dials every Service's addresses in turn until the returned stop is called, which
// says how many dials there were, how many failed, and the longest run of failures of one
// address.
func (s *soak) probe(t *testing.T) (stop func() (dials, failed int, longest time.Duration)) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	var dials, failed int
	var longest time.Duration
	wg.Add(1)
	go func() {
		defer wg.Done()
		failingSince := map[netip.AddrPort]time.Time{}
		for {
			// An address no Service holds any more has no run of failures going on.
			dialed := map[netip.AddrPort]bool{}
			for _, name := range s.names() {
				select {
				case <-done:
					return
				default:
				}
				var svc corev1.Service
				if err := s.c.c.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: name}, &svc); err != nil {
					continue
				}
				for _, a := range loadbalancer.IngressIPs(&svc) {
					to := netip.AddrPortFrom(a, 80)
					dialed[to] = true
					conn, err := s.c.connectWithin(netip.AddrPort{}, to, 500*time.Millisecond)
					if err == nil {
						_, err = exchange(conn)
						conn.Close()
					}
					dials++
					if err != nil {
						failed++
						if failingSince[to].IsZero() {
							failingSince[to] = time.Now()
						}
						longest = max(longest, time.Since(failingSince[to]))
					} else {
						delete(failingSince, to)
					}
				}
			}
			for a := range failingSince {
				if !dialed[a] {
					delete(failingSince, a)
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	return func() (int, int, time.Duration) {
		close(done)
		wg.Wait()
		return dials, failed, longest
	}
}

// usage is a process's goroutines and resident memory.
type usage struct {
	goroutines int
	rssMiB     float64
}

// usage reads node i's agent's goroutines and memory from its metrics, after a collection.
func (c *cluster) usage(t *testing.T, i int) usage {
	t.Helper()
	return usage{goroutines: int(agentMetric(t, c.net.Nodes[i], "go_goroutines")),
		rssMiB: agentMetric(t, c.net.Nodes[i], "process_resident_memory_bytes") / (1 << 20)}
}
