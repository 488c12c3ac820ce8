package bench

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/portico-dev/portico/internal/controller/agentds"
	"github.com/portico-dev/portico/test/harness/kubeproxy"
	"github.com/portico-dev/portico/test/harness/nstest"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// The waiting clients are this test binary run again in a namespace and cgroup.
const clientEnv = "PORTICO_BENCH_WAIT_CONNECT"

func TestMain(m *testing.M) {
	if addr := os.Getenv(clientEnv); addr != "" {
		nstest.WaitConnect(addr)
		return
	}
	if os.Getenv(blocksEnv) != "" {
		connectBlocks()
		return
	}
	if r := os.Getenv(roleEnv); r != "" {
		runRole(r)
		return
	}
	// The benchmarks print their own tables; controller-runtime's logs (envtest's) go nowhere.
	ctrllog.SetLogger(logr.Discard())
	os.Exit(m.Run())
}

// agentServices and agentEndpoints size BenchmarkAgentSync; BENCH_AGENT_SERVICES overrides
// the first.
var (
	agentServices  = envInt("BENCH_AGENT_SERVICES", 10000)
	agentEndpoints = 10
)

// BenchmarkAgentSync runs the node agent (cmd/agent, its own process) against an API server
// holding 10,000 dual-stack LoadBalancer Services (ClusterIPs, a NodePort and an address
// per family; the test writes the addresses as the operator would) of 10 endpoints per
// family, and measures: its first sync (start to
// /readyz), its memory, the time from an EndpointSlice change to the change carrying
// traffic, and from a new Service to its first connection. Clients run in a namespace and
// cgroup of the test's with the agent's socket programs; the endpoints of the 10,000 are
// addresses nothing routes to, so a connection succeeds only once the test's change (to the
// real backend) is programmed. Then kube-proxy (iptables, then nftables; `make bench-tools`)
// gets the same kind of changes in the same run: its first sync and change to traffic.
// Run it as root with -benchtime 1x.
func BenchmarkAgentSync(b *testing.B) {
	env := testenv.StartFor(b)
	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(env.Config)
	pair := nstest.NewPair(b, "ptb", 8080, netip.MustParsePrefix("10.253.0.0/30"))
	backend := pair.Backends[0]

	// kube-proxy waits for its Node's address.
	node, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "bench-node"}}, metav1.CreateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: backend.Addr().Prev().String()}}
	if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		b.Fatal(err)
	}
	vip := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, byte(1 + i>>8), byte(i)}), 80)
	}
	// Endpoints nothing routes to: connecting through them fails at once.
	nowhere := func(i int) []netip.AddrPort {
		out := make([]netip.AddrPort, agentEndpoints)
		for j := range out {
			n := 10<<24 | 240<<16 + uint32(i*agentEndpoints+j) // in 10.240.0.0/12
			out[j] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}), backend.Port())
		}
		return out
	}
	nowhere6 := func(i int) []netip.AddrPort {
		out := make([]netip.AddrPort, agentEndpoints)
		for j := range out {
			n := i*agentEndpoints + j // in fd00:240::/64
			out[j] = netip.AddrPortFrom(netip.AddrFrom16([16]byte{0xfd, 0x00, 0x02, 0x40, 13: byte(n >> 16), 14: byte(n >> 8), 15: byte(n)}), backend.Port())
		}
		return out
	}
	t0 := time.Now()
	parallel(b, agentServices, func(i int) error { return createLoadBalancer(ctx, cs, i, vip(i), nowhere(i), nowhere6(i)) })
	fmt.Printf("\ncreated %d dual-stack LoadBalancer Services (a NodePort each) with %d endpoints per family in %s\n",
		agentServices, agentEndpoints, time.Since(t0).Round(time.Millisecond))

	// The agent, as on a node: its own process, pins in a bpffs of the test's.
	bin, kubeconfig := build(b, env, "agent")
	metricsAddr, err := freeLoopbackAddr()
	if err != nil {
		b.Fatal(err)
	}
	probeAddr, err := freeLoopbackAddr()
	if err != nil {
		b.Fatal(err)
	}
	agent := exec.Command(bin, "--node-name=bench-node", "--cgroup-root="+pair.Cgroup, "--bpffs="+nstest.BPFFS(b),
		"--metrics-bind-address="+metricsAddr, "--health-probe-bind-address="+probeAddr, "--zap-log-level=error", "--profiling")
	// As deployed (internal/controller/agentds): a soft memory limit under the container's
	// (BENCH_AGENT_GOMEMLIMIT tries another).
	agent.Env = append(os.Environ(), "KUBECONFIG="+kubeconfig, "GOMEMLIMIT="+cmp.Or(os.Getenv("BENCH_AGENT_GOMEMLIMIT"), agentds.MemoryLimit))
	agent.Stderr = os.Stderr
	t0 = time.Now()
	if err := agent.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = agent.Process.Signal(os.Interrupt); _ = agent.Wait() })
	// BENCH_AGENT_CPU_PROFILE: a CPU profile of the agent's first 10 seconds, for go tool pprof.
	profiled := make(chan error, 1)
	if path := os.Getenv("BENCH_AGENT_CPU_PROFILE"); path != "" {
		go func() {
			for time.Since(t0) < 5*time.Second {
				if err := download("http://"+metricsAddr+"/debug/pprof/profile?seconds=10", path); err == nil {
					profiled <- nil
					return
				}
				time.Sleep(5 * time.Millisecond)
			}
			profiled <- errors.New("the agent's profiling endpoint did not answer within 5 s")
		}()
	} else {
		profiled <- nil
	}
	for {
		if resp, err := http.Get("http://" + probeAddr + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Since(t0) > 5*time.Minute {
			b.Fatal("agent not ready after 5 minutes")
		}
		time.Sleep(10 * time.Millisecond)
	}
	firstSync := time.Since(t0)
	rssAfterSync := rssMiB(agent.Process.Pid)
	// After the first sync the watch's initial events still pass through the queue (each a
	// no-op): changes are measured once it is empty.
	for depth := 1.0; depth > 0; time.Sleep(10 * time.Millisecond) {
		if depth, err = queueDepth(metricsAddr, "agent"); err != nil {
			b.Fatal(err)
		}
		if time.Since(t0) > 5*time.Minute {
			b.Fatal("the agent's queue did not empty in 5 minutes")
		}
	}
	settled := time.Since(t0)

	// One change at a time: a Service's endpoints become the real backend; a client in the
	// cgroup retries until a connection gets through.
	client := func(to netip.AddrPort) *exec.Cmd {
		cmd, cg := pair.Command(b, os.Args[0])
		b.Cleanup(func() { cg.Close() })
		cmd.Env = append(os.Environ(), clientEnv+"="+to.String())
		return cmd
	}
	const samples = 100
	var change, changeWrite, create, createWrite []time.Duration
	changed := map[int]bool{} // Services pointed at the backend; later runs take others
	// pointAtBackend makes Service i's endpoints the backend, and returns how long until the
	// client connected through it and how long the API write alone took.
	pointAtBackend := func(i int, client *exec.Cmd) (took, write time.Duration, err error) {
		changed[i] = true
		slice, err := cs.DiscoveryV1().EndpointSlices("default").Get(ctx, fmt.Sprintf("svc-%d-1", i), metav1.GetOptions{})
		if err != nil {
			return 0, 0, err
		}
		slice.Endpoints = endpoints([]netip.AddrPort{backend})
		took, err = nstest.TimeToConnect(b, client, func() {
			t0 := time.Now()
			if _, err := cs.DiscoveryV1().EndpointSlices("default").Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
				b.Fatal(err)
			}
			write = time.Since(t0)
		})
		return took, write, err
	}
	// The first change also pays for cold paths (the first connection to the backend, the
	// first neighbour lookup): a warm-up, not counted. The samples are Services 0, n/100, ...
	for k := -1; k < samples; k++ {
		i := k * (agentServices / samples)
		if k < 0 {
			i = agentServices - 1
		}
		d, write, err := pointAtBackend(i, client(vip(i)))
		if err != nil {
			b.Fatalf("EndpointSlice change of Service %d: %v", i, err)
		}
		if k >= 0 {
			change, changeWrite = append(change, d), append(changeWrite, write)
		}
	}
	for k := range samples {
		i := agentServices + k
		d, err := nstest.TimeToConnect(b, client(vip(i)), func() {
			t0 := time.Now()
			if err := createLoadBalancer(ctx, cs, i, vip(i), []netip.AddrPort{backend}, nowhere6(i)); err != nil {
				b.Fatal(err)
			}
			createWrite = append(createWrite, time.Since(t0))
		})
		if err != nil {
			b.Fatalf("new Service %d: %v", i, err)
		}
		create = append(create, d)
	}
	// after is what each sample took beyond its API writes: the watch, the agent, the maps and
	// the client's next retry.
	row := func(what string, d, write []time.Duration) {
		after := make([]time.Duration, len(d))
		for i := range d {
			after[i] = d[i] - write[i]
		}
		r := func(x time.Duration) time.Duration { return x.Round(10 * time.Microsecond) }
		fmt.Printf("  %-36s p50 %8s  p99 %8s   API writes alone p50 %8s  p99 %8s   beyond them p50 %8s  p99 %8s\n", what,
			r(pct(d, 50)), r(pct(d, 99)), r(pct(write, 50)), r(pct(write, 99)), r(pct(after, 50)), r(pct(after, 99)))
	}
	fmt.Printf("Portico agent, %d dual-stack LoadBalancer Services x %d endpoints per family (clients retry every millisecond)\n", agentServices, agentEndpoints)
	fmt.Printf("  first sync (start to ready)          %s; initial events drained at %s\n", firstSync.Round(time.Millisecond), settled.Round(time.Millisecond))
	row(fmt.Sprintf("EndpointSlice change to traffic (%d)", samples), change, changeWrite)
	row(fmt.Sprintf("new Service to first connection (%d)", samples), create, createWrite)
	if err := <-profiled; err != nil {
		b.Fatal(err)
	}
	if path := os.Getenv("BENCH_AGENT_HEAP_PROFILE"); path != "" {
		if err := download("http://"+metricsAddr+"/debug/pprof/heap?gc=1", path); err != nil {
			b.Fatal(err)
		}
	}
	rss := rssMiB(agent.Process.Pid)
	fmt.Printf("  agent RSS after first sync / at end  %.0f / %.0f MiB (Go heap in use at end %.0f MiB)\n", rssAfterSync, rss, heapMiB(metricsAddr))
	b.ReportMetric(firstSync.Seconds(), "first-sync-s")
	b.ReportMetric(float64(pct(change, 99).Microseconds())/1000, "change-p99-ms")
	b.ReportMetric(rss, "rss-MiB")
	_ = agent.Process.Signal(os.Interrupt)
	_ = agent.Wait()

	// The same kind of changes through kube-proxy, in the client's namespace, with clients
	// outside the agent's cgroup (its programs stay attached there, pinned).
	kpSamples := envInt("BENCH_KUBE_PROXY_SAMPLES", 20)
	if os.Getenv("BENCH_KUBE_PROXY_SAMPLES") == "0" {
		kpSamples = 0 // no kube-proxy
	}
	bin, whyNot := kubeproxy.Binary()
	if whyNot != nil || kpSamples == 0 {
		fmt.Printf("kube-proxy baseline skipped: %v\n\n", cmp.Or[error](whyNot, errors.New("BENCH_KUBE_PROXY_SAMPLES=0")))
		return
	}
	// kube-proxy translates after the routing decision: Service addresses need a route.
	if out, err := exec.Command("ip", "-n", pair.Client, "route", "add", "10.96.0.0/12", "via", backend.Addr().String()).CombinedOutput(); err != nil {
		b.Fatalf("route Service addresses: %v\n%s", err, out)
	}
	plain := func(to netip.AddrPort) *exec.Cmd {
		cmd := exec.Command("ip", "netns", "exec", pair.Client, os.Args[0])
		cmd.Env = append(os.Environ(), clientEnv+"="+to.String())
		return cmd
	}
	// BENCH_KUBE_PROXY_MODES: which of them (at 10,000 dual-stack LoadBalancer Services,
	// iptables-restore alone runs for more than ten minutes).
	for _, mode := range strings.Split(cmp.Or(os.Getenv("BENCH_KUBE_PROXY_MODES"), "iptables,nftables"), ",") {
		// Start to a first connection to a Service the Portico run pointed at the backend.
		var kp *kubeproxy.Proxy
		first, err := nstest.TimeToConnect(b, plain(vip(agentServices-1)), func() {
			kp = kubeproxy.Start(b, env, bin, pair.Client, mode, "bench-node")
		})
		if err != nil {
			// At 100,000 endpoints iptables-restore can take longer than the client waits:
			// a result, not a failure of the benchmark.
			fmt.Printf("kube-proxy %s, same Services\n  first sync: no connection within 10 minutes (%v); kube-proxy RSS %.0f MiB\n", mode, err, rssMiB(kp.Pid()))
			kp.Stop()
			continue
		}
		var took, write []time.Duration
		for k := range kpSamples {
			i := k * (agentServices / kpSamples)
			for changed[i] {
				i++
			}
			d, w, err := pointAtBackend(i, plain(vip(i)))
			if err != nil {
				b.Fatalf("kube-proxy %s: EndpointSlice change of Service %d: %v\n%s", mode, i, err, kp.Tail())
			}
			took, write = append(took, d), append(write, w)
		}
		fmt.Printf("kube-proxy %s, same Services\n", mode)
		fmt.Printf("  first sync (start to first connection) %s\n", first.Round(time.Millisecond))
		row(fmt.Sprintf("EndpointSlice change to traffic (%d)", kpSamples), took, write)
		fmt.Printf("  kube-proxy RSS                       %.0f MiB\n", rssMiB(kp.Pid()))
		kp.Stop()
	}
	fmt.Println()
}

// parallel runs do(0..n-1) with 16 writers.
func parallel(b *testing.B, n int, do func(int) error) {
	work := make(chan int)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				if err := do(i); err != nil {
					mu.Lock()
					first = cmp.Or(first, err)
					mu.Unlock()
				}
			}
		}()
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	if first != nil {
		b.Fatal(first)
	}
}

// createService creates ClusterIP Service svc-i on vip and its EndpointSlice svc-i-1.
func createService(ctx context.Context, cs *kubernetes.Clientset, i int, vip netip.AddrPort, eps []netip.AddrPort) error {
	name := fmt.Sprintf("svc-%d", i)
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.ServiceSpec{
		ClusterIP: vip.Addr().String(),
		Ports:     []corev1.ServicePort{{Name: "http", Port: int32(vip.Port()), TargetPort: intstr.FromString("http")}},
	}}
	if _, err := cs.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create Service %s: %w", name, err)
	}
	return createSlice(ctx, cs, name, 1, eps)
}

// createLoadBalancer creates Service svc-i as a dual-stack LoadBalancer: ClusterIPs vip and
// vip6(i), a NodePort, addresses in its status as the operator writes them, and its
// EndpointSlices svc-i-1 (IPv4, eps4) and svc-i-2 (IPv6, eps6).
func createLoadBalancer(ctx context.Context, cs *kubernetes.Clientset, i int, vip netip.AddrPort, eps4, eps6 []netip.AddrPort) error {
	name := fmt.Sprintf("svc-%d", i)
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.ServiceSpec{
		Type:           corev1.ServiceTypeLoadBalancer,
		IPFamilyPolicy: ptr.To(corev1.IPFamilyPolicyRequireDualStack),
		IPFamilies:     []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol},
		ClusterIP:      vip.Addr().String(),
		ClusterIPs:     []string{vip.Addr().String(), vip6(i).String()},
		Ports:          []corev1.ServicePort{{Name: "http", Port: int32(vip.Port()), TargetPort: intstr.FromString("http")}},
	}}
	created, err := cs.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create Service %s: %w", name, err)
	}
	created.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{
		{IP: netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}).String(), IPMode: ptr.To(corev1.LoadBalancerIPModeVIP)},
		{IP: netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 14: byte(i >> 8), 15: byte(i)}).String(), IPMode: ptr.To(corev1.LoadBalancerIPModeVIP)}}
	if _, err := cs.CoreV1().Services("default").UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("write the addresses of Service %s: %w", name, err)
	}
	return errors.Join(createSlice(ctx, cs, name, 1, eps4), createSlice(ctx, cs, name, 2, eps6))
}

// vip6 is Service i's IPv6 ClusterIP, in the API server's fd00:10:96::/108.
func vip6(i int) netip.Addr {
	n := 0x10000 + i
	return netip.AddrFrom16([16]byte{0xfd, 0x00, 0x00, 0x10, 0x00, 0x96, 13: byte(n >> 16), 14: byte(n >> 8), 15: byte(n)})
}

// createSlice creates EndpointSlice <service>-<k> of eps, one family.
func createSlice(ctx context.Context, cs *kubernetes.Clientset, service string, k int, eps []netip.AddrPort) error {
	family := discoveryv1.AddressTypeIPv4
	if eps[0].Addr().Is6() {
		family = discoveryv1.AddressTypeIPv6
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: fmt.Sprintf("%s-%d", service, k), Labels: map[string]string{discoveryv1.LabelServiceName: service}},
		AddressType: family,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(int32(eps[0].Port()))}},
		Endpoints:   endpoints(eps),
	}
	if _, err := cs.DiscoveryV1().EndpointSlices("default").Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create EndpointSlice %s: %w", slice.Name, err)
	}
	return nil
}

func endpoints(eps []netip.AddrPort) []discoveryv1.Endpoint {
	out := make([]discoveryv1.Endpoint, len(eps))
	for i, e := range eps {
		out[i] = discoveryv1.Endpoint{Addresses: []string{e.Addr().String()}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}}
	}
	return out
}

// scrape reads the metrics a process serves on addr.
func scrape(addr string) (map[string]*dto.MetricFamily, error) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, fmt.Errorf("scrape metrics: %w", err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("parse metrics: %w", err)
	}
	return families, nil
}

// heapMiB reads the agent's live Go heap (after its last collection) from its metrics.
func heapMiB(addr string) float64 {
	families, err := scrape(addr)
	if err != nil {
		return 0
	}
	for _, m := range families["go_memstats_heap_inuse_bytes"].GetMetric() {
		return m.GetGauge().GetValue() / (1 << 20)
	}
	return 0
}

// queueDepth reads how many items wait in a controller's queue, from its metrics.
func queueDepth(addr, name string) (float64, error) {
	families, err := scrape(addr)
	if err != nil {
		return 0, err
	}
	for _, m := range families["workqueue_depth"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "name" && l.GetValue() == name {
				return m.GetGauge().GetValue(), nil
			}
		}
	}
	return 0, fmt.Errorf("no workqueue_depth for %s", name)
}

// download saves what url serves into path (BENCH_AGENT_HEAP_PROFILE: a heap profile for
// go tool pprof).
func download(url, path string) error {
	resp, err := http.Get(url)
	if err != nil {
		return fmt.Errorf("get %s: %w", url, err)
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, resp.Body)
	return errors.Join(err, f.Close())
}
