// Package kubeproxy runs the baseline of the benchmarks: kube-proxy, built from
// k8s.io/kubernetes by test/tools/k8s-binaries.sh (`make bench-tools`), in a network
// namespace of the test's, reading Services and EndpointSlices from an envtest API server.
package kubeproxy

import (
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// Binary returns the kube-proxy beside kube-apiserver in KUBEBUILDER_ASSETS, or why there is
// none.
func Binary() (string, error) {
	assets := testenv.Assets()
	if assets == "" {
		return "", fmt.Errorf("KUBEBUILDER_ASSETS has no kube-apiserver: run `make bench`")
	}
	bin := filepath.Join(assets, "kube-proxy")
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("no kube-proxy in %s: run `make bench-tools`", assets)
	}
	for _, tool := range []string{"iptables-restore", "ip6tables-restore", "nft", "conntrack", "ipset"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", fmt.Errorf("kube-proxy needs %s: run `make bench-tools`", tool)
		}
	}
	return bin, nil
}

// Proxy is a kube-proxy process in a namespace.
type Proxy struct {
	// Stop ends it and removes its rules (also at the end of the test).
	Stop func()
	pid  int
	logs *os.File
}

// Start runs kube-proxy in mode ("iptables" or "nftables") in the namespace netns as Node
// node. It reaches the API server, which listens on the root namespace's loopback, through a
// forwarder on the namespace's loopback. It sets no conntrack sysctls (those are the
// machine's, not the namespace's).
func Start(t testing.TB, env *testenv.Env, bin, netns, mode, node string) *Proxy {
	t.Helper()
	server, err := url.Parse(env.Config.Host)
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
	if err := env.WriteKubeconfigFor(kubeconfig, "https://"+local); err != nil {
		t.Fatal(err)
	}
	logs, err := os.Create(filepath.Join(dir, "kube-proxy.log"))
	if err != nil {
		t.Fatal(err)
	}
	// Not pinned: kube-proxy may use every CPU, as on a node.
	cmd := exec.Command("taskset", "-c", fmt.Sprintf("0-%d", runtime.NumCPU()-1), "ip", "netns", "exec", netns, bin,
		"--kubeconfig="+kubeconfig, "--proxy-mode="+mode, "--hostname-override="+node,
		"--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
		"--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256")
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	p := &Proxy{logs: logs, pid: cmd.Process.Pid}
	p.Stop = sync.OnceFunc(func() {
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
	t.Cleanup(p.Stop)
	return p
}

// Pid is the kube-proxy process (taskset and ip exec it in place).
func (p *Proxy) Pid() int { return p.pid }

// Tail returns the end of kube-proxy's log, for a failure message.
func (p *Proxy) Tail() string {
	b, _ := os.ReadFile(p.logs.Name())
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}
