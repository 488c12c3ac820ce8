package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/portico-dev/portico/internal/datapath"
	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/test/harness/kubeproxy"
	"github.com/portico-dev/portico/test/harness/nstest"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// Connection measurements interleave the paths they compare: long-lived client processes
// take turns opening a block of perBlock connections to one path each, blocks turns per path,
// so that whatever else the machine does falls on every path alike.
const (
	blocks   = 30
	perBlock = 200
)

// blocksEnv turns this test binary into a "tcp-blocks" client (TestMain).
const blocksEnv = "PORTICO_BENCH_CONNECT_BLOCKS"

// connectBlocks is the "tcp-blocks" client: for each line "addr count" on stdin it opens
// count connections one after another (connect, one request line, reset) and prints the
// block's duration and each connect's latency, in nanoseconds, on one line.
func connectBlocks() {
	orders := bufio.NewScanner(os.Stdin)
	for orders.Scan() {
		addr, count, _ := strings.Cut(orders.Text(), " ")
		n, _ := strconv.Atoi(count)
		line := make([]string, 1, n+1)
		start := time.Now()
		for range n {
			t0 := time.Now()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				fmt.Println("error:", err)
				return
			}
			line = append(line, strconv.FormatInt(time.Since(t0).Nanoseconds(), 10))
			_ = c.(*net.TCPConn).SetLinger(0) // reset on close: no TIME_WAIT pile-up
			if _, err := c.Write([]byte("x\n")); err == nil {
				_, _ = bufio.NewReader(c).ReadString('\n')
			}
			c.Close()
		}
		line[0] = strconv.FormatInt(time.Since(start).Nanoseconds(), 10)
		fmt.Println(strings.Join(line, " "))
	}
}

// blockClient is a running "tcp-blocks" client.
type blockClient struct {
	orders io.Writer
	lines  *bufio.Scanner
}

// topology is the datapath benchmark's: a client and a backend namespace (nstest.Pair,
// echo on 10.250.0.2:8080), Portico's socket programs on the client's cgroup, and the CPU
// the clients run on.
type topology struct {
	t         testing.TB
	pair      *nstest.Pair
	backIP    netip.Addr
	clientCPU string // for taskset; empty: any
}

func newTopology(t testing.TB) *topology {
	t.Helper()
	p := nstest.NewPair(t, "ptc", 8080, netip.MustParsePrefix("10.250.0.0/30"))
	return &topology{t: t, pair: p, backIP: p.Backends[0].Addr()}
}

func (top *topology) run(args ...string) {
	top.t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		top.t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// attach loads Portico's datapath and attaches it to the client's cgroup, until the end.
func (top *topology) attach() *datapath.Datapath {
	top.t.Helper()
	d, err := datapath.Load(datapath.Options{})
	if err != nil {
		top.t.Fatal(err)
	}
	top.t.Cleanup(func() { _ = d.Close() })
	if err := d.AttachCgroup(top.pair.Cgroup); err != nil {
		top.t.Fatal(err)
	}
	return d
}

// command prepares this binary as a client process in netns (in Portico's cgroup when
// cgroup is set), on the CPU clientCPU names, with env set; the caller closes the returned
// file, if any, once the process has started.
func (top *topology) command(netns string, cgroup bool, env string) (*exec.Cmd, *os.File) {
	top.t.Helper()
	args := []string{"ip", "netns", "exec", netns, os.Args[0]}
	if top.clientCPU != "" {
		args = append([]string{"taskset", "-c", top.clientCPU}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), env)
	if !cgroup {
		return cmd, nil
	}
	cg, err := os.Open(top.pair.Cgroup)
	if err != nil {
		top.t.Fatal(err)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	return cmd, cg
}

// timeToConnect is nstest.TimeToConnect for a client in netns (and Portico's cgroup).
func (top *topology) timeToConnect(netns string, cgroup bool, to netip.AddrPort, change func()) (time.Duration, error) {
	cmd, cg := top.command(netns, cgroup, clientEnv+"="+to.String())
	if cg != nil {
		defer cg.Close()
	}
	return nstest.TimeToConnect(top.t, cmd, change)
}

// startBlocks starts a "tcp-blocks" client in netns, in Portico's cgroup when cgroup is set.
func (top *topology) startBlocks(netns string, cgroup bool) *blockClient {
	top.t.Helper()
	cmd, cg := top.command(netns, cgroup, blocksEnv+"=1")
	if cg != nil {
		defer cg.Close()
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		top.t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		top.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		top.t.Fatal(err)
	}
	top.t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return &blockClient{stdin, bufio.NewScanner(stdout)}
}

// refused says whether a connection from netns to addr is refused: nothing translates it.
func (top *topology) refused(netns string, addr netip.AddrPort) bool {
	var err error
	nstest.Enter(top.t, netns)(func() {
		var c net.Conn
		if c, err = net.DialTimeout("tcp", addr.String(), 2*time.Second); err == nil {
			c.Close()
		}
	})
	return errors.Is(err, syscall.ECONNREFUSED)
}

// path is one way to reach the backend, and what was measured on it. Blocks go to each of
// its addresses in turn (Services at several places in kube-proxy's rules).
type path struct {
	name    string
	client  *blockClient
	to      []netip.AddrPort
	elapsed time.Duration
	latency []time.Duration
	taken   int
}

// take runs one block on the path.
func (p *path) take(t testing.TB) {
	t.Helper()
	fmt.Fprintf(p.client.orders, "%s %d\n", p.to[p.taken%len(p.to)], perBlock)
	p.taken++
	if !p.client.lines.Scan() {
		t.Fatalf("%s: client ended: %v", p.name, p.client.lines.Err())
	}
	f := strings.Fields(p.client.lines.Text())
	if len(f) != perBlock+1 {
		t.Fatalf("%s: client printed %q", p.name, p.client.lines.Text())
	}
	for i, v := range f {
		ns, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			t.Fatalf("%s: client printed %q", p.name, v)
		}
		if i == 0 {
			p.elapsed += time.Duration(ns)
		} else {
			p.latency = append(p.latency, time.Duration(ns))
		}
	}
}

// interleave measures the paths in turns.
func interleave(t testing.TB, paths ...*path) {
	for range blocks {
		for _, p := range paths {
			p.take(t)
		}
	}
}

func (p *path) rate() float64 { return float64(len(p.latency)) / p.elapsed.Seconds() }

// mark is where a path's measurements stood, so that a phase can be read on its own.
type mark struct {
	n       int
	elapsed time.Duration
}

func (p *path) mark() mark { return mark{len(p.latency), p.elapsed} }

func (p *path) rateSince(m mark) float64 {
	return float64(len(p.latency)-m.n) / (p.elapsed - m.elapsed).Seconds()
}

// routeServiceRanges sends the client namespace's traffic for 10.96.0.0/12 to the backend
// namespace, which takes the whole range as its own and has nothing listening there: a
// connection to a Service address nobody translates is refused at once, and stays inside
// the test's namespaces.
func (top *topology) routeServiceRanges() {
	top.run("ip", "-n", top.pair.Client, "route", "add", "10.96.0.0/12", "via", top.backIP.String())
	top.run("ip", "-n", top.pair.BackendNS, "route", "add", "local", "10.96.0.0/12", "dev", "lo")
}

// kubeProxyNode adds a second client namespace, on its own veth pair to the backend, for
// kube-proxy: its rules then cost nothing to the direct and Portico paths, which a node
// without kube-proxy would not pay either. Service addresses go to the backend, as in the
// first (kube-proxy translates after routing). It returns the namespace and its address.
func (top *topology) kubeProxyNode() (string, netip.Addr) {
	id := fmt.Sprintf("%d", os.Getpid()%100000)
	netns, addr, peer := "ptc-k"+id, netip.MustParseAddr("10.250.1.1"), netip.MustParseAddr("10.250.1.2")
	nstest.Netns(top.t, netns)
	top.run("ip", "link", "add", "ptc-kv"+id, "netns", netns, "type", "veth", "peer", "name", "ptc-kp"+id, "netns", top.pair.BackendNS)
	top.run("ip", "-n", netns, "addr", "add", addr.String()+"/30", "dev", "ptc-kv"+id)
	top.run("ip", "-n", top.pair.BackendNS, "addr", "add", peer.String()+"/30", "dev", "ptc-kp"+id)
	top.run("ip", "-n", netns, "link", "set", "lo", "up")
	top.run("ip", "-n", netns, "link", "set", "ptc-kv"+id, "up")
	top.run("ip", "-n", top.pair.BackendNS, "link", "set", "ptc-kp"+id, "up")
	top.run("ip", "-n", netns, "route", "add", top.backIP.String(), "via", peer.String())
	top.run("ip", "-n", netns, "route", "add", "10.96.0.0/12", "via", peer.String())
	return netns, addr
}

// pinTo moves every thread of this process (the backend's echo server) to cpu, and makes
// the clients start there too, so that measurements do not depend on cross-CPU wake-ups;
// the rest of the machine keeps the other CPU. Undone when the benchmark ends.
func (top *topology) pinTo(cpu int) {
	if runtime.NumCPU() < 2 {
		return
	}
	pid := strconv.Itoa(os.Getpid())
	top.run("taskset", "-a", "-p", "-c", strconv.Itoa(cpu), pid)
	top.clientCPU = strconv.Itoa(cpu)
	top.t.Cleanup(func() {
		_ = exec.Command("taskset", "-a", "-p", "-c", fmt.Sprintf("0-%d", runtime.NumCPU()-1), pid).Run()
	})
}

// BenchmarkClusterIPConnect measures new connections to a backend namespace through a
// ClusterIP with 1, 1,000 and 10,000 Services, in one run: directly to the backend (the
// limit), through Portico (socket layer), and through kube-proxy in iptables and nftables
// mode reading the same Services from an API server; then how long a new Service takes to
// carry its first connection with 10,000 there (BENCH_CLUSTERIP_SERVICES lowers the largest
// count; BENCH_KUBE_PROXY_SAMPLES=0 leaves kube-proxy out). Run it with -benchtime 1x; it prints a
// table. Without kube-proxy (see test/harness/kubeproxy) it compares Portico and direct.
func BenchmarkClusterIPConnect(b *testing.B) {
	ctx := context.Background()
	top := newTopology(b)
	top.routeServiceRanges()
	lb := top.attach()
	backend := netip.AddrPortFrom(top.backIP, 8080)
	bin, whyNot := kubeproxy.Binary()
	if os.Getenv("BENCH_KUBE_PROXY_SAMPLES") == "0" {
		whyNot = errors.New("BENCH_KUBE_PROXY_SAMPLES=0")
	}
	most := envInt("BENCH_CLUSTERIP_SERVICES", 10000)
	counts := slices.DeleteFunc([]int{1, 1000, 10000}, func(n int) bool { return n > max(1, most) })
	largest := counts[len(counts)-1] // it takes the new-Service samples
	var cs *kubernetes.Clientset
	var env *testenv.Env
	var kpNode string
	modes := []string{"iptables", "nftables"}
	if whyNot != nil {
		fmt.Printf("\nkube-proxy left out: %v\n", whyNot)
		modes = nil
	} else {
		var nodeIP netip.Addr
		kpNode, nodeIP = top.kubeProxyNode()
		env, cs = startClusterAPI(b, nodeIP)
	}
	// The backend's server (this process) on one CPU, the clients on the other.
	top.pinTo(1)
	if top.clientCPU != "" {
		top.clientCPU = "0"
	}
	plain, inCgroup := top.startBlocks(top.pair.Client, false), top.startBlocks(top.pair.Client, true)
	var proxiedClient *blockClient
	if kpNode != "" {
		proxiedClient = top.startBlocks(kpNode, false)
	}
	// Portico's frontends and kube-proxy's Services are different addresses, so neither
	// sees the other's.
	porticoVIP := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)}), 80)
	}
	serviceVIP := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, byte(1 + i>>8), byte(i)}), 80)
	}
	// Ten Services spread over the n, in turns: kube-proxy's iptables rules are a list in no
	// particular order, so one Service could sit anywhere in it.
	spread := func(n int, vip func(int) netip.AddrPort) []netip.AddrPort {
		var out []netip.AddrPort
		for i := range 10 {
			out = append(out, vip(i*n/10))
		}
		return out
	}

	fmt.Printf("\nconnect, one request line, reset; blocks of %d connections, paths taking turns (%d blocks with each\n", perBlock, blocks)
	fmt.Printf("kube-proxy, %d for direct and Portico); kube-proxy runs in a second client namespace of its own,\n", blocks*max(1, len(modes)))
	fmt.Printf("and its rows compare with the direct rate measured while it ran\n")
	fmt.Printf("%-9s %-20s %9s %9s %9s %9s  %s\n", "services", "path", "p50", "p99", "conn/s", "vs direct", "programming")
	created := 0
	const porticoSamples, kubeProxySamples = 100, 20
	type firstConnection struct{ path, numbers, what string }
	var first []firstConnection
	for _, n := range counts {
		frontends := make([]loadbalancer.Frontend, n)
		for i := range frontends {
			frontends[i] = internal(porticoVIP(i), loadbalancer.TCP, backend)
		}
		t0 := time.Now()
		if err := lb.Apply(frontends); err != nil {
			b.Fatal(err)
		}
		full := time.Since(t0)
		t0 = time.Now()
		if err := lb.Update(internal(porticoVIP(n), loadbalancer.TCP, backend)); err != nil {
			b.Fatal(err)
		}
		plusOne := time.Since(t0)
		if err := lb.Delete(porticoVIP(n), loadbalancer.TCP, loadbalancer.Internal); err != nil {
			b.Fatal(err)
		}
		if cs != nil {
			parallel(b, n-created, func(i int) error {
				return createService(ctx, cs, created+i, serviceVIP(created+i), []netip.AddrPort{backend})
			})
			created = n
		}

		direct := &path{name: "direct to backend", client: plain, to: []netip.AddrPort{backend}}
		portico := &path{name: "Portico", client: inCgroup, to: spread(n, porticoVIP)}
		programming := map[*path]string{portico: fmt.Sprintf("Apply all %s, Update one more %s", full.Round(time.Microsecond), plusOne.Round(time.Microsecond))}
		measured := []*path{direct, portico}
		baseline := map[*path]float64{}
		for _, mode := range modes {
			kp := kubeproxy.Start(b, env, bin, kpNode, mode, kubeProxyNode)
			synced, err := top.timeToConnect(kpNode, false, serviceVIP(n-1), func() {})
			if err != nil {
				b.Fatalf("kube-proxy %s never served %s: %v\n%s", mode, serviceVIP(n-1), err, kp.Tail())
			}
			proxied := &path{name: "kube-proxy " + mode, client: proxiedClient, to: spread(n, serviceVIP)}
			programming[proxied] = fmt.Sprintf("start to serving the last Service %s", synced.Round(time.Millisecond))
			phase := direct.mark()
			interleave(b, direct, portico, proxied)
			baseline[proxied] = direct.rateSince(phase)
			measured = append(measured, proxied)
			if n == largest {
				var took []time.Duration
				for range kubeProxySamples {
					i, vip := created, serviceVIP(created)
					created++
					time.Sleep(time.Second) // past kube-proxy's minimum sync period: each change waits for nothing else
					d, err := top.timeToConnect(kpNode, false, vip, func() {
						if err := createService(ctx, cs, i, vip, []netip.AddrPort{backend}); err != nil {
							b.Fatal(err)
						}
					})
					if err != nil {
						b.Fatalf("kube-proxy %s: new Service %s: %v\n%s", mode, vip, err, kp.Tail())
					}
					took = append(took, d)
				}
				first = append(first, firstConnection{proxied.name, fmtPercentiles(took), fmt.Sprintf("%d Services and EndpointSlices created", kubeProxySamples)})
			}
			kp.Stop()
			if !top.refused(kpNode, serviceVIP(n-1)) {
				b.Fatalf("kube-proxy %s left its rules behind: %s is not refused", mode, serviceVIP(n-1))
			}
		}
		if len(modes) == 0 {
			interleave(b, direct, portico)
		}
		for _, p := range measured {
			p50, p99 := pct(p.latency, 50), pct(p.latency, 99)
			against, ok := baseline[p]
			if !ok {
				against = direct.rate()
			}
			fmt.Printf("%-9d %-20s %9s %9s %9.0f %8.0f%%  %s\n", n, p.name, p50.Round(time.Microsecond), p99.Round(time.Microsecond), p.rate(), 100*p.rate()/against, programming[p])
		}
		b.ReportMetric(100*portico.rate()/direct.rate(), fmt.Sprintf("pct-of-direct-%dsvc", n))
		if n == largest {
			var took []time.Duration
			for i := range porticoSamples {
				vip := porticoVIP(n + 1 + i)
				d, err := top.timeToConnect(top.pair.Client, true, vip, func() {
					if err := lb.Update(internal(vip, loadbalancer.TCP, backend)); err != nil {
						b.Fatal(err)
					}
				})
				if err != nil {
					b.Fatalf("Portico: new frontend %s: %v", vip, err)
				}
				took = append(took, d)
			}
			first = append([]firstConnection{{"Portico datapath", fmtPercentiles(took), fmt.Sprintf("%d Updates (the agent's watch comes on top)", porticoSamples)}}, first...)
		}
	}
	fmt.Printf("\nnew Service to its first connection with %d programmed (clients retry every millisecond)\n", largest)
	fmt.Printf("%-20s %9s %9s\n", "path", "p50", "p99")
	for _, f := range first {
		fmt.Printf("%-20s %s  %s\n", f.path, f.numbers, f.what)
	}
	fmt.Println()
}

func fmtPercentiles(xs []time.Duration) string {
	p50, p99 := pct(xs, 50), pct(xs, 99)
	return fmt.Sprintf("%9s %9s", p50.Round(time.Microsecond), p99.Round(time.Microsecond))
}

// internal is a frontend for clients on the node.
func internal(addr netip.AddrPort, proto loadbalancer.Protocol, backend netip.AddrPort) loadbalancer.Frontend {
	return loadbalancer.Frontend{Address: addr, Protocol: proto, Scope: loadbalancer.Internal,
		Backends: []loadbalancer.Backend{{Address: backend}}}
}

// kubeProxyNode is the Node kube-proxy runs as in BenchmarkClusterIPConnect.
const kubeProxyNode = "portico-bench"

// startClusterAPI starts the API server kube-proxy reads, with its Node at nodeIP (kube-proxy
// takes its node addresses from the Node object).
func startClusterAPI(b *testing.B, nodeIP netip.Addr) (*testenv.Env, *kubernetes.Clientset) {
	b.Helper()
	env := testenv.StartFor(b)
	cs, err := kubernetes.NewForConfig(env.Config)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	node, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: kubeProxyNode}}, metav1.CreateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: nodeIP.String()}}
	if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		b.Fatal(err)
	}
	return env, cs
}
