package datapath

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/portico-dev/portico/test/harness/testenv"
)

// The benchmarks compare Portico with kube-proxy (test/kubeproxy), running in a client
// namespace as it would on a node and reading Services and EndpointSlices from an envtest
// API server.

// cluster API holds the API server the kube-proxies read, its client, and the name of the
// Node they run as.
type clusterAPI struct {
	env  *testenv.Env
	cs   *kubernetes.Clientset
	node string
}

func startClusterAPI(t testing.TB, nodeIP netip.Addr) *clusterAPI {
	t.Helper()
	env, err := testenv.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	cs, err := kubernetes.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	api := &clusterAPI{env: env, cs: cs, node: "portico-bench"}
	// kube-proxy takes its node addresses from its Node object.
	ctx := context.Background()
	node, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: api.node}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: nodeIP.String()}}
	if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	return api
}

// createServices creates a ClusterIP Service on port 80 and its EndpointSlice for each
// address, all pointing at backend, with several writers.
func (api *clusterAPI) createServices(t testing.TB, vips []netip.AddrPort, backend netip.AddrPort) {
	t.Helper()
	work := make(chan netip.AddrPort)
	errs := make(chan error, len(vips))
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for vip := range work {
				errs <- api.createService(vip, backend)
			}
		}()
	}
	for _, v := range vips {
		work <- v
	}
	close(work)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}

func (api *clusterAPI) createService(vip, backend netip.AddrPort) error {
	ctx := context.Background()
	name := fmt.Sprintf("svc-%s", vipName(vip.Addr()))
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: corev1.ServiceSpec{
			ClusterIP: vip.Addr().String(),
			Ports:     []corev1.ServicePort{{Protocol: corev1.ProtocolTCP, Port: int32(vip.Port()), TargetPort: intstr.FromInt32(int32(backend.Port()))}},
		},
	}
	if _, err := api.cs.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create service %s: %w", name, err)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-1", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{
			Addresses:  []string{backend.Addr().String()},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
		}},
		Ports: []discoveryv1.EndpointPort{{Name: ptr.To(""), Protocol: ptr.To(corev1.ProtocolTCP), Port: ptr.To(int32(backend.Port()))}},
	}
	if _, err := api.cs.DiscoveryV1().EndpointSlices("default").Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create endpointslice %s: %w", slice.Name, err)
	}
	return nil
}

func vipName(a netip.Addr) string {
	b := a.As4()
	return fmt.Sprintf("%d-%d-%d-%d", b[0], b[1], b[2], b[3])
}
