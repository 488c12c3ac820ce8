package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/test/harness/greeter"
	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/nstest"
	"github.com/portico-dev/portico/test/harness/wait"
)

// l7 checks per-request balancing: curl in a pod on node-1 sends 30 HTTP/1.1 requests over
// one keep-alive connection to a ClusterIP Service of the three web pods. Connection
// balancing sends them all to one pod; with an L7Policy the node's proxy spreads them, round
// robin: 10 each. Without the policy again, one pod answers all.
func (c *cluster) l7(t *testing.T) {
	svc := c.service(t, "l7", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeLoadBalancer })
	t.Cleanup(func() { _ = c.c.Delete(context.Background(), svc) })
	c.endpoints(t, "l7", c.web...)
	lbIPs := c.addresses(t, svc)
	for f, fam := range families {
		t.Run(fam, func(t *testing.T) {
			vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIPs[f]), 80)
			lb := netip.AddrPortFrom(lbIPs[f], 80)
			c.curlSpread(t, f, vip, "one pod answers every request of a connection", func(got map[string]int) bool {
				return len(got) == 1 && got[firstKey(got)] == 30
			})
			pol := &lbv1.L7Policy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "l7-" + fam}, Spec: lbv1.L7PolicySpec{
				TargetRefs: []lbv1.L7TargetReference{{ServiceTargetReference: lbv1.ServiceTargetReference{Name: "l7"}, SectionName: "web"}},
				Protocol:   "HTTP1", Algorithm: "RoundRobin"}}
			if err := c.c.Create(context.Background(), pol); err != nil {
				t.Fatal(err)
			}
			even := func(got map[string]int) bool {
				return len(got) == 3 && got[c.web[0].Name] == 10 && got[c.web[1].Name] == 10 && got[c.web[2].Name] == 10
			}
			c.curlSpread(t, f, vip, "every pod answers 10 of the 30 requests", even)
			// From outside, through the LoadBalancer address and the announcing node's proxy.
			c.curlSpread(t, f, lb, "from the segment too, every pod answers 10", even)
			if err := c.c.Delete(context.Background(), pol); err != nil {
				t.Fatal(err)
			}
			c.curlSpread(t, f, vip, "one pod again, the policy gone", func(got map[string]int) bool {
				return len(got) == 1 && got[firstKey(got)] == 30
			})
		})
	}
}

// curlSpread runs curl with 30 URLs, which it fetches over one keep-alive connection, until
// the answers per pod satisfy ok: in the probe pod (node-1's cgroup) for a cluster IP, in the
// client namespace on the segment for a LoadBalancer address.
func (c *cluster) curlSpread(t *testing.T, f int, to netip.AddrPort, what string, ok func(map[string]int) bool) {
	t.Helper()
	urls := make([]string, 30)
	for i := range urls {
		urls[i] = "http://" + to.String() + "/"
	}
	var got map[string]int
	wait.For(t, what, func() error {
		var out []byte
		var err error
		if to.Addr().IsPrivate() { // a cluster IP: from the probe pod, through node-1's socket layer
			cmd, cg := nstest.CommandIn(t, c.probe.NS, c.net.Nodes[0].Cgroup, "curl", append([]string{"-s", "-m", "5"}, urls...)...)
			out, err = cmd.Output()
			cg.Close()
		} else { // a LoadBalancer address: from the client on the segment
			out, err = exec.Command("ip", append([]string{"netns", "exec", c.net.Client, "curl", "-s", "-m", "5"}, urls...)...).Output()
		}
		got = map[string]int{}
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if p, perr := answeredBy(line, f, c.web...); perr == nil {
				got[p.Name]++
			} else {
				got["? "+line]++
			}
		}
		if err != nil || !ok(got) {
			return fmt.Errorf("curl: %v, answers %v", err, got)
		}
		return nil
	})
}

func firstKey(m map[string]int) string {
	for k := range maps.Keys(m) {
		return k
	}
	return ""
}

// grpcClientEnv runs this test binary as the seed scenario's client (in a pod's namespace and
// cgroup): 300 unary calls over one connection to the address it names, then the answers
// per greeter as JSON.
const grpcClientEnv = "PORTICO_E2E_GRPC_CLIENT"

func TestMain(m *testing.M) {
	if addr := os.Getenv(grpcClientEnv); addr != "" {
		os.Exit(grpcClient(addr))
	}
	os.Exit(m.Run())
}

func grpcClient(addr string) int {
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer cc.Close()
	got := map[string]int{}
	for range 300 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		out, err := greeter.Call(ctx, cc, "hi")
		cancel()
		if err != nil {
			out = "error: " + err.Error()
		}
		got[strings.TrimPrefix(out, "Hello from ")]++
	}
	_ = json.NewEncoder(os.Stdout).Encode(got)
	return 0
}

// grpcSeed is issue "L7Policy"'s seed scenario on real grpc-go: greeters in three pods (one
// per node), one client with one connection making 300 calls through the Service's cluster
// IP. Without an L7Policy every call answers from one greeter (connection balancing, the
// problem); with it every greeter answers and max/min is at most 1.2.
func (c *cluster) grpcSeed(t *testing.T) {
	var names []string
	var pods []*lab.Pod
	for i := range c.net.Nodes {
		name := fmt.Sprintf("greeter-%d", i+1)
		pods = append(pods, c.pod(t, name, i, func(p *corev1.Pod) {
			p.Labels[member("greeter")] = "yes"
			p.Spec.Containers[0].Image = lab.GreeterImage
		}))
		names = append(names, name)
	}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for i, p := range pods {
			addr, _ := exec.Command("ip", "-n", p.NS, "addr", "show", "eth0").CombinedOutput()
			links, _ := exec.Command("ip", "-n", c.net.Nodes[i].NS, "-br", "link").CombinedOutput()
			neigh, _ := exec.Command("ip", "-n", c.net.Nodes[i].NS, "neigh", "show", "dev", "cni0").CombinedOutput()
			ss, _ := exec.Command("ip", "netns", "exec", p.NS, "ss", "-ltn").CombinedOutput()
			t.Logf("%s in %s %v:\n%s\nnode links:\n%s\nnode neighbours:\n%s\nlistening:\n%s", p.Name, p.NS, p.IPs, addr, links, neigh, ss)
		}
	})
	svc := c.service(t, "greeter", func(s *corev1.Service) {
		s.Spec.Ports = []corev1.ServicePort{{Name: "grpc", Protocol: corev1.ProtocolTCP, Port: 50051, TargetPort: intstr.FromInt32(50051)}}
	})
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIPs[0]), 50051)
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		// Which paths from the probe pod (node-1's cgroup) connect: the cluster IP, each
		// greeter. (This found the lab's pod gateway changing its address, TestPodGatewayKeepsItsAddress.)
		targets := []netip.AddrPort{vip}
		for _, p := range pods {
			targets = append(targets, netip.AddrPortFrom(p.IPs[0], 50051))
		}
		for _, to := range targets {
			script := fmt.Sprintf("exec 3<>/dev/tcp/%s/%d && echo connected", to.Addr(), to.Port())
			cmd, cg := nstest.CommandIn(t, c.probe.NS, c.net.Nodes[0].Cgroup, "timeout", "3", "bash", "-c", script)
			out, err := cmd.CombinedOutput()
			cg.Close()
			t.Logf("from the probe pod to %s: %s %v", to, strings.TrimSpace(string(out)), err)
		}
		var eps discoveryv1.EndpointSliceList
		_ = c.c.List(context.Background(), &eps, client.MatchingLabels{discoveryv1.LabelServiceName: "greeter"})
		for _, s := range eps.Items {
			for _, e := range s.Endpoints {
				t.Logf("endpoint %v ready=%v on %v", e.Addresses, e.Conditions.Ready != nil && *e.Conditions.Ready, e.NodeName)
			}
		}
	})
	calls := func(what string, ok func(map[string]int) bool) map[string]int {
		t.Helper()
		var got map[string]int
		wait.For(t, what, func() error {
			cmd, cg := nstest.CommandIn(t, c.probe.NS, c.net.Nodes[0].Cgroup, os.Args[0])
			cmd.Env = append(os.Environ(), grpcClientEnv+"="+vip.String())
			out, err := cmd.Output()
			cg.Close()
			got = nil
			if err == nil {
				err = json.Unmarshal(out, &got)
			}
			if err != nil || !ok(got) {
				return fmt.Errorf("client: %v, answers %v", err, got)
			}
			return nil
		})
		return got
	}
	got := calls("all 300 calls answered by one greeter (connection balancing)", func(got map[string]int) bool {
		return len(got) == 1 && got[firstKey(got)] == 300 && strings.HasPrefix(firstKey(got), "greeter-")
	})
	t.Logf("without an L7Policy: %v", got)
	// As the sample does: retries for connections that fail, and ejection.
	pol := &lbv1.L7Policy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "greeter"}, Spec: lbv1.L7PolicySpec{
		TargetRefs: []lbv1.L7TargetReference{{ServiceTargetReference: lbv1.ServiceTargetReference{Name: "greeter"}, SectionName: "grpc"}},
		Protocol:   "GRPC", Retries: &lbv1.Retries{Attempts: 2}, OutlierDetection: &lbv1.OutlierDetection{ConsecutiveFailures: 3}}}
	if err := c.c.Create(context.Background(), pol); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.c.Delete(context.Background(), pol) })
	t.Cleanup(func() {
		if t.Failed() { // what node-1's proxy listens on, and what the agents say they run
			out, _ := exec.Command("ip", "netns", "exec", c.net.Nodes[0].NS, "ss", "-ltn").CombinedOutput()
			t.Logf("node-1 listens on:\n%s", out)
			var agents lbv1.NodeAgentList
			_ = c.c.List(context.Background(), &agents)
			for _, a := range agents.Items {
				t.Logf("%s: %+v", a.Name, a.Status.Policies)
			}
		}
	})
	got = calls("every greeter answers, max/min at most 1.2", func(got map[string]int) bool {
		lo, hi, sum := 300, 0, 0
		for _, n := range names {
			lo, hi, sum = min(lo, got[n]), max(hi, got[n]), sum+got[n]
		}
		return sum == 300 && lo > 0 && float64(hi) <= 1.2*float64(lo)
	})
	t.Logf("with the L7Policy: %v", got)
	wait.For(t, "the L7Policy Programmed on the 3 nodes", func() error {
		if err := c.c.Get(context.Background(), client.ObjectKeyFromObject(pol), pol); err != nil {
			return err
		}
		if p := meta.FindStatusCondition(pol.Status.Conditions, lbv1.ConditionProgrammed); p == nil || p.Status != metav1.ConditionTrue || pol.Status.ProgrammedNodes != 3 {
			return fmt.Errorf("status %+v", pol.Status)
		}
		return nil
	})
}
