package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	appsv1 "k8s.io/api/apps/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/manager"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/datapath"
	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/internal/loadbalancer/lbtest"
	"github.com/portico-dev/portico/test/harness/nstest"
	"github.com/portico-dev/portico/test/harness/testenv"
	"github.com/portico-dev/portico/test/harness/wait"
)

// node is a client namespace standing for a node's pods, its own cgroup with Portico's
// socket programs, and a backend namespace on a veth pair. The client namespace has no
// route to Service addresses: untranslated, they are unreachable.
type node struct {
	t *testing.T
	*nstest.Pair
	backend netip.AddrPort
	// serviceEntries sizes the datapath's service maps (0: the default).
	serviceEntries uint32
}

func newNode(t *testing.T) *node {
	p := nstest.NewPair(t, "pta", 8080, netip.MustParsePrefix("10.251.0.0/30"))
	return &node{t: t, Pair: p, backend: p.Backends[0]}
}

// bash prepares a bash script in the client namespace and cgroup; the caller closes the
// cgroup file once the process has started.
func (n *node) bash(script string) (*exec.Cmd, *os.File) {
	n.t.Helper()
	return n.Command(n.t, "bash", "-c", script)
}

// dial connects from a process in the client namespace and cgroup (bash's /dev/tcp), sends
// a line and returns the reply or the error.
func (n *node) dial(to netip.AddrPort) string {
	cmd, cg := n.bash(fmt.Sprintf("exec 3<>/dev/tcp/%s/%d && echo hello >&3 && read -t 2 line <&3 && echo \"$line\"", to.Addr(), to.Port()))
	defer cg.Close()
	out, _ := cmd.CombinedOutput()
	return strings.TrimSpace(string(out))
}

// eventually dials until the answer contains want, for up to 10 seconds.
func (n *node) eventually(to netip.AddrPort, want string) {
	n.t.Helper()
	var got string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if got = n.dial(to); strings.Contains(got, want) {
			return
		}
	}
	n.t.Fatalf("dial %s: got %q, want %q", to, got, want)
}

// create creates objects in the API server.
func create(t *testing.T, c client.Client, objs ...client.Object) {
	t.Helper()
	for _, obj := range objs {
		if err := c.Create(context.Background(), obj); err != nil {
			t.Fatal(err)
		}
	}
}

// run starts a manager and returns what stops it (also at the end of the test).
func run(t *testing.T, mgr manager.Manager) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan error)
	go func() { stopped <- mgr.Start(ctx) }()
	stop = sync.OnceFunc(func() {
		cancel()
		if err := <-stopped; err != nil {
			t.Errorf("agent: %v", err)
		}
	})
	t.Cleanup(stop)
	return stop
}

// startAgent loads the datapath (pinned under pins when set), attaches it to the node's
// cgroup and runs an agent for node n1 on it, with its metrics in reg. stop ends the agent
// and closes the datapath; pins stay.
func (n *node) startAgent(env *testenv.Env, pins string) (stop func(), reg *prometheus.Registry) {
	n.t.Helper()
	dp, err := datapath.Load(datapath.Options{PinDir: pins, ServiceEntries: n.serviceEntries})
	if err != nil {
		n.t.Fatal(err)
	}
	if err := dp.AttachCgroup(n.Cgroup); err != nil {
		_ = dp.Close()
		n.t.Fatal(err)
	}
	reg = prometheus.NewRegistry()
	mgr, err := NewManager(env.Config, dp, Options{NodeName: "n1", MetricsAddr: "0", ProbeAddr: "0", SeveralPerProcess: true, Registry: reg, HealthCheckAddr: "127.0.0.1"})
	if err != nil {
		_ = dp.Close()
		n.t.Fatal(err)
	}
	stopAgent := run(n.t, mgr)
	stop = sync.OnceFunc(func() { stopAgent(); _ = dp.Close() })
	n.t.Cleanup(stop)
	return stop, reg
}

// metric returns the value of a gauge, or the sample count of a histogram with the label
// kind=service, in reg.
func metric(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			if m.GetGauge() != nil {
				return m.GetGauge().GetValue()
			}
			for _, l := range m.GetLabel() {
				if l.GetName() == "kind" && l.GetValue() == "service" {
					return float64(m.GetHistogram().GetSampleCount())
				}
			}
		}
	}
	return 0
}

// web is a ClusterIP Service on vip with a named target port, and its EndpointSlice with
// the node's backend (on another node).
func (n *node) web(vip netip.AddrPort) (*corev1.Service, *discoveryv1.EndpointSlice) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default"},
		Spec: corev1.ServiceSpec{ClusterIP: vip.Addr().String(),
			Ports: []corev1.ServicePort{{Name: "http", Port: int32(vip.Port()), TargetPort: intstr.FromString("http")}}},
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-1", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(int32(n.backend.Port()))}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{n.backend.Addr().String()}, NodeName: ptr.To("n2")}},
	}
	return svc, slice
}

func TestAgentProgramsServicesFromTheAPI(t *testing.T) {
	n := newNode(t)
	env := testenv.StartFor(t)
	_, reg := n.startAgent(env, "")
	ctx, c := context.Background(), env.Client
	vip := netip.MustParseAddrPort("10.96.7.7:80")
	svc, slice := n.web(vip)
	create(t, c, svc, slice)
	// The Service and its endpoint arrive: connections reach the backend.
	n.eventually(vip, "from "+n.backend.String())
	// The API server's own Service, default/kubernetes, is programmed too. (The first sync may
	// have programmed the Service before its own reconcile ran: wait for that to count.)
	var s, f, syncs float64
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if s, f, syncs = metric(t, reg, "portico_agent_services"), metric(t, reg, "portico_agent_frontends"), metric(t, reg, "portico_agent_sync_duration_seconds"); s == 2 && f == 2 && syncs > 0 {
			break
		}
	}
	if s != 2 || f != 2 || syncs == 0 {
		t.Errorf("metrics: %v services, %v frontends, %v syncs; want 2, 2, some", s, f, syncs)
	}

	// No endpoint left: refused, at once.
	slice.Endpoints = nil
	if err := c.Update(ctx, slice); err != nil {
		t.Fatal(err)
	}
	n.eventually(vip, "refused")

	// The endpoint is back, then the Service goes: the address is nobody's again.
	slice.Endpoints = []discoveryv1.Endpoint{{Addresses: []string{n.backend.Addr().String()}}}
	if err := c.Update(ctx, slice); err != nil {
		t.Fatal(err)
	}
	n.eventually(vip, "from "+n.backend.String())
	if err := c.Delete(ctx, svc); err != nil {
		t.Fatal(err)
	}
	n.eventually(vip, "unreachable")
	if s, f := metric(t, reg, "portico_agent_services"), metric(t, reg, "portico_agent_frontends"); s != 1 || f != 1 {
		t.Errorf("metrics after the delete: %v services, %v frontends", s, f)
	}
}

// TestAgentRestartKeepsServing stops the agent with a connection open, checks that the
// pinned datapath goes on translating while no agent runs, and that a new agent adopts it
// and follows the API again; the connection lives through it all.
func TestAgentRestartKeepsServing(t *testing.T) {
	n := newNode(t)
	env := testenv.StartFor(t)
	pins := filepath.Join(nstest.BPFFS(t), "n1")
	stop, _ := n.startAgent(env, pins)
	ctx, c := context.Background(), env.Client
	vip := netip.MustParseAddrPort("10.96.7.8:80")
	svc, slice := n.web(vip)
	create(t, c, svc, slice)
	n.eventually(vip, "from "+n.backend.String())
	say, replies := n.hold(vip)
	if got := replies(); !strings.Contains(got, "from "+n.backend.String()) {
		t.Fatalf("held connection: %q", got)
	}

	stop()
	if got := n.dial(vip); !strings.Contains(got, "from "+n.backend.String()) {
		t.Fatalf("with no agent running: %q", got)
	}
	n.startAgent(env, pins)
	slice.Endpoints = nil
	if err := c.Update(ctx, slice); err != nil {
		t.Fatal(err)
	}
	n.eventually(vip, "refused")
	say()
	if got := replies(); !strings.Contains(got, "from "+n.backend.String()) {
		t.Fatalf("held connection after the restart: %q", got)
	}
}

// hold opens a connection from the client namespace and cgroup and exchanges a line on it;
// say makes it exchange another on the same connection; replies returns the next reply.
func (n *node) hold(to netip.AddrPort) (say func(), replies func() string) {
	n.t.Helper()
	cmd, cg := n.bash(fmt.Sprintf("exec 3<>/dev/tcp/%s/%d || exit 1; for i in 1 2; do echo hello >&3; read -t 5 line <&3; echo \"$line\"; read -t 30 go; done", to.Addr(), to.Port()))
	defer cg.Close()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		n.t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		n.t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	lines := bufio.NewScanner(stdout)
	return func() { fmt.Fprintln(stdin, "go") }, func() string {
		if !lines.Scan() {
			return "client ended: " + fmt.Sprint(lines.Err())
		}
		return lines.Text()
	}
}

// TestAgentHealthCheckNodePort checks the health check of an externalTrafficPolicy Local
// Service: 200 with a ready endpoint on this node, 503 without, gone with the Service.
func TestAgentHealthCheckNodePort(t *testing.T) {
	n := newNode(t)
	env := testenv.StartFor(t)
	n.startAgent(env, "")
	ctx, c := context.Background(), env.Client
	svc, slice := n.web(netip.MustParseAddrPort("10.96.7.9:80"))
	svc.Spec.Type = corev1.ServiceTypeLoadBalancer
	svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	slice.Endpoints[0].NodeName = ptr.To("n1")
	create(t, c, svc, slice)
	url := fmt.Sprintf("http://127.0.0.1:%d/", svc.Spec.HealthCheckNodePort) // allocated by the API server
	check := func(wantCode int, wantBody string) {
		t.Helper()
		var got string
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			resp, err := http.Get(url)
			if err != nil {
				got = err.Error()
				if wantCode == 0 && strings.Contains(got, "refused") {
					return
				}
				continue
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			got = fmt.Sprintf("%d %s", resp.StatusCode, body)
			if resp.StatusCode == wantCode && strings.Contains(string(body), wantBody) {
				return
			}
		}
		t.Fatalf("GET %s: %s; want %d with %s", url, got, wantCode, wantBody)
	}
	check(http.StatusOK, `"localEndpoints":1`)

	slice.Endpoints[0].NodeName = ptr.To("n2")
	if err := c.Update(ctx, slice); err != nil {
		t.Fatal(err)
	}
	check(http.StatusServiceUnavailable, `"localEndpoints":0`)

	if err := c.Delete(ctx, svc); err != nil {
		t.Fatal(err)
	}
	check(0, "") // connection refused: nothing listens any more
}

// TestAgentAppliesServicePolicies runs an agent on a recording datapath (the translation
// itself is tested with real traffic above) and checks that the ServicePolicy that applies
// to a Service sets its frontends, that what the node cannot do becomes an Event, and that
// removing the policy restores the Service's own settings.
func TestAgentAppliesServicePolicies(t *testing.T) {
	env := testenv.StartFor(t)
	rec := &lbtest.Recorder{}
	mgr, err := NewManager(env.Config, rec, Options{NodeName: "n1", MetricsAddr: "0", ProbeAddr: "0", SeveralPerProcess: true,
		Registry: prometheus.NewRegistry(), Recheck: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	run(t, mgr)
	ctx, c := context.Background(), env.Client
	vip := netip.MustParseAddrPort("10.96.8.1:80")
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default"},
		Spec:       corev1.ServiceSpec{ClusterIP: vip.Addr().String(), Ports: []corev1.ServicePort{{Port: 80}}},
	}
	pol := &lbv1.ServicePolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "sticky", Namespace: "default"},
		Spec: lbv1.ServicePolicySpec{
			TargetRefs:      []lbv1.ServiceTargetReference{{Name: "web"}},
			LoadBalancing:   &lbv1.LoadBalancing{Algorithm: lbv1.AlgorithmMaglev},
			SessionAffinity: &lbv1.SessionAffinity{Type: "ClientIP", TimeoutSeconds: ptr.To(int32(60))},
			Acceleration:    "Native",
		},
	}
	create(t, c, svc, pol)
	programmed := func(what string, ok func(loadbalancer.Frontend) bool) {
		t.Helper()
		var f loadbalancer.Frontend
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			var found bool
			if f, found = rec.Frontend(vip); found && ok(f) {
				return
			}
		}
		t.Fatalf("%s: last programmed %+v", what, f)
	}
	programmed("Maglev with 60s affinity", func(f loadbalancer.Frontend) bool {
		return f.Balancing == loadbalancer.Maglev && f.Affinity == time.Minute
	})
	var events corev1.EventList
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if err := c.List(ctx, &events, client.InNamespace("default")); err != nil {
			t.Fatal(err)
		}
		if slices.ContainsFunc(events.Items, func(e corev1.Event) bool {
			return e.InvolvedObject.Name == "web" && e.Reason == "NotProgrammed" && strings.Contains(e.Message, "ServicePolicy sticky: acceleration Native")
		}) {
			break
		}
	}
	if !slices.ContainsFunc(events.Items, func(e corev1.Event) bool { return e.Reason == "NotProgrammed" }) {
		t.Errorf("no NotProgrammed Event for XDP; events: %v", events.Items)
	}
	// The Service is looked at again every 100 ms; the same problem is not told again.
	time.Sleep(time.Second)
	if err := c.List(ctx, &events, client.InNamespace("default")); err != nil {
		t.Fatal(err)
	}
	for _, e := range events.Items {
		if e.Reason == "NotProgrammed" && e.Count != 1 {
			t.Errorf("the NotProgrammed Event was told %d times: %s", e.Count, e.Message)
		}
	}

	if err := c.Delete(ctx, pol); err != nil {
		t.Fatal(err)
	}
	programmed("the Service's own settings", func(f loadbalancer.Frontend) bool {
		return f.Balancing == loadbalancer.Random && f.Affinity == 0
	})
}

// The agent keeps a Lease the operator reads to tell it is alive: renewed four times per
// duration, owned by nobody else, gone when the agent stops cleanly.
func TestAgentKeepsItsLease(t *testing.T) {
	env := testenv.StartFor(t)
	mgr, err := NewManager(env.Config, &lbtest.Recorder{}, Options{NodeName: "n1", MetricsAddr: "0", ProbeAddr: "0", SeveralPerProcess: true,
		Registry: prometheus.NewRegistry(), LeaseNamespace: "default", LeaseDuration: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	stop := run(t, mgr)
	ctx, key := context.Background(), client.ObjectKey{Namespace: "default", Name: lbv1.AgentLeasePrefix + "n1"}
	var renewals []time.Time
	for deadline := time.Now().Add(10 * time.Second); len(renewals) < 3 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		var l coordinationv1.Lease
		if err := env.Client.Get(ctx, key, &l); err != nil {
			continue
		}
		if *l.Spec.HolderIdentity != "n1" || *l.Spec.LeaseDurationSeconds != 1 {
			t.Fatalf("lease spec: %+v", l.Spec)
		}
		if r := l.Spec.RenewTime.Time; len(renewals) == 0 || r.After(renewals[len(renewals)-1]) {
			renewals = append(renewals, r)
		}
	}
	if len(renewals) < 3 {
		t.Fatalf("the Lease was renewed %d times in 10 s: %v", len(renewals), renewals)
	}
	stop()
	var l coordinationv1.Lease
	if err := env.Client.Get(ctx, key, &l); !apierrors.IsNotFound(err) {
		t.Errorf("the Lease outlives the agent that stopped: %v %+v", err, l.Spec)
	}
}

// An agent whose maps cannot hold every Service starts with the oldest ones (names decide
// among Services of the same second), says which wait (NodeAgent MapsFull, a metric, an
// Event), and programs a waiting Service as soon as another one frees room.
func TestAgentWithFullMaps(t *testing.T) {
	n := newNode(t)
	// default/kubernetes and two one-backend Services take 5 or 6 entries (the first has at
	// most one endpoint): a third does not fit.
	n.serviceEntries = 6
	env := testenv.StartFor(t)
	ctx, c := context.Background(), env.Client
	vips := map[string]netip.AddrPort{}
	for i, name := range []string{"web-a", "web-b", "web-c"} {
		vip := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, 8, byte(i + 1)}), 80)
		svc, slice := n.web(vip)
		svc.Name, slice.Name, slice.Labels[discoveryv1.LabelServiceName] = name, name+"-1", name
		create(t, c, svc, slice)
		vips[name] = vip
	}
	_, reg := n.startAgent(env, "")
	n.eventually(vips["web-a"], "from "+n.backend.String())
	n.eventually(vips["web-b"], "from "+n.backend.String())
	if got := n.dial(vips["web-c"]); !strings.Contains(got, "unreachable") {
		t.Fatalf("web-c, which does not fit: %q", got)
	}
	mapsFull := func(want metav1.ConditionStatus) error {
		var na lbv1.NodeAgent
		if err := c.Get(ctx, types.NamespacedName{Name: "n1"}, &na); err != nil {
			return err
		}
		if cond := meta.FindStatusCondition(na.Status.Conditions, lbv1.ConditionMapsFull); cond == nil || cond.Status != want {
			return fmt.Errorf("NodeAgent conditions %+v; want MapsFull %s", na.Status.Conditions, want)
		}
		return nil
	}
	wait.For(t, "the NodeAgent says the maps are full", func() error { return mapsFull(metav1.ConditionTrue) })
	if w := metric(t, reg, "portico_agent_services_waiting_for_room"); w != 1 {
		t.Errorf("%v Services waiting for room; want 1", w)
	}
	wait.For(t, "an Event on web-c", func() error {
		var evs corev1.EventList
		if err := c.List(ctx, &evs, client.InNamespace("default")); err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.InvolvedObject.Name == "web-c" && e.Reason == "ProgrammingFailed" && strings.Contains(e.Message, "full") {
				return nil
			}
		}
		return errors.New("no ProgrammingFailed Event on web-c")
	})

	// web-a goes: web-c takes its room (TestResyncLeavesOutTheYoungestWhenFull checks that the
	// change that frees room names the waiting Services, rather than leaving them to backoff).
	var a corev1.Service
	if err := c.Get(ctx, types.NamespacedName{Namespace: "default", Name: "web-a"}, &a); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, &a); err != nil {
		t.Fatal(err)
	}
	n.eventually(vips["web-c"], "from "+n.backend.String())
	wait.For(t, "the NodeAgent says there is room", func() error { return mapsFull(metav1.ConditionFalse) })
}

// The agent tells an uninstall (its DaemonSet gone, or being deleted) from a rolling update
// or a restart (the DaemonSet still there).
func TestRemovedFollowsTheDaemonSet(t *testing.T) {
	env := testenv.StartFor(t)
	ctx, c := context.Background(), env.Client
	key := types.NamespacedName{Namespace: "default", Name: "portico-agent"}
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name, Finalizers: []string{"portico.dev/test"}},
		Spec: appsv1.DaemonSetSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "agent"}},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "agent"}},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "agent", Image: "agent"}}}}}}
	removed := func(want bool, step string) {
		t.Helper()
		if got, err := Removed(ctx, c, key); err != nil || got != want {
			t.Fatalf("%s: Removed = %v, %v; want %v", step, got, err, want)
		}
	}
	create(t, c, ds)
	removed(false, "the DaemonSet is there (a rolling update, a restart)")
	if err := c.Delete(ctx, ds); err != nil {
		t.Fatal(err)
	}
	removed(true, "the DaemonSet is being deleted")
	if err := c.Get(ctx, key, ds); err != nil {
		t.Fatal(err)
	}
	ds.Finalizers = nil
	if err := c.Update(ctx, ds); err != nil {
		t.Fatal(err)
	}
	removed(true, "the DaemonSet is gone")
}

// A stopping agent keeps its L2 addresses for its return only when its node stays: not when
// Portico is being removed, the node is cordoned or not Ready, or it cannot tell.
func TestLeavingFollowsTheNodeAndTheDaemonSet(t *testing.T) {
	env := testenv.StartFor(t)
	ctx, c := context.Background(), env.Client
	ds := types.NamespacedName{Namespace: "default", Name: "portico-agent"}
	leaving := func(want bool, step string) {
		t.Helper()
		if got := Leaving(ctx, c, "node-1", ds); got != want {
			t.Fatalf("%s: Leaving = %v, want %v", step, got, want)
		}
	}
	leaving(true, "no Node")
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}}
	create(t, c, node)
	node.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
	if err := c.Status().Update(ctx, node); err != nil {
		t.Fatal(err)
	}
	leaving(true, "a Ready node without the DaemonSet (Portico removed)")
	create(t, c, &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ds.Namespace, Name: ds.Name},
		Spec: appsv1.DaemonSetSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "agent"}},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "agent"}},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "agent", Image: "agent"}}}}}})
	leaving(false, "a Ready node and the DaemonSet (a restart)")
	if got := Leaving(ctx, c, "node-1", types.NamespacedName{}); got {
		t.Fatal("a Ready node, no DaemonSet named: Leaving = true, want false")
	}
	node.Status.Conditions[0].Status = corev1.ConditionFalse
	if err := c.Status().Update(ctx, node); err != nil {
		t.Fatal(err)
	}
	leaving(true, "a node that is not Ready (shutting down)")
	node.Status.Conditions[0].Status = corev1.ConditionTrue
	if err := c.Status().Update(ctx, node); err != nil {
		t.Fatal(err)
	}
	node.Spec.Unschedulable = true
	if err := c.Update(ctx, node); err != nil {
		t.Fatal(err)
	}
	leaving(true, "a cordoned node")
}
