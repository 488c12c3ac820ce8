package cli_test

import (
	"bytes"
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/cli"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// The commands on a real API server with the operator running: a dual-stack Service gets its
// addresses, node-1 announces the IPv4 one, the IPv6 one is announced by nobody, a second
// Service waits for an address, and a ServicePolicy applies to the first.
func TestCommands(t *testing.T) {
	env := testenv.WithOperator(t)
	ctx := context.Background()
	c := env.Client

	web := func(name string) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name}, Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeLoadBalancer, IPFamilyPolicy: ptr.To(corev1.IPFamilyPolicyPreferDualStack),
			IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol}, Selector: map[string]string{"app": name},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}}}
	}
	l7 := func(name string) *lbv1.L7Policy {
		return &lbv1.L7Policy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name}, Spec: lbv1.L7PolicySpec{Protocol: "HTTP1",
			TargetRefs: []lbv1.L7TargetReference{{ServiceTargetReference: lbv1.ServiceTargetReference{Name: "web"}, SectionName: "http"}}}}
	}
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}}
	webSvc := web("web")
	webSvc.Spec.TrafficDistribution = ptr.To(corev1.ServiceTrafficDistributionPreferSameZone)
	zone := func(z string) *discoveryv1.EndpointHints {
		return &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: z}}}
	}
	objs := []client.Object{
		&lbv1.LBPool{ObjectMeta: metav1.ObjectMeta{Name: "edge"}, Spec: lbv1.LBPoolSpec{Blocks: []lbv1.IPBlock{{CIDR: "192.0.2.10/32"}, {CIDR: "2001:db8::10/127"}},
			Announce: &lbv1.Announcement{L2: &lbv1.L2Announcement{NodeSelector: &lbv1.LabelSelector{MatchLabels: map[string]lbv1.LabelValue{"edge": "true"}}}}}},
		webSvc,
		&discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
			AddressType: discoveryv1.AddressTypeIPv4, Ports: []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(int32(8080))}},
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.244.1.5"}, NodeName: ptr.To("node-1"), Hints: zone("a")},
				{Addresses: []string{"10.244.2.5"}, NodeName: ptr.To("node-2"), Hints: zone("b")}}},
		node,
		&lbv1.ServicePolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "sticky"}, Spec: lbv1.ServicePolicySpec{
			TargetRefs: []lbv1.ServiceTargetReference{{Name: "web"}}, LoadBalancing: &lbv1.LoadBalancing{Algorithm: lbv1.AlgorithmMaglev}}},
		l7("balance"), l7("zz-later"), // the older (or, created in the same second, the first by name) wins
	}
	for _, o := range objs {
		if err := c.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	node.Labels = map[string]string{"edge": "true", corev1.LabelTopologyZone: "a"}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.0.2.241"}}
	if err := c.Update(ctx, node); err != nil {
		t.Fatal(err)
	}
	// node-1's agent says it announces the IPv4 address.
	agent := &lbv1.NodeAgent{ObjectMeta: metav1.ObjectMeta{Name: "node-1"}}
	if err := c.Create(ctx, agent); err != nil {
		t.Fatal(err)
	}
	agent.Status = lbv1.NodeAgentStatus{Version: "v0.1.0", Services: 2, Frontends: 9,
		Conditions:    []metav1.Condition{{Type: lbv1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Synced", LastTransitionTime: metav1.Now()}},
		Announcements: []lbv1.AnnouncedAddress{{Address: "192.0.2.10", Service: "default/web", Interfaces: []string{"eth0"}}}, LivePeers: []string{"node-2", "node-3"}}
	if err := c.Status().Update(ctx, agent); err != nil {
		t.Fatal(err)
	}
	// The second Service finds the IPv4 block used up.
	waitFor(t, c, "web", func(s *corev1.Service) bool { return len(s.Status.LoadBalancer.Ingress) == 2 })
	if err := c.Create(ctx, web("late")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, c, "late", func(s *corev1.Service) bool { return len(s.Status.Conditions) > 0 })

	run := func(cmd func(*cli.CLI) error, want ...string) {
		t.Helper()
		var out bytes.Buffer
		var err error
		for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			out.Reset()
			if err = cmd(&cli.CLI{Client: c, Out: &out}); err != nil {
				continue
			}
			missing := ""
			text := spaces.ReplaceAllString(out.String(), " ") // columns: one space
			for _, w := range want {
				if !strings.Contains(text, spaces.ReplaceAllString(w, " ")) {
					missing = w
					break
				}
			}
			if missing == "" {
				t.Log("\n" + out.String())
				return
			}
			err = fmt.Errorf("no %q", missing)
		}
		t.Fatalf("%v in:\n%s", err, out.String())
	}
	bg := context.Background()
	run(func(c *cli.CLI) error { return c.Pools(bg) },
		"edge True (Ready) 1/0 2/0 False (NoConflict) 192.0.2.10/32,2001:db8::10/127") // used/free per family
	run(func(c *cli.CLI) error { return c.Announcements(bg) },
		"192.0.2.10 default/web edge node-1 eth0",
		"2001:db8::10 default/web edge none none")
	run(func(c *cli.CLI) error { return c.Nodes(bg) },
		"node-1 True (Synced) v0.1.0 2 9 none 192.0.2.10 node-2, node-3")
	run(func(c *cli.CLI) error { return c.Explain(bg, "default", "web") },
		"Service default/web: type LoadBalancer, externalTrafficPolicy Cluster",
		"Addresses: 192.0.2.10 from pool edge, 2001:db8::10 from pool edge",
		"192.0.2.10 is announced (ARP/NDP) by node-1 on eth0; eligible: node-1",
		"2001:db8::10 is not announced yet: eligible nodes node-1, none reports it",
		"Endpoints: 2 ready (node-1: 1, node-2: 1), 0 terminating",
		"Topology: PreferSameZone; the EndpointSlices carry hints; Cluster traffic from each node goes to:\n"+
			" node-1 (zone a) IPv4: PreferSameZone, 1 of 2 endpoints: 10.244.1.5\n node-1 (zone a) IPv6: every endpoint (no hint applies to this node): none",
		"Policies:\n ServicePolicy sticky (web): programmed on", "\n L7Policy balance (web/http): programmed on")
	var out bytes.Buffer
	if err := (&cli.CLI{Client: c, Out: &out}).Explain(bg, "default", "web"); err != nil || strings.Contains(out.String(), "zz-later") {
		t.Fatalf("explain web: %v; want the L7Policy that lost web/http left out:\n%s", err, out.String())
	}
	run(func(c *cli.CLI) error { return c.Explain(bg, "default", "late") },
		"IPAllocated=False (PoolExhausted)", "Endpoints: 0 ready (none)", "no ready endpoint: connections are refused",
		"Warning PoolExhausted")
}

var spaces = regexp.MustCompile(` {2,}`)

func waitFor(t *testing.T, c client.Client, name string, ok func(*corev1.Service) bool) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		var s corev1.Service
		if c.Get(context.Background(), client.ObjectKey{Namespace: "default", Name: name}, &s) == nil && ok(&s) {
			return
		}
	}
	t.Fatalf("Service %s: not there in time", name)
}
