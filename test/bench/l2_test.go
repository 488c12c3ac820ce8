package bench

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ndp"
	"golang.org/x/net/ipv6"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/announce"
	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/nstest"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// failoverKills is how many node deaths BenchmarkL2Failover measures per family.
var failoverKills = envInt("BENCH_L2_KILLS", 20)

// heard is an ARP packet or neighbour advertisement the router saw for an address.
type heard struct {
	at  time.Time
	ip  netip.Addr
	mac string
}

// BenchmarkL2Failover runs the lab (three nodes, real agents, the operator) with a dual-stack
// LoadBalancer Service and kills the node that announces an address, over and over: its
// agent is SIGKILLed and the bridge drops its frames at the same instant (lab.Cut). From the router
// namespace it measures the time from the kill to the first ARP packet / neighbour
// advertisement for the address from another node, and to the first TCP connection through
// the address that gets an answer. Then the node comes back, takes its address back, and the
// next kill follows. Run it as root with -benchtime 1x.
func BenchmarkL2Failover(b *testing.B) {
	nstest.NeedRoot(b, "creates network namespaces and BPF programs")
	env := testenv.StartFor(b)
	ctx := context.Background()
	dir := b.TempDir()
	bins, err := testenv.Build(dir, "operator", "agent")
	if err != nil {
		b.Fatal(err)
	}
	lc, err := lab.Up(lab.Config{Name: fmt.Sprintf("pbf%d", os.Getpid()%100000), Nodes: 3, Dir: dir, API: env.Config,
		Assets: testenv.Assets(), Operator: bins[0], Agent: bins[1], BPFFS: nstest.BPFFS(b)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if b.Failed() {
			var agents lbv1.NodeAgentList
			_ = env.Client.List(ctx, &agents)
			for _, a := range agents.Items {
				b.Logf("%s announces %v", a.Name, a.Status.Announcements)
			}
			var events corev1.EventList
			_ = env.Client.List(ctx, &events, client.InNamespace("default"))
			for _, e := range events.Items {
				b.Logf("event %s %s: %s", e.LastTimestamp.Format(time.TimeOnly), e.Reason, e.Message)
			}
			out, _ := exec.Command("ip", "netns", "exec", lc.Client, "ip", "neigh").CombinedOutput()
			b.Logf("router neighbours:\n%s", out)
			for i := range lc.Nodes {
				log, _ := os.ReadFile(lc.AgentLog(i))
				b.Logf("%s (end):\n%s", filepath.Base(lc.AgentLog(i)), log[max(0, len(log)-3000):])
			}
		}
		if err := lc.Close(); err != nil {
			b.Error(err)
		}
	})
	objs := []client.Object{
		&lbv1.LBPool{ObjectMeta: metav1.ObjectMeta{Name: "segment"}, Spec: lbv1.LBPoolSpec{
			Blocks: []lbv1.IPBlock{{CIDR: "192.0.2.32/27"}, {CIDR: "2001:db8::100/120"}}}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "failover"}, Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeLoadBalancer, IPFamilyPolicy: ptr.To(corev1.IPFamilyPolicyRequireDualStack),
			Selector: map[string]string{"app": "failover"},
			Ports:    []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt(8080), Protocol: corev1.ProtocolTCP}}}},
	}
	for i, n := range lc.Nodes {
		objs = append(objs, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: fmt.Sprintf("web-%d", i+1), Labels: map[string]string{"app": "failover"}},
			Spec: corev1.PodSpec{NodeName: n.Name, Containers: []corev1.Container{{Name: "echo", Image: lab.EchoImage,
				Ports: []corev1.ContainerPort{{ContainerPort: 8080}}}}}})
	}
	for _, o := range objs {
		if err := env.Client.Create(ctx, o); err != nil {
			b.Fatal(err)
		}
	}
	var addrs [2]netip.Addr
	poll(b, 60*time.Second, "the Service's addresses", func() bool {
		var svc corev1.Service
		if env.Client.Get(ctx, client.ObjectKey{Namespace: "default", Name: "failover"}, &svc) != nil {
			return false
		}
		for _, a := range loadbalancer.IngressIPs(&svc) {
			addrs[map[bool]int{true: 0, false: 1}[a.Is4()]] = a
		}
		return addrs[0].IsValid() && addrs[1].IsValid()
	})
	macs := map[string]int{}
	for i, n := range lc.Nodes {
		mac, err := n.MAC()
		if err != nil {
			b.Fatal(err)
		}
		macs[mac] = i
	}
	events := listen(b, lc.Client)
	// announcer is the one node whose NodeAgent reports announcing a, if there is one.
	announcer := func(a netip.Addr) (int, bool) {
		var agents lbv1.NodeAgentList
		if env.Client.List(ctx, &agents) != nil {
			return 0, false
		}
		found := -1
		for _, ag := range agents.Items {
			for _, ann := range ag.Status.Announcements {
				if ann.Address == a.String() {
					if found >= 0 {
						return 0, false
					}
					found = slices.IndexFunc(lc.Nodes, func(n *lab.Node) bool { return n.Name == ag.Name })
				}
			}
		}
		return found, found >= 0
	}
	// settled says whether every address is announced by the node that ranks first for it,
	// as when all nodes are live and warmed up: a node that took an address over while the
	// first-ranked one was away gives it back, so the next kill starts from a known state.
	names := make([]string, len(lc.Nodes))
	for i, n := range lc.Nodes {
		names[i] = n.Name
	}
	settled := func() bool {
		for _, a := range addrs {
			if i, ok := announcer(a); !ok || names[i] != announce.Choose(a, names) {
				return false
			}
		}
		return true
	}
	// resolved has the router resolve a afresh (its entry may name a node that forwarded it
	// before, not the announcer: any node's datapath translates it) and says whether the
	// entry now names node i and a connection through it works.
	resolved := func(a netip.Addr, i int) bool {
		_ = exec.Command("ip", "netns", "exec", lc.Client, "ip", "neigh", "del", a.String(), "dev", "eth0").Run()
		n, ok := macs[neighbourAfterConnect(lc.Network, a)]
		return ok && n == i
	}
	families := []string{"IPv4", "IPv6"}
	announced, connected := make([][]time.Duration, 2), make([][]time.Duration, 2)
	for kill := 0; kill < 6*failoverKills && (len(announced[0]) < failoverKills || len(announced[1]) < failoverKills); kill++ {
		f := 0
		if len(announced[1]) < len(announced[0]) {
			f = 1
		}
		var victim int
		var ok bool
		poll(b, 30*time.Second, "every address announced by its first-ranked node", settled)
		poll(b, 30*time.Second, "one node announcing "+addrs[f].String(), func() bool {
			victim, ok = announcer(addrs[f])
			return ok && resolved(addrs[f], victim)
		})
		measured := []int{f}
		if other, ok := announcer(addrs[1-f]); ok && other == victim && resolved(addrs[1-f], victim) {
			measured = append(measured, 1-f)
		}
		for len(events) > 0 {
			<-events
		}
		t0 := time.Now()
		if err := lc.Cut(lc.Nodes[victim]); err != nil {
			b.Fatal(err)
		}
		if err := lc.Agents[victim].Kill(); err != nil {
			b.Fatal(err)
		}
		results := make(chan [3]int64, len(measured))
		for _, g := range measured {
			go func() {
				for time.Since(t0) < 10*time.Second {
					if connects(lc.Client, addrs[g], 50*time.Millisecond) {
						results <- [3]int64{int64(g), 1, int64(time.Since(t0))}
						return
					}
					time.Sleep(5 * time.Millisecond)
				}
				results <- [3]int64{int64(g), 1, -1}
			}()
		}
		pending := map[int]bool{}
		for _, g := range measured {
			pending[g] = true
		}
		deadline := time.After(10 * time.Second)
		for waiting := 2 * len(measured); waiting > 0; {
			select {
			case e := <-events:
				g := map[bool]int{true: 0, false: 1}[e.ip.Is4()]
				if e.ip == addrs[g] && pending[g] && macs[e.mac] != victim {
					pending[g] = false
					announced[g] = append(announced[g], e.at.Sub(t0))
					waiting--
				}
			case r := <-results:
				if r[2] < 0 {
					b.Fatalf("no connection to %s through another node within 10 s of killing node-%d", addrs[r[0]], victim+1)
				}
				connected[r[0]] = append(connected[r[0]], time.Duration(r[2]))
				waiting--
			case <-deadline:
				var missed []netip.Addr
				for g, p := range pending {
					if p {
						missed = append(missed, addrs[g])
					}
				}
				b.Fatalf("kill %d: no ARP/NA for %v from another node within 10 s of killing node-%d (connections measured: %v)", kill+1, missed, victim+1, connected)
			}
		}
		if err := lc.Mend(lc.Nodes[victim]); err != nil {
			b.Fatal(err)
		}
		if err := lc.StartAgent(victim); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	fmt.Printf("\nL2 failover, %d node kills per family (agent SIGKILL + its frames dropped at the bridge), 3 nodes, heartbeat 100 ms, dead after 400 ms:\n", failoverKills)
	fmt.Printf("  %-6s %-40s %9s %9s %9s\n", "family", "from the kill to", "p50", "p99", "max")
	for g, fam := range families {
		for _, row := range []struct {
			what string
			d    []time.Duration
		}{{"the first ARP/NA from the new node", announced[g]}, {"the first TCP connection through it", connected[g]}} {
			p50, p99, max := pct(row.d, 50).Round(time.Millisecond), pct(row.d, 99).Round(time.Millisecond), pct(row.d, 100).Round(time.Millisecond)
			fmt.Printf("  %-6s %-40s %9s %9s %9s\n", fam, row.what, p50, p99, max)
			b.ReportMetric(float64(p50.Milliseconds()), strings.ToLower(fam)+"-"+map[bool]string{true: "announce", false: "connect"}[strings.Contains(row.what, "ARP")]+"-p50-ms")
		}
	}
	fmt.Println("  anchors (published): MetalLB L2 \"a few seconds\" (users report 35 s+); Cilium L2 announcements 10-20 s with default leases; PureLB 2.4-3.8 s")
}

// listen reports every ARP packet and neighbour advertisement the router namespace ns
// receives, until the benchmark ends.
func listen(b *testing.B, ns string) chan heard {
	b.Helper()
	out := make(chan heard, 1024)
	var ac *arp.Client
	var nc *ndp.Conn
	err := lab.In(ns, func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		if ac, err = arp.Dial(ifi); err != nil {
			return err
		}
		if nc, _, err = ndp.Listen(ifi, ndp.LinkLocal); err != nil {
			return err
		}
		var f ipv6.ICMPFilter
		f.SetAll(true)
		f.Accept(ipv6.ICMPTypeNeighborAdvertisement)
		return nc.SetICMPFilter(&f)
	})
	if err != nil {
		b.Fatal(err)
	}
	send := func(h heard) {
		select {
		case out <- h:
		default: // nobody is waiting for it
		}
	}
	done := make(chan struct{}, 2)
	go func() {
		defer func() { done <- struct{}{} }()
		for {
			p, _, err := ac.Read()
			if err != nil {
				return
			}
			send(heard{at: time.Now(), ip: p.SenderIP, mac: p.SenderHardwareAddr.String()})
		}
	}()
	go func() {
		defer func() { done <- struct{}{} }()
		for {
			m, _, _, err := nc.ReadFrom()
			if err != nil {
				return
			}
			if na, ok := m.(*ndp.NeighborAdvertisement); ok {
				for _, o := range na.Options {
					if lla, ok := o.(*ndp.LinkLayerAddress); ok && lla.Direction == ndp.Target {
						send(heard{at: time.Now(), ip: na.TargetAddress, mac: lla.Addr.String()})
					}
				}
			}
		}
	}()
	b.Cleanup(func() {
		_ = ac.Close()
		_ = nc.Close()
		<-done
		<-done
	})
	return out
}

// connects says whether a TCP connection from namespace ns to a:80 gets an echo answer.
func connects(ns string, a netip.Addr, limit time.Duration) bool {
	return lab.In(ns, func() error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(a, 80).String(), limit)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.Write([]byte("hello\n")); err != nil {
			return err
		}
		buf := make([]byte, 512)
		_, err = c.Read(buf)
		return err
	}) == nil
}

// neighbourAfterConnect connects from the client to a and returns the MAC address the
// client's kernel resolved a to ("" when the connection failed or there is no entry).
func neighbourAfterConnect(n *lab.Network, a netip.Addr) string {
	if !connects(n.Client, a, time.Second) {
		return ""
	}
	mac, _ := n.Neighbour(a)
	return mac
}

func poll(b *testing.B, limit time.Duration, what string, ok func() bool) {
	b.Helper()
	for t0 := time.Now(); !ok(); time.Sleep(20 * time.Millisecond) {
		if time.Since(t0) > limit {
			b.Fatalf("waited %v for %s", limit, what)
		}
	}
}
