package operator_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/controller/servicelb"
	"github.com/portico-dev/portico/internal/operator"
	"github.com/portico-dev/portico/test/harness/testenv"
	"github.com/portico-dev/portico/test/harness/wait"
)

var env *testenv.Env

func TestMain(m *testing.M) {
	flag.Parse()
	switch {
	case testing.Short():
		fmt.Println("SKIP: -short: the envtest suites need kube-apiserver and etcd")
		os.Exit(0)
	case testenv.Assets() == "":
		fmt.Println("SKIP: envtest suites need kube-apiserver and etcd: run `make test` (it provisions them) or set KUBEBUILDER_ASSETS")
		os.Exit(0)
	}
	ctrl.SetLogger(zap.New(zap.WriteTo(os.Stderr), zap.Level(zapcore.ErrorLevel)))
	var err error
	if env, err = testenv.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	if err := env.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "stop envtest:", err)
	}
	os.Exit(code)
}

var classless = servicelb.Class{Name: lbv1.LoadBalancerClass, ClaimClassless: true}

// startOperator runs the operator until the test ends (or stop is called).
func startOperator(t *testing.T, o operator.Options) (stop func()) {
	t.Helper()
	o.MetricsAddr, o.ProbeAddr, o.SeveralPerProcess = "0", "0", true
	if o.Class.Name == "" {
		o.Class = classless
	}
	mgr, err := operator.NewManager(env.Config, o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	var once atomic.Bool
	stop = func() {
		if once.Swap(true) {
			return
		}
		cancel()
		if err := <-done; err != nil {
			t.Errorf("operator stopped with an error: %v", err)
		}
	}
	t.Cleanup(stop)
	return stop
}

var seq atomic.Int64

// fixture is one test's namespace and pools; pools select only that namespace so that tests
// cannot take each other's addresses.
type fixture struct {
	t  *testing.T
	ns string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ns := fmt.Sprintf("t%d-%s", seq.Add(1), strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name())))
	if len(ns) > 60 {
		ns = ns[:60]
	}
	ns = strings.TrimRight(ns, "-")
	obj := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"portico-test": ns}}}
	if err := env.Client.Create(context.Background(), obj); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Client.Delete(context.Background(), obj) })
	return &fixture{t: t, ns: ns}
}

func (f *fixture) pool(name string, mutate func(*lbv1.LBPoolSpec), blocks ...string) *lbv1.LBPool {
	f.t.Helper()
	p := &lbv1.LBPool{ObjectMeta: metav1.ObjectMeta{Name: f.ns + "-" + name}, Spec: lbv1.LBPoolSpec{
		NamespaceSelector: &lbv1.LabelSelector{MatchLabels: map[string]lbv1.LabelValue{"portico-test": lbv1.LabelValue(f.ns)}},
	}}
	for _, b := range blocks {
		if start, stop, ok := strings.Cut(b, "-"); ok {
			p.Spec.Blocks = append(p.Spec.Blocks, lbv1.IPBlock{Start: start, Stop: stop})
		} else {
			p.Spec.Blocks = append(p.Spec.Blocks, lbv1.IPBlock{CIDR: b})
		}
	}
	if mutate != nil {
		mutate(&p.Spec)
	}
	if err := env.Client.Create(context.Background(), p); err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { _ = env.Client.Delete(context.Background(), p) })
	return p
}

func (f *fixture) service(name string, mutate func(*corev1.Service)) *corev1.Service {
	f.t.Helper()
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: f.ns, Name: name},
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeLoadBalancer,
			Selector: map[string]string{"app": name},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}
	if mutate != nil {
		mutate(s)
	}
	if err := env.Client.Create(context.Background(), s); err != nil {
		f.t.Fatal(err)
	}
	return s
}

func (f *fixture) get(name string) *corev1.Service {
	f.t.Helper()
	var s corev1.Service
	if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: f.ns, Name: name}, &s); err != nil {
		f.t.Fatal(err)
	}
	return &s
}

// update re-reads a Service and applies a change, retrying on conflicts.
func (f *fixture) update(name string, mutate func(*corev1.Service)) {
	f.t.Helper()
	wait.For(f.t, "", func() error {
		s := f.get(name)
		mutate(s)
		return env.Client.Update(context.Background(), s)
	})
}

func (f *fixture) remove(name string) {
	f.t.Helper()
	if err := env.Client.Delete(context.Background(), &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: f.ns, Name: name}}); err != nil {
		f.t.Fatal(err)
	}
}

func ingress(s *corev1.Service) []string {
	var out []string
	for _, in := range s.Status.LoadBalancer.Ingress {
		out = append(out, in.IP)
	}
	return out
}

// waitIPs waits until a Service's status lists exactly these addresses.
func (f *fixture) waitIPs(name string, want ...string) {
	f.t.Helper()
	wait.For(f.t, "", func() error {
		if got := ingress(f.get(name)); !slices.Equal(got, want) {
			return fmt.Errorf("%s has %v, want %v", name, got, want)
		}
		return nil
	})
}

// waitAllocated waits until a Service has n addresses and returns them.
func (f *fixture) waitAllocated(name string, n int) []string {
	f.t.Helper()
	var got []string
	wait.For(f.t, "", func() error {
		if got = ingress(f.get(name)); len(got) != n {
			return fmt.Errorf("%s has %v, want %d addresses", name, got, n)
		}
		return nil
	})
	return got
}

// waitCondition waits for the Service's IPAllocated condition to have a status and reason.
func (f *fixture) waitCondition(name string, status metav1.ConditionStatus, reason string) *metav1.Condition {
	f.t.Helper()
	var c *metav1.Condition
	wait.For(f.t, "", func() error {
		c = meta.FindStatusCondition(f.get(name).Status.Conditions, lbv1.ServiceConditionIPAllocated)
		if c == nil || c.Status != status || c.Reason != reason {
			return fmt.Errorf("condition of %s is %+v, want %s/%s", name, c, status, reason)
		}
		return nil
	})
	return c
}

// waitEvent waits for an Event on an object with this reason whose message contains text.
func (f *fixture) waitEvent(ns, object, reason, text string) {
	f.t.Helper()
	wait.For(f.t, "", func() error {
		var evs corev1.EventList
		if err := env.Client.List(context.Background(), &evs, client.InNamespace(ns)); err != nil {
			return err
		}
		var seen []string
		for _, e := range evs.Items {
			if e.InvolvedObject.Name == object && e.Reason == reason && strings.Contains(e.Message, text) {
				return nil
			}
			seen = append(seen, e.Reason+": "+e.Message)
		}
		return fmt.Errorf("no Event %s %q on %s; have %v", reason, text, object, seen)
	})
}

// never checks for a while that something does not happen.
func never(t *testing.T, d time.Duration, check func() error) {
	t.Helper()
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if err := check(); err != nil {
			t.Fatal(err)
		}
	}
}

func isInvalid(err error) bool {
	var status apierrors.APIStatus
	return errors.As(err, &status) && apierrors.IsInvalid(err)
}

// writeNodeAgent writes a node's NodeAgent as its agent does (server-side apply, forced): the
// whole status each time. It goes when the test ends.
func writeNodeAgent(t *testing.T, node string, status lbv1.NodeAgentStatus) {
	t.Helper()
	ctx := context.Background()
	na := &lbv1.NodeAgent{TypeMeta: metav1.TypeMeta{APIVersion: lbv1.GroupVersion.String(), Kind: "NodeAgent"}, ObjectMeta: metav1.ObjectMeta{Name: node}}
	if err := env.Client.Patch(ctx, na.DeepCopy(), client.Apply, client.FieldOwner("agent"), client.ForceOwnership); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Client.Delete(context.Background(), na) })
	na.Status = status
	if err := env.Client.Status().Patch(ctx, na, client.Apply, client.FieldOwner("agent"), client.ForceOwnership); err != nil {
		t.Fatal(err)
	}
}
