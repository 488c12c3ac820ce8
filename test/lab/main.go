// Command lab runs Portico on one machine: etcd and kube-apiserver, kube-controller-manager,
// kube-scheduler, the operator, and simulated nodes (network namespaces on a bridge, each
// with a node daemon for its pods and a real agent), with a client namespace on the same
// segment. It applies config/samples, shows what Portico did and the traffic it carried,
// and stays up for kubectl until Ctrl-C. `lab down` removes what a lab left behind.
// See docs/lab.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/test/harness/greeter"
	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// name prefixes the lab's namespaces and cgroups; state holds its files while it runs;
// logs keeps the kubeconfig and every component's log until the next lab starts.
const (
	name  = "plab"
	state = "/run/portico-lab"
	logs  = "/tmp/portico-lab"
)

func main() {
	nodes := flag.Int("nodes", 3, "Simulated nodes.")
	zones := flag.Int("zones", 0, "Zones the nodes are spread over in runs (topology.kubernetes.io/zone zone-a, zone-b, …); 0: no zone labels.")
	port := flag.Int("api-port", 16443, "Port of the API server on 127.0.0.1.")
	bin := flag.String("bin", "bin", "Directory with the operator and agent binaries (`make build`).")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: lab [flags] [up|down]\n\n  up    start the lab (default)\n  down  stop a running lab and remove what any lab left behind\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	var err error
	switch flag.Arg(0) {
	case "", "up":
		err = up(*nodes, *zones, *port, *bin)
	case "down":
		err = down()
	default:
		flag.Usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "lab:", err)
		os.Exit(1)
	}
}

func up(nodes, zones, port int, bin string) error {
	began := time.Now()
	ctrl.SetLogger(zap.New(zap.Level(zapcore.ErrorLevel)))
	if err := preflight(port); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := os.MkdirAll(filepath.Join(state, "tmp"), 0o755); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	defer os.RemoveAll(state)
	if err := os.RemoveAll(logs); err != nil {
		return fmt.Errorf("logs: %w", err)
	}
	if err := os.MkdirAll(logs, 0o755); err != nil {
		return fmt.Errorf("logs: %w", err)
	}
	// Every process the lab starts is in this cgroup, so that `lab down` finds them all
	// even after the lab was killed; envtest's directories go under the state directory.
	procs, err := joinCgroup()
	if err != nil {
		return err
	}
	defer leaveCgroup(procs)
	os.Setenv("TMPDIR", filepath.Join(state, "tmp"))
	if err := os.WriteFile(filepath.Join(state, "lab.pid"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return fmt.Errorf("pid file: %w", err)
	}
	bpffs := filepath.Join(state, "bpffs")
	if err := os.Mkdir(bpffs, 0o755); err != nil {
		return fmt.Errorf("bpffs: %w", err)
	}
	if err := syscall.Mount("bpf", bpffs, "bpf", 0, ""); err != nil {
		return fmt.Errorf("mount bpffs: %w", err)
	}
	defer syscall.Unmount(bpffs, 0)

	step("Starting etcd and kube-apiserver on 127.0.0.1:%d", port)
	env, err := testenv.StartOn(port)
	if err != nil {
		return err
	}
	defer func() { _ = env.Stop() }()
	step("Starting %d nodes, kube-controller-manager, kube-scheduler, the operator and the agents", nodes)
	c, err := lab.Up(lab.Config{Name: name, Nodes: nodes, Zones: zones, Dir: logs, API: env.Config, Assets: testenv.Assets(),
		Operator: filepath.Join(bin, "operator"), Agent: filepath.Join(bin, "agent"), BPFFS: bpffs})
	if err != nil {
		return err
	}
	defer func() {
		step("Stopping the lab")
		if err := c.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "lab:", err)
		}
	}()
	step("Applying config/samples")
	samples, err := testenv.Samples()
	if err != nil {
		return err
	}
	for _, obj := range samples {
		if err := env.Client.Create(ctx, obj); err != nil {
			return fmt.Errorf("apply %s %s: %w", obj.GetObjectKind().GroupVersionKind().Kind, obj.GetName(), err)
		}
	}
	step("Waiting for the web Deployment's pods and the web Service's addresses")
	svc, announced, err := waitWeb(ctx, env.Client, c)
	if err != nil {
		return err
	}
	if err := show(ctx, env.Client, c, svc, announced); err != nil {
		return err
	}
	if err := showGRPC(ctx, env.Client, c); err != nil {
		return err
	}
	fmt.Printf("\nUp with first results in %.1f s. Try:\n", time.Since(began).Seconds())
	fmt.Printf("  export KUBECONFIG=%s\n  kubectl get lbpools,svc,pods -o wide\n", c.Kubeconfig)
	for _, a := range loadbalancer.IngressIPs(svc) {
		fmt.Printf("  ip netns exec %s curl -s '%s'\n", c.Client, url(a))
	}
	fmt.Printf("  kubectl scale deployment web --replicas 5\n")
	fmt.Printf("Logs are in %s. Ctrl-C here (or `make lab-down` elsewhere) stops the lab.\n", logs)
	select {
	case <-ctx.Done():
	case err := <-c.Failed():
		return err
	}
	return nil
}

func step(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }

// preflight fails with what to do when the lab cannot start here.
func preflight(port int) error {
	if os.Geteuid() != 0 {
		return errors.New("the lab needs root: it creates network namespaces, cgroups and BPF programs (sudo make lab)")
	}
	if pid, ok := running(); ok {
		return fmt.Errorf("a lab is already running (pid %d): stop it with Ctrl-C in its terminal, or `make lab-down`", pid)
	}
	if left := leftovers(); len(left) > 0 {
		return fmt.Errorf("a previous lab was left behind (%s): `make lab-down` removes it", strings.Join(left, ", "))
	}
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return fmt.Errorf("the API server's port %d is taken (%w): free it, or choose another with `make lab LAB_ARGS=-api-port=N`", port, err)
	}
	return ln.Close()
}

// running returns the pid of a running lab.
func running() (int, bool) {
	b, err := os.ReadFile(filepath.Join(state, "lab.pid"))
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid, err == nil && syscall.Kill(pid, 0) == nil
}

// leftovers lists what a lab that did not stop cleanly left: namespaces, cgroups, files.
func leftovers() []string {
	var left []string
	namespaces, _ := filepath.Glob("/run/netns/" + name + "-*")
	if len(namespaces) > 0 {
		left = append(left, fmt.Sprintf("%d network namespaces %s-*", len(namespaces), name))
	}
	if cg, err := lab.CgroupRoot(); err == nil {
		for _, d := range []string{"portico-" + name, "portico-" + name + "-procs"} {
			if _, err := os.Stat(filepath.Join(cg, d)); err == nil {
				left = append(left, "cgroup "+d)
			}
		}
	}
	if _, err := os.Stat(state); err == nil {
		left = append(left, state)
	}
	return left
}

// down stops a running lab and removes whatever any lab left behind.
func down() error {
	if os.Geteuid() != 0 {
		return errors.New("removing the lab needs root")
	}
	if pid, ok := running(); ok {
		fmt.Printf("Stopping the lab (pid %d)\n", pid)
		_ = syscall.Kill(pid, syscall.SIGTERM)
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			if syscall.Kill(pid, 0) != nil {
				break
			}
		}
	}
	var errs []error
	if cg, err := lab.CgroupRoot(); err == nil {
		for _, d := range []string{"portico-" + name + "-procs", "portico-" + name} {
			dir := filepath.Join(cg, d)
			if _, err := os.Stat(dir); err == nil {
				fmt.Println("Killing the processes of cgroup", d)
				_ = os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
				errs = append(errs, lab.RemoveCgroup(dir))
			}
		}
	}
	namespaces, _ := filepath.Glob("/run/netns/" + name + "-*")
	for _, ns := range namespaces {
		if out, err := exec.Command("ip", "netns", "del", filepath.Base(ns)).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del: %w: %s", err, out))
		}
	}
	if len(namespaces) > 0 {
		fmt.Printf("Removed %d network namespaces\n", len(namespaces))
	}
	if _, err := os.Stat(state); err == nil {
		_ = syscall.Unmount(filepath.Join(state, "bpffs"), 0)
		errs = append(errs, os.RemoveAll(state))
		fmt.Println("Removed", state)
	}
	return errors.Join(errs...)
}

// joinCgroup moves this process (and so every process it starts) into the lab's cgroup.
func joinCgroup() (string, error) {
	cg, err := lab.CgroupRoot()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cg, "portico-"+name+"-procs")
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", fmt.Errorf("create cgroup: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
		return "", fmt.Errorf("join cgroup: %w", err)
	}
	return dir, nil
}

// leaveCgroup moves this process out of the lab's cgroup and removes it.
func leaveCgroup(dir string) error {
	_ = os.WriteFile(filepath.Join(filepath.Dir(dir), "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0)
	return lab.RemoveCgroup(dir)
}

// waitWeb waits until the web Service has its addresses, every web pod is ready and listed
// ready in the Service's EndpointSlices of each family (a pod is ready a moment before the
// EndpointSlice controller says so, and only then do the agents balance over it), and a node
// announces each address; it returns the Service and who announces what.
func waitWeb(ctx context.Context, c client.Client, lc *lab.Cluster) (*corev1.Service, map[string]string, error) {
	var svc corev1.Service
	var dep appsv1.Deployment
	var agents lbv1.NodeAgentList
	var slices discoveryv1.EndpointSliceList
	deadline := time.Now().Add(60 * time.Second)
	for {
		errSvc := c.Get(ctx, client.ObjectKey{Namespace: "default", Name: "web"}, &svc)
		errDep := c.Get(ctx, client.ObjectKey{Namespace: "default", Name: "web"}, &dep)
		errAgents := c.List(ctx, &agents)
		errSlices := c.List(ctx, &slices, client.InNamespace("default"), client.MatchingLabels{discoveryv1.LabelServiceName: "web"})
		if err := errors.Join(errSvc, errDep, errAgents, errSlices); err != nil {
			return nil, nil, err
		}
		listed := map[discoveryv1.AddressType]int32{}
		for _, es := range slices.Items {
			for _, e := range es.Endpoints {
				if e.Conditions.Ready == nil || *e.Conditions.Ready {
					listed[es.AddressType]++
				}
			}
		}
		announced := map[string]string{}
		for _, a := range agents.Items {
			for _, ann := range a.Status.Announcements {
				announced[ann.Address] = fmt.Sprintf("%s on %s", a.Name, strings.Join(ann.Interfaces, ","))
			}
		}
		all := len(svc.Status.LoadBalancer.Ingress) > 0
		for _, in := range svc.Status.LoadBalancer.Ingress {
			all = all && announced[in.IP] != ""
		}
		for _, f := range svc.Spec.IPFamilies {
			all = all && listed[discoveryv1.AddressType(f)] == *dep.Spec.Replicas
		}
		if all && dep.Status.ReadyReplicas == *dep.Spec.Replicas {
			return &svc, announced, nil
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case err := <-lc.Failed():
			return nil, nil, err
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, nil, fmt.Errorf("after 60 s the web Service has addresses %v (announced: %v), %d of %d pods are ready, and its EndpointSlices list %v ready; see the logs in %s",
				svc.Status.LoadBalancer.Ingress, announced, dep.Status.ReadyReplicas, *dep.Spec.Replicas, listed, logs)
		}
	}
}

// show prints the pool, the web Service and its pods, and what curl in the client namespace
// gets from each of its addresses.
func show(ctx context.Context, c client.Client, lc *lab.Cluster, svc *corev1.Service, announced map[string]string) error {
	var pools lbv1.LBPoolList
	if err := c.List(ctx, &pools); err != nil {
		return fmt.Errorf("list pools: %w", err)
	}
	fmt.Println()
	for _, p := range pools.Items {
		ready := meta.FindStatusCondition(p.Status.Conditions, "Ready")
		fmt.Printf("LBPool %s: %s", p.Name, blocks(p))
		if ready != nil {
			fmt.Printf(" (Ready=%s: %s)", ready.Status, ready.Message)
		}
		fmt.Println()
	}
	if cond := meta.FindStatusCondition(svc.Status.Conditions, lbv1.ServiceConditionIPAllocated); cond != nil {
		fmt.Printf("Service web: %s\n", cond.Message)
	}
	var pods corev1.PodList
	if err := c.List(ctx, &pods, client.InNamespace("default"), client.MatchingLabels{"app": "web"}); err != nil {
		return fmt.Errorf("list pods: %w", err)
	}
	for _, p := range pods.Items {
		var ips []string
		for _, a := range p.Status.PodIPs {
			ips = append(ips, a.IP)
		}
		fmt.Printf("  pod %-22s on %s  %s\n", p.Name, p.Spec.NodeName, strings.Join(ips, ", "))
	}
	fmt.Printf("\nFrom the client namespace %s (no route out of the machine):\n", lc.Client)
	for _, a := range loadbalancer.IngressIPs(svc) {
		fmt.Printf("  %s is announced (ARP/NDP) by %s\n", a, announced[a.String()])
		counts := map[string]int{}
		// Random balancing: 30 connections miss one of three pods once in 60,000 runs.
		for range curls {
			out, err := exec.CommandContext(ctx, "ip", "netns", "exec", lc.Client, "curl", "-s", "-m", "2", url(a)).Output()
			answer := strings.TrimSpace(string(out))
			if e, perr := lab.ParseEcho(answer); perr == nil {
				answer = fmt.Sprintf("%s on %s saw the client as %s", e.Pod, e.Node, e.Client.Addr())
			} else if err != nil {
				answer = "curl failed: " + err.Error()
			}
			counts[answer]++
		}
		fmt.Printf("  $ curl %s   (%d times)\n", url(a), curls)
		printCounts("    ", counts)
	}
	return nil
}

// printCounts prints how many times each answer came, sorted by answer.
func printCounts(indent string, counts map[string]int) {
	var lines []string
	for answer, n := range counts {
		lines = append(lines, fmt.Sprintf("%s%3d x %s", indent, n, answer))
	}
	sort.Strings(lines)
	fmt.Println(strings.Join(lines, "\n"))
}

// curls is how many times the lab curls each address.
const curls = 30

// showGRPC waits until the greeter Service's address is announced and its L7Policy is in
// force on every node, then makes 300 gRPC calls over one connection from the client
// namespace and prints which greeter answered how many: the L7 proxy balances calls, not
// connections.
func showGRPC(ctx context.Context, c client.Client, lc *lab.Cluster) error {
	var svc corev1.Service
	var pol lbv1.L7Policy
	var addr netip.Addr
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		err := errors.Join(c.Get(ctx, client.ObjectKey{Namespace: "default", Name: "greeter"}, &svc),
			c.Get(ctx, client.ObjectKey{Namespace: "default", Name: "greeter"}, &pol))
		if ips := loadbalancer.IngressIPs(&svc); err == nil && len(ips) > 0 && meta.IsStatusConditionTrue(pol.Status.Conditions, lbv1.ConditionProgrammed) {
			addr = ips[0]
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("after 60 s the greeter Service has addresses %v and its L7Policy %+v (%v); see the logs in %s", svc.Status.LoadBalancer.Ingress, pol.Status.Conditions, err, logs)
		}
	}
	to := netip.AddrPortFrom(addr, 50051).String()
	cc, err := grpc.NewClient("passthrough:///"+to, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, a string) (conn net.Conn, err error) {
			err = lab.In(lc.Client, func() (err error) { conn, err = (&net.Dialer{}).DialContext(ctx, "tcp", a); return err })
			return conn, err
		}))
	if err != nil {
		return err
	}
	defer cc.Close()
	counts := map[string]int{}
	for range 300 {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		out, err := greeter.Call(cctx, cc, "hi")
		cancel()
		if err != nil {
			out = "error: " + err.Error()
		}
		counts[out]++
	}
	fmt.Printf("\ngRPC: 300 calls over one connection to %s (L7Policy greeter: per call, %s):\n", to, pol.Spec.Algorithm)
	printCounts("  ", counts)
	return nil
}

func blocks(p lbv1.LBPool) string {
	var s []string
	for _, b := range p.Spec.Blocks {
		if b.CIDR != "" {
			s = append(s, b.CIDR)
		} else {
			s = append(s, b.Start+"-"+b.Stop)
		}
	}
	return strings.Join(s, ", ")
}

func url(a netip.Addr) string {
	return "http://" + netip.AddrPortFrom(a, 80).String() + "/"
}
