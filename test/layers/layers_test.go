// Package layers checks the rules that keep the house readable (docs/testing.md): the pure
// cores link no Kubernetes client and no BPF library, porticoctl links no BPF library and no
// controller, and nothing in internal/ stands on the test harness.
package layers

import (
	"encoding/json"
	"errors"
	"io"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/portico-dev/portico"

// The pure cores: objects or values in, decisions out.
var pure = []string{"internal/loadbalancer", "internal/allocator", "internal/maglev", "internal/announce",
	"internal/l7", "internal/l7/proxy", "internal/poolconfig", "internal/policy", "internal/notice"}

// client says whether a package is a Kubernetes client or the BPF library. The API types
// (apis/lb/v1alpha1) register with controller-runtime's scheme builder: that one is allowed.
func client(pkg string) bool {
	switch {
	case pkg == "sigs.k8s.io/controller-runtime/pkg/scheme":
		return false
	case strings.HasPrefix(pkg, "k8s.io/client-go/"), strings.HasPrefix(pkg, "sigs.k8s.io/controller-runtime/"),
		strings.HasPrefix(pkg, "github.com/cilium/ebpf"):
		return true
	}
	return false
}

type pkg struct {
	ImportPath string
	Imports    []string
	Deps       []string
}

// list runs go list -deps -json on patterns and returns the packages named (not their deps).
func list(t *testing.T, patterns ...string) []pkg {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	cmd := exec.Command("go", append([]string{"list", "-json=ImportPath,Imports,Deps"}, patterns...)...)
	cmd.Dir = filepath.Join(filepath.Dir(file), "..", "..")
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("go list: %v\n%s", err, ee.Stderr)
		}
		t.Fatalf("go list: %v", err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p pkg
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	return pkgs
}

func TestPureCoresLinkNoClient(t *testing.T) {
	var patterns []string
	for _, p := range pure {
		patterns = append(patterns, "./"+p)
	}
	patterns = append(patterns, "./internal/announce/...") // the decision, heartbeats and responders alike
	for _, p := range list(t, patterns...) {
		if i := slices.IndexFunc(p.Deps, client); i >= 0 {
			t.Errorf("%s links %s: keep clients and the datapath out of the pure cores", p.ImportPath, p.Deps[i])
		}
	}
}

// porticoctl reads the API server: it links neither the BPF library nor the programs that
// write (operator, controllers, agent, datapath).
func TestPorticoctlLinksNoBPFAndNoController(t *testing.T) {
	writers := []string{module + "/internal/operator", module + "/internal/controller/", module + "/internal/agent", module + "/internal/datapath"}
	for _, p := range list(t, "./cmd/porticoctl") {
		if i := slices.IndexFunc(p.Deps, func(d string) bool {
			return strings.HasPrefix(d, "github.com/cilium/ebpf") || slices.ContainsFunc(writers, func(w string) bool { return strings.HasPrefix(d, w) })
		}); i >= 0 {
			t.Errorf("%s links %s: porticoctl reads the API server only", p.ImportPath, p.Deps[i])
		}
	}
}

// The datapath knows the model (loadbalancer.Frontend), not Kubernetes: it imports no
// Kubernetes package itself.
func TestDatapathKnowsNoKubernetes(t *testing.T) {
	for _, p := range list(t, "./internal/datapath") {
		if i := slices.IndexFunc(p.Imports, func(d string) bool {
			return strings.HasPrefix(d, "k8s.io/") || strings.HasPrefix(d, "sigs.k8s.io/")
		}); i >= 0 {
			t.Errorf("%s imports %s: the datapath takes frontends from the model", p.ImportPath, p.Imports[i])
		}
	}
}

func TestInternalStandsNotOnTheHarness(t *testing.T) {
	for _, p := range list(t, "./internal/...", "./cmd/...", "./apis/...") {
		if i := slices.IndexFunc(p.Imports, func(d string) bool { return strings.HasPrefix(d, module+"/test/") }); i >= 0 {
			t.Errorf("%s imports %s: product code does not import test/", p.ImportPath, p.Imports[i])
		}
	}
}
