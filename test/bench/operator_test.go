// Package bench holds end-to-end benchmarks of Portico against a real API server. They print
// their numbers beside a baseline measured in the same run; docs/benchmarks.md records them.
package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// services is how many Services the benchmark creates; BENCH_SERVICES overrides it.
var services = envInt("BENCH_SERVICES", 5000)

// workers is the operator's --workers; BENCH_WORKERS overrides it.
var workers = envInt("BENCH_WORKERS", 16)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// BenchmarkCreationToIP creates 5,000 LoadBalancer Services as fast as the API server takes
// them (16 writers) while the operator runs as its own process, and reports how long each
// waited for its address. The baseline is the API server's own round trip for the create.
func BenchmarkCreationToIP(b *testing.B) {
	env := testenv.StartFor(b)
	ctx := context.Background()

	operatorBin, kubeconfig := build(b, env, "operator")
	metricsAddr, err := freeLoopbackAddr()
	if err != nil {
		b.Fatal(err)
	}
	op := exec.Command(operatorBin, "--claim-classless-services", "--metrics-bind-address="+metricsAddr, "--health-probe-bind-address=0",
		"--zap-log-level=error", "--workers="+strconv.Itoa(workers))
	op.Env = append(os.Environ(), "KUBECONFIG="+kubeconfig)
	op.Stderr = os.Stderr
	opStarted := time.Now()
	if err := op.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = op.Process.Kill(); _ = op.Wait() }()

	pool := &lbv1.LBPool{ObjectMeta: metav1.ObjectMeta{Name: "bench"}, Spec: lbv1.LBPoolSpec{Blocks: []lbv1.IPBlock{{CIDR: "10.200.0.0/16"}}}}
	if err := env.Client.Create(ctx, pool); err != nil {
		b.Fatal(err)
	}
	// Measure the operator at work, not while it starts: wait until it says the pool is ready.
	for {
		var got lbv1.LBPool
		if err := env.Client.Get(ctx, client.ObjectKeyFromObject(pool), &got); err != nil {
			b.Fatal(err)
		}
		if meta.IsStatusConditionTrue(got.Status.Conditions, "Ready") {
			break
		}
		if time.Since(opStarted) > time.Minute {
			b.Fatal("the operator did not make the pool Ready within a minute")
		}
		time.Sleep(10 * time.Millisecond)
	}
	started := time.Since(opStarted)
	cs := kubernetes.NewForConfigOrDie(env.Config)
	ns := "bench"
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}

	// Watch for addresses before creating anything, so no status update is missed. An
	// informer re-lists and re-watches when the loaded API server drops the watch.
	var mu sync.Mutex
	created := map[string]time.Time{}
	createRTT := make([]time.Duration, 0, services)
	gotIP := map[string]time.Time{}
	allDone := make(chan struct{})
	seen := func(obj any) {
		svc, ok := obj.(*corev1.Service)
		if !ok || len(svc.Status.LoadBalancer.Ingress) == 0 {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if _, ok := gotIP[svc.Name]; !ok {
			gotIP[svc.Name] = time.Now()
			if len(gotIP) == services {
				close(allDone)
			}
		}
	}
	factory := informers.NewSharedInformerFactoryWithOptions(cs, 0, informers.WithNamespace(ns))
	inf := factory.Core().V1().Services().Informer()
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: seen, UpdateFunc: func(_, o any) { seen(o) }}); err != nil {
		b.Fatal(err)
	}
	stopInformer := make(chan struct{})
	defer close(stopInformer)
	factory.Start(stopInformer)
	factory.WaitForCacheSync(stopInformer)

	start := time.Now()
	var wg sync.WaitGroup
	names := make(chan int)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range names {
				name := "svc-" + strconv.Itoa(i)
				svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.ServiceSpec{
					Type: corev1.ServiceTypeLoadBalancer, Selector: map[string]string{"app": name},
					Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}},
				}}
				t0 := time.Now()
				if _, err := cs.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
					b.Error(err)
					continue
				}
				mu.Lock()
				created[name] = t0
				createRTT = append(createRTT, time.Since(t0))
				mu.Unlock()
			}
		}()
	}
	for i := range services {
		names <- i
	}
	close(names)
	wg.Wait()
	createdAll := time.Since(start)
	select {
	case <-allDone:
	case <-time.After(5 * time.Minute):
		b.Fatalf("only %d of %d Services got an address in 5 minutes", len(gotIP), services)
	}
	total := time.Since(start)

	mu.Lock()
	lat := make([]time.Duration, 0, services)
	for name, t := range gotIP {
		lat = append(lat, t.Sub(created[name]))
	}
	mu.Unlock()
	rss := rssMiB(op.Process.Pid)
	own, err := operatorTimes(metricsAddr)
	if err != nil {
		b.Fatal(err)
	}
	p50, p99 := pct(lat, 50), pct(lat, 99)
	b.ReportMetric(float64(p50.Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(p99.Microseconds())/1000, "p99-ms")
	b.ReportMetric(total.Seconds(), "all-s")
	b.ReportMetric(rss, "operator-RSS-MiB")
	fmt.Printf("\n%d LoadBalancer Services, 16 writers, operator as a process (%d workers)\n", services, workers)
	fmt.Printf("  %-40s %10s %10s\n", "", "p50", "p99")
	fmt.Printf("  %-40s %10s %10s\n", "baseline: API create round trip", pct(createRTT, 50).Round(10*time.Microsecond), pct(createRTT, 99).Round(10*time.Microsecond))
	fmt.Printf("  %-40s %10s %10s\n", "Portico: creation -> IP in status", p50.Round(10*time.Microsecond), p99.Round(10*time.Microsecond))
	for _, h := range own {
		fmt.Printf("  %-40s %10s %10s   (mean %s; bucket upper bounds)\n", h.what, h.p50, h.p99, h.mean.Round(10*time.Microsecond))
	}
	fmt.Printf("  all created in %s (%.0f/s); all with an IP after %s; operator RSS %.0f MiB; operator start to pool Ready %s\n\n",
		createdAll.Round(time.Millisecond), float64(services)/createdAll.Seconds(), total.Round(time.Millisecond), rss, started.Round(time.Millisecond))
}

// build compiles cmd/<name> and writes a kubeconfig for env beside it: what a benchmark
// needs to run a Portico binary as its own process.
func build(b *testing.B, env *testenv.Env, name string) (bin, kubeconfig string) {
	b.Helper()
	dir := b.TempDir()
	bins, err := testenv.Build(dir, name)
	if err != nil {
		b.Fatal(err)
	}
	bin = bins[0]
	kubeconfig = filepath.Join(dir, "kubeconfig")
	if err := env.WriteKubeconfig(kubeconfig); err != nil {
		b.Fatal(err)
	}
	return bin, kubeconfig
}

// pct is the p-th percentile of d (nearest rank: the smallest sample at or above p percent
// of them); 0 without samples.
func pct(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[max(0, (len(s)*p+99)/100-1)]
}

func rssMiB(pid int) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

type ownTime struct {
	what           string
	p50, p99, mean time.Duration
}

// operatorTimes reads, from the operator's own metrics, how long Service reconciles waited in
// its queue and how long they ran (the status write included): the operator's share of the
// creation-to-IP latency.
func operatorTimes(addr string) ([]ownTime, error) {
	families, err := scrape(addr)
	if err != nil {
		return nil, err
	}
	var out []ownTime
	for _, m := range []struct{ family, label, value, what string }{
		{"workqueue_queue_duration_seconds", "name", "servicelb", "operator: waiting in its queue"},
		{"controller_runtime_reconcile_time_seconds", "controller", "servicelb", "operator: reconcile incl. status write"},
	} {
		fam, ok := families[m.family]
		if !ok {
			return nil, fmt.Errorf("operator metrics have no %s", m.family)
		}
		for _, metric := range fam.GetMetric() {
			for _, l := range metric.GetLabel() {
				if l.GetName() == m.label && l.GetValue() == m.value {
					h := metric.GetHistogram()
					out = append(out, ownTime{what: m.what, p50: bucketQuantile(h, 0.5), p99: bucketQuantile(h, 0.99),
						mean: time.Duration(h.GetSampleSum() / float64(max(1, h.GetSampleCount())) * float64(time.Second))})
				}
			}
		}
	}
	return out, nil
}

// bucketQuantile returns the upper bound of the histogram bucket that holds quantile q.
func bucketQuantile(h *dto.Histogram, q float64) time.Duration {
	want := q * float64(h.GetSampleCount())
	for _, b := range h.GetBucket() {
		if float64(b.GetCumulativeCount()) >= want {
			return time.Duration(b.GetUpperBound() * float64(time.Second))
		}
	}
	return -1
}
