package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/wait"
)

// gate is the readiness gate of the scenario's Deployment: a pod is ready only once the
// test sets this condition True, and turns unready when the test sets it False.
const gate = "e2e.portico.dev/serving"

// A Deployment behind a LoadBalancer Service, as kube-controller-manager and the scheduler
// run it: no ready endpoint rejects; readiness follows the pods' readiness gates; a
// deleted pod gets no new connections while its preStop sleep lets held ones finish;
// scaled to zero rejects again.
func (c *cluster) deployment(t *testing.T) {
	svc := c.service(t, "dep", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		s.Spec.Selector = map[string]string{"app": "dep"}
	})
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Name: "dep", Namespace: "default"}, Spec: appsv1.DeploymentSpec{
		Replicas: ptr.To[int32](3),
		Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "dep"}},
		Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "dep"}}, Spec: corev1.PodSpec{
			ReadinessGates:                []corev1.PodReadinessGate{{ConditionType: gate}},
			TerminationGracePeriodSeconds: ptr.To[int64](10),
			Containers: []corev1.Container{{Name: "echo", Image: lab.EchoImage, Ports: []corev1.ContainerPort{{ContainerPort: 8080}},
				Lifecycle: &corev1.Lifecycle{PreStop: &corev1.LifecycleHandler{Sleep: &corev1.SleepAction{Seconds: 5}}}}},
		}},
	}}
	if err := c.c.Create(context.Background(), dep); err != nil {
		t.Fatal(err)
	}
	addrs := c.ingress(t, svc, 1)
	pods := c.running(t, "dep", 3)
	for f, fam := range families {
		t.Run(fam+"/no ready endpoint rejects", func(t *testing.T) { c.rejects(t, netip.AddrPortFrom(addrs[f], 80)) })
	}
	for _, p := range pods {
		c.serving(t, p, true)
	}
	for f, fam := range families {
		t.Run(fam+"/every ready pod answers", func(t *testing.T) {
			everyPodAnswers(t, f, c.fromClient(netip.AddrPortFrom(addrs[f], 80)), pods...)
		})
	}
	c.serving(t, pods[0], false)
	for f, fam := range families {
		t.Run(fam+"/an unready pod gets no new connections", func(t *testing.T) {
			c.onlyFrom(t, f, netip.AddrPortFrom(addrs[f], 80), pods[1:]...)
		})
	}
	held := make([]*net.TCPConn, len(families))
	for f := range families {
		held[f] = c.connectTo(t, f, netip.AddrPortFrom(addrs[f], 80), pods[1])
	}
	defer func() {
		for _, h := range held {
			h.Close()
		}
	}()
	if err := c.c.Delete(context.Background(), &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: pods[1].Name}}); err != nil {
		t.Fatal(err)
	}
	// Both held connections are checked at once, inside the 5 s preStop sleep.
	for f, fam := range families {
		answer, err := exchange(held[f])
		if err == nil {
			_, err = answeredBy(answer, f, pods[1])
		}
		if err != nil {
			t.Errorf("%s: the held connection during preStop: %v", fam, err)
		}
	}
	for f, fam := range families {
		t.Run(fam+"/a terminating pod gets no new connections", func(t *testing.T) {
			c.onlyFrom(t, f, netip.AddrPortFrom(addrs[f], 80), pods[2])
		})
	}
	c.scale(t, "dep", 0)
	for f, fam := range families {
		t.Run(fam+"/scaled to zero rejects", func(t *testing.T) { c.rejects(t, netip.AddrPortFrom(addrs[f], 80)) })
	}
	if err := c.c.Delete(context.Background(), svc); err != nil {
		t.Fatal(err)
	}
}

// Service type changes: ExternalName to ClusterIP and back, and a released NodePort taken
// by another Service.
func (c *cluster) typeChanges(t *testing.T) {
	svc := c.service(t, "named", func(s *corev1.Service) {
		s.Spec = corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "web.example.invalid"}
	})
	c.endpoints(t, "named", c.web[1])
	c.update(t, svc, func(s *corev1.Service) {
		s.Spec.Type, s.Spec.ExternalName = corev1.ServiceTypeClusterIP, ""
		s.Spec.IPFamilyPolicy = ptr.To(corev1.IPFamilyPolicyRequireDualStack)
		s.Spec.Ports = []corev1.ServicePort{{Name: "web", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(8080)}}
		s.Spec.Selector = map[string]string{member("named"): "yes"}
	})
	vips := slices.Clone(svc.Spec.ClusterIPs)
	for f, fam := range families {
		t.Run(fam+"/ExternalName to ClusterIP", func(t *testing.T) {
			wait.For(t, "the new ClusterIP answers", func() error {
				_, err := answeredBy(c.dialFromProbe(t, netip.AddrPortFrom(netip.MustParseAddr(vips[f]), 80)), f, c.web[1])
				return err
			})
		})
	}
	c.update(t, svc, func(s *corev1.Service) {
		s.Spec = corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "web.example.invalid"}
	})
	for f, fam := range families {
		t.Run(fam+"/ClusterIP to ExternalName", func(t *testing.T) {
			wait.For(t, "the old ClusterIP is gone", func() error {
				if got := c.dialFromProbe(t, netip.AddrPortFrom(netip.MustParseAddr(vips[f]), 80)); isEcho(got) {
					return fmt.Errorf("still answers: %q", got)
				}
				return nil
			})
		})
	}

	first := c.service(t, "np1", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeNodePort })
	c.endpoints(t, "np1", c.web[0])
	port := first.Spec.Ports[0].NodePort
	c.update(t, first, func(s *corev1.Service) {
		s.Spec.Type, s.Spec.Ports[0].NodePort = corev1.ServiceTypeClusterIP, 0
	})
	second := c.service(t, "np2", func(s *corev1.Service) {
		s.Spec.Type, s.Spec.Ports[0].NodePort = corev1.ServiceTypeNodePort, port
	})
	c.endpoints(t, "np2", c.web[2])
	for f, fam := range families {
		t.Run(fam+"/a released NodePort serves its new Service", func(t *testing.T) {
			c.onlyFrom(t, f, netip.AddrPortFrom(c.net.Nodes[1].IPs[f], uint16(port)), c.web[2])
		})
	}
	for _, s := range []*corev1.Service{svc, first, second} {
		if err := c.c.Delete(context.Background(), s); err != nil {
			t.Fatal(err)
		}
	}
}

// A pool withdrawn (disabled) takes its addresses back and their traffic stops; enabled
// again, the Service gets an address and traffic flows.
func (c *cluster) poolLifecycle(t *testing.T) {
	svc := c.service(t, "pooled", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeLoadBalancer })
	c.endpoints(t, "pooled", c.web[0])
	// Through web-1's own node: this row is about the pool, not the path between nodes.
	addrs := c.ingress(t, svc, 0)
	for f, fam := range families {
		t.Run(fam+"/allocated", func(t *testing.T) { c.onlyFrom(t, f, netip.AddrPortFrom(addrs[f], 80), c.web[0]) })
	}
	setDisabled := func(disabled bool) {
		patch := fmt.Sprintf(`{"spec":{"disabled":%t}}`, disabled)
		if err := c.c.Patch(context.Background(), &lbv1.LBPool{ObjectMeta: metav1.ObjectMeta{Name: "segment"}}, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
			t.Fatal(err)
		}
	}
	setDisabled(true)
	for f, fam := range families {
		t.Run(fam+"/withdrawn", func(t *testing.T) {
			wait.For(t, "the address is withdrawn and carries nothing", func() error {
				if err := c.c.Get(context.Background(), client.ObjectKeyFromObject(svc), svc); err != nil {
					return err
				}
				if n := len(svc.Status.LoadBalancer.Ingress); n != 0 {
					return fmt.Errorf("%d addresses still in the status", n)
				}
				if answer, err := c.dial(netip.AddrPort{}, netip.AddrPortFrom(addrs[f], 80)); err == nil {
					return fmt.Errorf("still answers: %q", answer)
				}
				return nil
			})
		})
	}
	setDisabled(false)
	addrs = c.ingress(t, svc, 0)
	for f, fam := range families {
		t.Run(fam+"/enabled again", func(t *testing.T) { c.onlyFrom(t, f, netip.AddrPortFrom(addrs[f], 80), c.web[0]) })
	}
	if err := c.c.Delete(context.Background(), svc); err != nil {
		t.Fatal(err)
	}
}

// A pod whose image the lab does not have stays Pending, and an Event says why.
func (c *cluster) unknownImage(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "nginx", Namespace: "default"}, Spec: corev1.PodSpec{
		NodeName: c.net.Nodes[2].Name, Containers: []corev1.Container{{Name: "nginx", Image: "nginx:1.27"}}}}
	if err := c.c.Create(context.Background(), pod); err != nil {
		t.Fatal(err)
	}
	wait.For(t, "Pending with an Event", func() error {
		if err := c.c.Get(context.Background(), client.ObjectKeyFromObject(pod), pod); err != nil {
			return err
		}
		st := pod.Status.ContainerStatuses
		if pod.Status.Phase != corev1.PodPending || len(st) != 1 || st[0].State.Waiting == nil || st[0].State.Waiting.Reason != "ErrImagePull" {
			return fmt.Errorf("status %+v", pod.Status)
		}
		var events corev1.EventList
		if err := c.c.List(context.Background(), &events, client.InNamespace("default")); err != nil {
			return err
		}
		for _, e := range events.Items {
			if e.InvolvedObject.Name == "nginx" && e.Type == corev1.EventTypeWarning && strings.Contains(e.Message, `"nginx:1.27"`) {
				return nil
			}
		}
		return errors.New("no warning Event names the image")
	})
	if c.lab.Kubelets[2].Pod("default", "nginx") != nil {
		t.Fatal("the lab runs a pod it has no image for")
	}
	if err := c.c.Delete(context.Background(), pod); err != nil {
		t.Fatal(err)
	}
}

// running waits for n running, not terminating pods of Deployment app and returns them.
func (c *cluster) running(t *testing.T, app string, n int) []*lab.Pod {
	t.Helper()
	var out []*lab.Pod
	wait.For(t, fmt.Sprintf("%d pods of %s running", n, app), func() error {
		var pods corev1.PodList
		if err := c.c.List(context.Background(), &pods, client.InNamespace("default"), client.MatchingLabels{"app": app}); err != nil {
			return err
		}
		out = nil
		for _, p := range pods.Items {
			for _, k := range c.lab.Kubelets {
				if lp := k.Pod(p.Namespace, p.Name); lp != nil && p.DeletionTimestamp == nil {
					out = append(out, lp)
				}
			}
		}
		if len(out) != n {
			return fmt.Errorf("%d running", len(out))
		}
		return nil
	})
	return out
}

// serving sets pod's readiness gate.
func (c *cluster) serving(t *testing.T, pod *lab.Pod, ok bool) {
	t.Helper()
	status := corev1.ConditionFalse
	if ok {
		status = corev1.ConditionTrue
	}
	patch := fmt.Sprintf(`{"status":{"conditions":[{"type":%q,"status":%q}]}}`, gate, status)
	obj := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: pod.Name}}
	if err := c.c.Status().Patch(context.Background(), obj, client.RawPatch(types.StrategicMergePatchType, []byte(patch))); err != nil {
		t.Fatal(err)
	}
}

func (c *cluster) scale(t *testing.T, name string, replicas int32) {
	t.Helper()
	patch := fmt.Sprintf(`{"spec":{"replicas":%d}}`, replicas)
	obj := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name}}
	if err := c.c.Patch(context.Background(), obj, client.RawPatch(types.MergePatchType, []byte(patch))); err != nil {
		t.Fatal(err)
	}
}

// rejects checks that a connection from the client to to is refused, as kube-proxy's
// REJECT rule makes it, rather than left to time out. The limit spans one SYN retransmit:
// on one machine the node's ICMP error can come back inside the client's own connect(),
// while it holds the socket's lock, and the kernel then keeps it as a soft error
// (TcpExtLockDroppedIcmps) until the retransmitted SYN is refused (docs/datapath.md).
func (c *cluster) rejects(t *testing.T, to netip.AddrPort) {
	t.Helper()
	wait.For(t, "connections to "+to.String()+" are refused", func() error {
		conn, err := c.connectWithin(netip.AddrPort{}, to, 3*time.Second)
		if err == nil {
			conn.Close()
		}
		if !refused(err) {
			return fmt.Errorf("dial: %v; want connection refused", err)
		}
		return nil
	})
}

// onlyFrom checks that, eventually, ten connections in a row from the client reach only pods.
func (c *cluster) onlyFrom(t *testing.T, f int, to netip.AddrPort, pods ...*lab.Pod) {
	t.Helper()
	wait.For(t, "only "+names(pods)+" answer", func() error {
		for range 10 {
			answer, err := c.dial(netip.AddrPort{}, to)
			if err == nil {
				_, err = answeredBy(answer, f, pods...)
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// connectTo opens connections from the client until one reaches pod, and returns it open.
func (c *cluster) connectTo(t *testing.T, f int, to netip.AddrPort, pod *lab.Pod) *net.TCPConn {
	t.Helper()
	for range 100 {
		conn, err := c.connect(netip.AddrPort{}, to)
		if err != nil {
			t.Fatal(err)
		}
		answer, err := exchange(conn)
		if _, perr := answeredBy(answer, f, pod); err == nil && perr == nil {
			return conn
		}
		conn.Close()
	}
	t.Fatal(errors.New("100 connections and none reached " + pod.Name))
	return nil
}
