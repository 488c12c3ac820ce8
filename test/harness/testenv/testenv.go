// Package testenv starts a real kube-apiserver and etcd (controller-runtime envtest) with
// Portico's CRDs installed and a dual-stack Service range, for tests and benchmarks.
package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/controller/servicelb"
	"github.com/portico-dev/portico/internal/operator"
	"github.com/portico-dev/portico/internal/scheme"
	"github.com/portico-dev/portico/test/harness/lab"
)

// Env is a running API server.
type Env struct {
	Config *rest.Config
	Client client.Client
	env    *envtest.Environment
}

// Root returns the repository root.
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..")
}

// Build compiles cmd/<name> for each name into dir, in one go build, and returns the
// binaries' paths in the order of names.
func Build(dir string, names ...string) ([]string, error) {
	args := []string{"build", "-o", dir + string(filepath.Separator)}
	var bins []string
	for _, name := range names {
		args = append(args, "./cmd/"+name)
		bins = append(bins, filepath.Join(dir, name))
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = Root()
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build %s: %w\n%s", strings.Join(names, ", "), err, out)
	}
	return bins, nil
}

// Assets returns the directory holding kube-apiserver and etcd, or "" when there is none:
// KUBEBUILDER_ASSETS, which `make test` sets after provisioning the binaries.
func Assets() string {
	dir := os.Getenv("KUBEBUILDER_ASSETS")
	if dir == "" {
		return ""
	}
	if _, err := os.Stat(filepath.Join(dir, "kube-apiserver")); err != nil {
		return ""
	}
	return dir
}

// NeedAPI skips a test that needs kube-apiserver and etcd when they are not provided
// (KUBEBUILDER_ASSETS, which make test sets) or with -short (make test-unit).
func NeedAPI(t testing.TB) {
	t.Helper()
	switch {
	case testing.Short():
		t.Skip("-short: skips what needs kube-apiserver and etcd")
	case Assets() == "":
		t.Skip("needs kube-apiserver and etcd: run `make test`, or set KUBEBUILDER_ASSETS to a directory with both")
	}
}

// StartFor starts an API server for a test or benchmark and stops it at its end; without
// kube-apiserver (or with -short) it skips, as NeedAPI.
func StartFor(t testing.TB) *Env {
	t.Helper()
	NeedAPI(t)
	env, err := Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	return env
}

// Start starts etcd and kube-apiserver (on a free port) and installs the CRDs.
func Start() (*Env, error) { return StartOn(0) }

// StartOn is Start with the API server on 127.0.0.1:port (0: a free port).
func StartOn(port int) (*Env, error) {
	assets := Assets()
	if assets == "" {
		return nil, fmt.Errorf("no kube-apiserver found: run `make test`, or set KUBEBUILDER_ASSETS to a directory with kube-apiserver and etcd")
	}
	e := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join(Root(), "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		BinaryAssetsDirectory: assets,
	}
	// Room for thousands of Services, in both families; NodePorts below the kernel's ephemeral
	// ports (32768-60999), so that no test's outgoing connection holds a port a Service gets
	// (a healthCheckNodePort the agent must listen on, say).
	e.ControlPlane.GetAPIServer().Configure().
		Set("service-cluster-ip-range", "10.96.0.0/16,fd00:10:96::/108").
		Set("service-node-port-range", "20000-32767")
	if port != 0 {
		api := e.ControlPlane.GetAPIServer()
		api.SecureServing.Address, api.SecureServing.Port = "127.0.0.1", strconv.Itoa(port)
	}
	cfg, err := e.Start()
	if err != nil {
		return nil, fmt.Errorf("start envtest: %w", err)
	}
	cfg.QPS, cfg.Burst = 1000, 2000
	s, err := scheme.New()
	if err != nil {
		_ = e.Stop()
		return nil, err
	}
	c, err := client.New(cfg, client.Options{Scheme: s})
	if err != nil {
		_ = e.Stop()
		return nil, fmt.Errorf("create client: %w", err)
	}
	return &Env{Config: cfg, Client: c, env: e}, nil
}

// WriteKubeconfig writes a kubeconfig for the API server's admin user, for kubectl and for
// an operator run as its own process.
func (e *Env) WriteKubeconfig(path string) error { return e.WriteKubeconfigFor(path, e.Config.Host) }

// WriteKubeconfigFor is WriteKubeconfig for a client that reaches the API server at another
// address (a forwarder into a network namespace); the certificate must still match it.
func (e *Env) WriteKubeconfigFor(path, server string) error {
	return lab.WriteKubeconfig(e.Config, server, path)
}

// Samples decodes every object in config/samples.
func Samples() ([]client.Object, error) {
	files, err := filepath.Glob(filepath.Join(Root(), "config", "samples", "*.yaml"))
	if err != nil || len(files) == 0 {
		return nil, fmt.Errorf("find samples: none found (%v)", err)
	}
	s, err := scheme.New()
	if err != nil {
		return nil, err
	}
	decode := serializer.NewCodecFactory(s).UniversalDeserializer().Decode
	var out []client.Object
	for _, f := range files {
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("read sample: %w", err)
		}
		obj, _, err := decode(data, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("decode %s: %w", filepath.Base(f), err)
		}
		out = append(out, obj.(client.Object))
	}
	return out, nil
}

// Stop stops the API server and etcd.
func (e *Env) Stop() error { return e.env.Stop() }

// WithOperator starts an API server for the test and runs Portico's operator on it until the
// test ends (class-less Services claimed, no metrics or probe endpoints). Without the API
// server's binaries the test is skipped.
func WithOperator(t testing.TB) *Env {
	t.Helper()
	env := StartFor(t)
	mgr, err := operator.NewManager(env.Config, operator.Options{MetricsAddr: "0", ProbeAddr: "0", SeveralPerProcess: true,
		Class: servicelb.Class{Name: lbv1.LoadBalancerClass, ClaimClassless: true}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("operator: %v", err)
		}
	})
	return env
}
