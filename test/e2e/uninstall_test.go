package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/nstest"
	"github.com/portico-dev/portico/test/harness/wait"
)

// uninstall removes Portico from node-3 twice, the two ways a user does, and checks each
// time that the node is left as the lab made it: no program on its interface (TCX) or its
// cgroup, no pins, the same addresses. First the agents' DaemonSet is deleted, and the
// agent (started with --daemonset, as the operator starts it) uninstalls as it stops. Then
// an agent stopped while the DaemonSet stays (a node the DaemonSet no longer selects) keeps
// its pins and programs, and porticoctl uninstall-node removes them. Between the two and at
// the end, a new agent serves the node again.
func (c *cluster) uninstall(t *testing.T) {
	const i = 2
	node := c.net.Nodes[i]
	svc := c.service(t, "gone", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeNodePort })
	c.endpoints(t, "gone", c.web[0])
	viaNode := func(t *testing.T) {
		t.Helper()
		for f := range families {
			everyPodAnswers(t, f, c.fromClient(netip.AddrPortFrom(node.IPs[f], uint16(svc.Spec.Ports[0].NodePort))), c.web[0])
		}
	}
	viaNode(t)
	addrs := c.addrs(t, node)
	if got := c.programs(t, node); got == 0 {
		t.Fatal("node-3's agent runs, but no program is attached to its interface or cgroup")
	}
	clean := func(t *testing.T, how string) {
		t.Helper()
		if got := c.programs(t, node); got != 0 {
			t.Errorf("%s: %d programs still attached to %s's interface and cgroup", how, got, node.Name)
		}
		pins := filepath.Join(c.bpffs, "portico", node.Name)
		if _, err := os.Stat(pins); !errors.Is(err, os.ErrNotExist) {
			entries, _ := os.ReadDir(pins)
			t.Errorf("%s: %s is still there, with %d pins", how, pins, len(entries))
		}
		if got := c.addrs(t, node); got != addrs {
			t.Errorf("%s: addresses %s, want the lab's %s", how, got, addrs)
		}
	}

	t.Run("DaemonSet deleted", func(t *testing.T) {
		// The operator's DaemonSet, selecting no lab node (the lab runs agents itself).
		ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: lab.AgentNamespace, Name: "portico-agent"},
			Spec: appsv1.DaemonSetSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "portico-agent"}},
				Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "portico-agent"}},
					Spec: corev1.PodSpec{NodeSelector: map[string]string{"e2e.portico.dev/none": "none"},
						Containers: []corev1.Container{{Name: "agent", Image: "agent"}}}}}}
		if err := c.c.Create(context.Background(), ds); err != nil {
			t.Fatal(err)
		}
		c.restartAgent(t, i, "--daemonset="+ds.Name)
		viaNode(t)
		if err := c.c.Delete(context.Background(), ds); err != nil {
			t.Fatal(err)
		}
		if err := c.lab.Agents[i].Stop(); err != nil {
			t.Fatal(err)
		}
		clean(t, "after the DaemonSet's deletion")
		c.restartAgent(t, i)
		viaNode(t)
	})
	t.Run("porticoctl uninstall-node", func(t *testing.T) {
		if err := c.lab.Agents[i].Stop(); err != nil {
			t.Fatal(err)
		}
		if got := c.programs(t, node); got == 0 {
			t.Fatal("an agent stopped while its DaemonSet stays took its programs with it; they should stay")
		}
		viaNode(t) // the pinned programs go on translating
		out, err := exec.Command("nsenter", "--net=/run/netns/"+node.NS, c.porticoctl, "uninstall-node", "--bpffs", c.bpffs, node.Name).CombinedOutput()
		if err != nil {
			t.Fatalf("porticoctl uninstall-node: %v\n%s", err, out)
		}
		t.Logf("porticoctl: %s", strings.TrimSpace(string(out)))
		clean(t, "after porticoctl uninstall-node")
		c.restartAgent(t, i)
		viaNode(t)
		out, err = exec.Command("nsenter", "--net=/run/netns/"+node.NS, c.porticoctl, "uninstall-node", "--bpffs", c.bpffs, node.Name).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "agent is running") {
			t.Fatalf("porticoctl uninstall-node with the agent running: %v, %s; want a refusal", err, out)
		}
		viaNode(t)
	})
}

// restartAgent starts node i's agent (again) with more flags and waits until it is ready.
func (c *cluster) restartAgent(t *testing.T, i int, args ...string) {
	t.Helper()
	if err := c.lab.StartAgent(i, args...); err != nil {
		t.Fatal(err)
	}
	wait.For(t, c.net.Nodes[i].Name+"'s agent to be ready", func() error { return agentReady(c.net.Nodes[i]) })
}

// programs counts the BPF programs attached to a node's eth0 (TCX, both ways) and to its
// cgroup (every socket hook Portico uses).
func (c *cluster) programs(t *testing.T, node *lab.Node) int {
	t.Helper()
	n := 0
	nstest.Enter(t, node.NS)(func() {
		ifc, err := net.InterfaceByName("eth0")
		if err != nil {
			t.Error(err)
			return
		}
		for _, a := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			n += query(t, ifc.Index, a)
		}
	})
	cg, err := os.Open(node.Cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	for _, a := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect, ebpf.AttachCGroupUDP4Sendmsg,
		ebpf.AttachCGroupUDP6Sendmsg, ebpf.AttachCGroupUDP4Recvmsg, ebpf.AttachCGroupUDP6Recvmsg,
		ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername} {
		n += query(t, int(cg.Fd()), a)
	}
	return n
}

func query(t *testing.T, target int, attach ebpf.AttachType) int {
	t.Helper()
	res, err := link.QueryPrograms(link.QueryOptions{Target: target, Attach: attach})
	if err != nil {
		t.Fatalf("query %s programs: %v", attach, err)
	}
	return len(res.Programs)
}

// addrs lists a node's addresses, as `ip -br addr` prints them.
func (c *cluster) addrs(t *testing.T, node *lab.Node) string {
	t.Helper()
	out, err := exec.Command("ip", "-n", node.NS, "-br", "addr").CombinedOutput()
	if err != nil {
		t.Fatalf("ip addr: %v\n%s", err, out)
	}
	return fmt.Sprint(strings.Fields(string(out)))
}
