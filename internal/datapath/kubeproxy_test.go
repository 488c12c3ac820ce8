package datapath

import (
	"context"
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/portico-dev/portico/internal/lab"
	"github.com/portico-dev/portico/test/testenv"
)

// The benchmarks compare Portico with kube-proxy, built from k8s.io/kubernetes by
// test/tools/k8s-binaries.sh, running in the client's namespace as it would on a node and
// reading Services and EndpointSlices from an envtest API server.

// kubeProxyBinary returns the kube-proxy beside kube-apiserver in KUBEBUILDER_ASSETS, or why
// there is none.
func kubeProxyBinary() (string, error) {
	assets := testenv.Assets()
	if assets == "" {
		return "", fmt.Errorf("KUBEBUILDER_ASSETS has no kube-apiserver: run `make bench`")
	}
	bin := filepath.Join(assets, "kube-proxy")
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("no kube-proxy in %s: run `make bench`", assets)
	}
	for _, tool := range []string{"iptables-restore", "ip6tables-restore", "nft", "conntrack", "ipset"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", fmt.Errorf("kube-proxy needs %s: run `make bench`", tool)
		}
	}
	return bin, nil
}

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

// kubeProxy is a kube-proxy process in a namespace; stop ends it and removes its rules.
type kubeProxy struct {
	stop func()
	logs *os.File
}

// startKubeProxy runs kube-proxy in mode ("iptables" or "nftables") in the namespace netns.
// kube-proxy reaches the API server, which listens on the root namespace's loopback, through
// a forwarder listening on the namespace's loopback. It sets no conntrack sysctls (those are
// the machine's, not the namespace's).
func (api *clusterAPI) startKubeProxy(t testing.TB, bin, netns, mode string) *kubeProxy {
	t.Helper()
	server, err := url.Parse(api.env.Config.Host)
	if err != nil {
		t.Fatal(err)
	}
	local := fmt.Sprintf("127.0.0.1:%d", lab.APIPort)
	stopForward, err := lab.Forward(netns, local, server.Host)
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := api.env.WriteKubeconfigFor(kubeconfig, "https://"+local); err != nil {
		t.Fatal(err)
	}
	logs, err := os.Create(filepath.Join(dir, "kube-proxy.log"))
	if err != nil {
		t.Fatal(err)
	}
	// Not pinned: kube-proxy may use every CPU, as on a node.
	cmd := exec.Command("taskset", "-c", fmt.Sprintf("0-%d", runtime.NumCPU()-1), "ip", "netns", "exec", netns, bin,
		"--kubeconfig="+kubeconfig, "--proxy-mode="+mode, "--hostname-override="+api.node,
		"--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
		"--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256")
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	kp := &kubeProxy{logs: logs}
	kp.stop = sync.OnceFunc(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		stopForward()
		// kube-proxy's own cleanup removes its rules (of every mode, ipsets included), so the
		// next mode starts from nothing.
		if out, err := exec.Command("ip", "netns", "exec", netns, bin, "--cleanup", "--proxy-mode="+mode).CombinedOutput(); err != nil {
			t.Errorf("kube-proxy --cleanup: %v\n%s", err, out)
		}
		logs.Close()
	})
	t.Cleanup(kp.stop)
	return kp
}

// tail returns the end of kube-proxy's log, for a failure message.
func (kp *kubeProxy) tail() string {
	b, _ := os.ReadFile(kp.logs.Name())
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}
