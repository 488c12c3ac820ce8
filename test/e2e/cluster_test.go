package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/nstest"
	"github.com/portico-dev/portico/test/harness/testenv"
	"github.com/portico-dev/portico/test/harness/wait"
)

// families are the rows of every scenario: index 0 is IPv4, 1 is IPv6, as in lab addresses.
var families = []string{"v4", "v6"}

// cluster is a lab cluster (test/harness/lab): a real API server, kube-controller-manager,
// kube-scheduler, the operator (allocating LoadBalancer addresses from an LBPool on the
// segment) and three simulated nodes, each with its kubelet and cmd/agent; node-1 and node-2
// are in zone-a, node-3 in zone-b. Pods web-1,
// web-2, web-3 (one per node, the lab's echo image) serve on 8080; a Service selects the
// ones endpoints names, so that its EndpointSlices come from the EndpointSlice controller.
// Pod "probe" on node-1 runs clients inside node-1's cgroup (where the socket programs
// are), and the client namespace outside the nodes has a second address per family for
// source-range tests.
type cluster struct {
	c     client.Client
	lab   *lab.Cluster
	net   *lab.Network
	web   []*lab.Pod
	probe *lab.Pod
	// second are the client's second addresses (the first are net.ClientIPs).
	second []netip.Addr
	// bpffs is where the agents pin, under portico/<node>.
	bpffs string
	// porticoctl is the built command.
	porticoctl string
}

func start(t *testing.T) *cluster {
	t.Helper()
	nstest.NeedRoot(t, "creates network namespaces, cgroups and BPF programs")
	testenv.NeedAPI(t)
	dir := t.TempDir()
	bins, err := testenv.Build(dir, "operator", "agent", "porticoctl")
	if err != nil {
		t.Fatal(err)
	}
	bpffs := nstest.BPFFS(t)
	env := testenv.StartFor(t)
	logs := filepath.Join(dir, "logs")
	if err := os.Mkdir(logs, 0o755); err != nil {
		t.Fatal(err)
	}
	lc, err := lab.Up(lab.Config{Name: fmt.Sprintf("pte%d", os.Getpid()%100000), Nodes: 3, Zones: 2, Dir: logs, API: env.Config,
		Assets: testenv.Assets(), Operator: bins[0], Agent: bins[1], BPFFS: bpffs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for i := range lc.Nodes {
				b, _ := os.ReadFile(lc.AgentLog(i))
				t.Logf("%s (end):\n%s", filepath.Base(lc.AgentLog(i)), tail(string(b), 3000))
			}
		}
		if err := lc.Close(); err != nil {
			t.Errorf("stop the lab: %v", err)
		}
	})
	c := &cluster{c: env.Client, lab: lc, net: lc.Network, bpffs: bpffs, porticoctl: bins[2], second: []netip.Addr{netip.MustParseAddr("192.0.2.253"), netip.MustParseAddr("2001:db8::1:fd")}}
	for _, a := range c.second {
		lan := lab.LAN4
		if a.Is6() {
			lan = lab.LAN6
		}
		if err := ip(lc.Client, "addr", "add", netip.PrefixFrom(a, lan.Bits()).String(), "dev", "eth0"); err != nil {
			t.Fatal(err)
		}
	}
	pool := &lbv1.LBPool{ObjectMeta: metav1.ObjectMeta{Name: "segment"}, Spec: lbv1.LBPoolSpec{
		Blocks: []lbv1.IPBlock{{CIDR: "192.0.2.32/27"}, {CIDR: "2001:db8::100/120"}}}}
	if err := env.Client.Create(context.Background(), pool); err != nil {
		t.Fatal(err)
	}
	for i := range lc.Nodes {
		c.web = append(c.web, c.pod(t, fmt.Sprintf("web-%d", i+1), i, nil))
	}
	c.probe = c.pod(t, "probe", 0, nil)
	return c
}

// pod runs a pod of the lab's echo image on node i (bound there, as a DaemonSet's pods
// are), changed by edit, and waits until it runs.
func (c *cluster) pod(t *testing.T, name string, node int, edit func(*corev1.Pod)) *lab.Pod {
	t.Helper()
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", Labels: map[string]string{}},
		Spec: corev1.PodSpec{NodeName: c.net.Nodes[node].Name, TerminationGracePeriodSeconds: ptr.To[int64](5),
			Containers: []corev1.Container{{Name: "echo", Image: lab.EchoImage}}}}
	if edit != nil {
		edit(pod)
	}
	if err := c.c.Create(context.Background(), pod); err != nil {
		t.Fatal(err)
	}
	var p *lab.Pod
	wait.For(t, "pod "+name+" running", func() error {
		if p = c.lab.Kubelets[node].Pod("default", name); p == nil {
			var events corev1.EventList
			_ = c.c.List(context.Background(), &events, client.InNamespace("default"), client.MatchingFields{"involvedObject.name": name})
			var said []string
			for _, e := range events.Items {
				said = append(said, e.Reason+": "+e.Message)
			}
			return fmt.Errorf("not running yet (Events: %v)", said)
		}
		return nil
	})
	return p
}

// service creates a dual-stack Service with port "web" 80 -> 8080 that selects the pods
// endpoints names, changed by edit.
func (c *cluster) service(t *testing.T, name string, edit func(*corev1.Service)) *corev1.Service {
	t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: corev1.ServiceSpec{
			IPFamilyPolicy: ptr.To(corev1.IPFamilyPolicyRequireDualStack),
			IPFamilies:     []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol},
			Ports:          []corev1.ServicePort{{Name: "web", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}},
			Selector:       map[string]string{member(name): "yes"},
		},
	}
	if edit != nil {
		edit(svc)
	}
	if err := c.c.Create(context.Background(), svc); err != nil {
		t.Fatal(err)
	}
	return svc
}

// update changes a Service (and retries on conflicts).
func (c *cluster) update(t *testing.T, svc *corev1.Service, edit func(*corev1.Service)) {
	t.Helper()
	for {
		if err := c.c.Get(context.Background(), client.ObjectKeyFromObject(svc), svc); err != nil {
			t.Fatal(err)
		}
		edit(svc)
		err := c.c.Update(context.Background(), svc)
		if err == nil {
			return
		}
		if !apierrors.IsConflict(err) {
			t.Fatal(err)
		}
	}
}

// ingress waits for the operator to give a LoadBalancer Service its addresses (IPv4, IPv6)
// and has the client reach them through node.
func (c *cluster) ingress(t *testing.T, svc *corev1.Service, node int) []netip.Addr {
	t.Helper()
	addrs := c.addresses(t, svc)
	for _, a := range addrs {
		c.routeVia(t, a, node)
	}
	return addrs
}

func (c *cluster) routeVia(t *testing.T, a netip.Addr, node int) {
	t.Helper()
	if err := c.net.RouteVia(a, c.net.Nodes[node]); err != nil {
		t.Fatal(err)
	}
}

// endpoints makes svc select exactly pods among the web pods (by a label per Service);
// the EndpointSlice controller follows.
func (c *cluster) endpoints(t *testing.T, svc string, pods ...*lab.Pod) {
	t.Helper()
	for _, web := range c.web {
		value := "null"
		if slices.Contains(pods, web) {
			value = `"yes"`
		}
		patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, member(svc), value)
		obj := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: web.Name}}
		if err := c.c.Patch(context.Background(), obj, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
			t.Fatal(err)
		}
	}
}

// member is the label that puts a pod behind Service svc.
func member(svc string) string { return "in-" + svc }

// dial connects from the client namespace (from the client's first address of the family
// unless from is valid), sends a line and returns the echo server's answer:
// "from <backend> for <client as seen>".
func (c *cluster) dial(from netip.AddrPort, to netip.AddrPort) (string, error) {
	conn, err := c.connect(from, to)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	return exchange(conn)
}

// connect opens a TCP connection from the client namespace. It closes with a reset, so that
// its source port is free again at once.
func (c *cluster) connect(from netip.AddrPort, to netip.AddrPort) (*net.TCPConn, error) {
	return c.connectWithin(from, to, time.Second)
}

// connectWithin is connect with a time limit.
func (c *cluster) connectWithin(from netip.AddrPort, to netip.AddrPort, limit time.Duration) (*net.TCPConn, error) {
	var conn net.Conn
	err := lab.In(c.net.Client, func() error {
		if !from.IsValid() {
			from = netip.AddrPortFrom(c.net.ClientIPs[0], 0)
			if to.Addr().Is6() {
				from = netip.AddrPortFrom(c.net.ClientIPs[1], 0)
			}
		}
		d := net.Dialer{Timeout: limit, LocalAddr: net.TCPAddrFromAddrPort(from)}
		var err error
		conn, err = d.Dial("tcp", to.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	tc := conn.(*net.TCPConn)
	_ = tc.SetLinger(0)
	return tc, nil
}

// exchange sends a line on conn and reads the answer, within 2 seconds.
func exchange(conn net.Conn) (string, error) {
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(conn, "hello\n"); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	return strings.TrimSpace(line), err
}

// dialFromProbe connects from the probe pod, whose process runs in node-1's cgroup, and
// returns the answer or the error as bash printed it.
func (c *cluster) dialFromProbe(t *testing.T, to netip.AddrPort) string {
	t.Helper()
	script := fmt.Sprintf("exec 3<>/dev/tcp/%s/%d && echo hello >&3 && read -t 2 line <&3 && echo \"$line\"", to.Addr(), to.Port())
	cmd, cg := nstest.CommandIn(t, c.probe.NS, c.net.Nodes[0].Cgroup, "timeout", "3", "bash", "-c", script)
	defer cg.Close()
	out, _ := cmd.CombinedOutput()
	return strings.TrimSpace(string(out))
}

// get fetches a URL from the client namespace and returns the status code and body.
func (c *cluster) get(to string) (int, string, error) {
	hc := http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (conn net.Conn, err error) {
			err = lab.In(c.net.Client, func() (err error) {
				conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
				return err
			})
			return conn, err
		},
	}}
	resp, err := hc.Get(to)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), err
}

// everyPodAnswers dials (through dial) until each of pods has answered, family f, failing
// on an answer from any other pod.
func everyPodAnswers(t *testing.T, f int, dial func() (string, error), pods ...*lab.Pod) {
	t.Helper()
	seen := map[string]bool{}
	wait.For(t, "answers from "+names(pods), func() error {
		answer, err := dial()
		if err != nil {
			return err
		}
		p, err := answeredBy(answer, f, pods...)
		if err != nil {
			return err
		}
		if seen[p.Name] = true; len(seen) < len(pods) {
			return fmt.Errorf("only %d of %d pods answered so far", len(seen), len(pods))
		}
		return nil
	})
}

// fromClient and fromProbe are dials for everyPodAnswers: from the client namespace, and
// from the probe pod.
func (c *cluster) fromClient(to netip.AddrPort) func() (string, error) {
	return func() (string, error) { return c.dial(netip.AddrPort{}, to) }
}

func (c *cluster) fromProbe(t *testing.T, to netip.AddrPort) func() (string, error) {
	return func() (string, error) { return c.dialFromProbe(t, to), nil }
}

// translatedBy checks that an answer from a pod on another node than node i came through
// node i's own translation: node i SNATs to its own address. LoadBalancer addresses are on
// the segment, so a node without the frontend routes the traffic on to the node that
// announces the address, whose (different) state answers instead.
func (c *cluster) translatedBy(answer string, f, i int) error {
	e, err := lab.ParseEcho(answer)
	if err != nil {
		return err
	}
	if e.Client.Addr() != c.net.Nodes[i].IPs[f] {
		return fmt.Errorf("answer %q did not come through %s's translation", answer, c.net.Nodes[i].Name)
	}
	return nil
}

// answeredBy checks that an echo answer came from one of the pods on port 8080 (in family f),
// and returns which.
func answeredBy(answer string, f int, pods ...*lab.Pod) (*lab.Pod, error) {
	e, err := lab.ParseEcho(answer)
	if err != nil {
		return nil, err
	}
	for _, p := range pods {
		if e.Pod == p.Name && e.Server == netip.AddrPortFrom(p.IPs[f], 8080) {
			return p, nil
		}
	}
	return nil, fmt.Errorf("answer %q is not from %s", answer, names(pods))
}

// isEcho says whether a dial's output is an answer of the echo workload.
func isEcho(s string) bool {
	_, err := lab.ParseEcho(s)
	return err == nil
}

// seenFrom checks the client address the backend saw.
func seenFrom(answer string, a netip.Addr) error {
	if e, err := lab.ParseEcho(answer); err != nil || e.Client.Addr() != a {
		return fmt.Errorf("answer %q: the backend did not see the client as %s", answer, a)
	}
	return nil
}

func names(pods []*lab.Pod) string {
	var s []string
	for _, p := range pods {
		s = append(s, p.Name)
	}
	return strings.Join(s, ", ")
}

func refused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }

// ip runs ip(8) in a namespace.
func ip(ns string, args ...string) error {
	args = append([]string{"-n", ns}, args...)
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
