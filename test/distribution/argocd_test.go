// Package distribution tests how Portico is installed and kept in sync: dist/install.yaml
// against a real API server, the Argo CD health checks of config/argocd (run with gopher-lua
// as Argo CD runs them) and their argocd-cm patch, sync waves, and no drift once the operator
// has reconciled the samples.
package distribution

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	lua "github.com/yuin/gopher-lua"
	"sigs.k8s.io/yaml"

	"github.com/portico-dev/portico/test/harness/testenv"
)

var argocd = filepath.Join(testenv.Root(), "config", "argocd")

type healthTests struct {
	Tests []struct {
		Script       string `json:"script"`
		InputPath    string `json:"inputPath"`
		HealthStatus struct {
			Status  string `json:"status"`
			Message string `json:"message"`
		} `json:"healthStatus"`
	} `json:"tests"`
}

func TestHealthChecks(t *testing.T) {
	var cases healthTests
	readYAML(t, filepath.Join(argocd, "health_test.yaml"), &cases)
	if len(cases.Tests) == 0 {
		t.Fatal("no test cases")
	}
	for _, c := range cases.Tests {
		t.Run(c.InputPath, func(t *testing.T) {
			script, err := os.ReadFile(filepath.Join(argocd, c.Script))
			if err != nil {
				t.Fatal(err)
			}
			var obj any
			readYAML(t, filepath.Join(argocd, c.InputPath), &obj)
			status, message := health(t, string(script), obj)
			if status != c.HealthStatus.Status || message != c.HealthStatus.Message {
				t.Fatalf("got %s %q; want %s %q", status, message, c.HealthStatus.Status, c.HealthStatus.Message)
			}
		})
	}
}

// The argocd-cm patch carries each script under the key Argo CD reads for its kind.
func TestArgoCDConfigMap(t *testing.T) {
	out, err := exec.Command("kubectl", "kustomize", argocd).Output()
	if err != nil {
		t.Fatalf("kubectl kustomize %s: %v", argocd, err)
	}
	var cm struct {
		Kind     string `json:"kind"`
		Metadata struct{ Name, Namespace string }
		Data     map[string]string `json:"data"`
	}
	if err := yaml.Unmarshal(out, &cm); err != nil {
		t.Fatal(err)
	}
	if cm.Kind != "ConfigMap" || cm.Metadata.Name != "argocd-cm" || cm.Metadata.Namespace != "argocd" {
		t.Fatalf("not Argo CD's argocd-cm: %s %s/%s", cm.Kind, cm.Metadata.Namespace, cm.Metadata.Name)
	}
	for kind, script := range map[string]string{"LBPool": "lbpool.lua", "ServicePolicy": "policy.lua", "L7Policy": "policy.lua"} {
		want, err := os.ReadFile(filepath.Join(argocd, script))
		if err != nil {
			t.Fatal(err)
		}
		if got := cm.Data["resource.customizations.health.lb.portico.dev_"+kind]; got != string(want) {
			t.Errorf("%s: the ConfigMap does not carry %s", kind, script)
		}
	}
}

// health runs an Argo CD health script on an object, as Argo CD does: the object is the
// global obj, and the script returns a table with status and message.
func health(t *testing.T, script string, obj any) (string, string) {
	t.Helper()
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}, {lua.StringLibName, lua.OpenString}, {lua.MathLibName, lua.OpenMath}} {
		l.Push(l.NewFunction(lib.open))
		l.Push(lua.LString(lib.name))
		l.Call(1, 0)
	}
	l.SetGlobal("obj", toLua(l, obj))
	if err := l.DoString(script); err != nil {
		t.Fatal(err)
	}
	hs, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		t.Fatalf("the script returned %v, not a table", l.Get(-1))
	}
	return hs.RawGetString("status").String(), hs.RawGetString("message").String()
}

// toLua converts a decoded JSON value into Lua values, as Argo CD's own conversion does.
func toLua(l *lua.LState, v any) lua.LValue {
	switch v := v.(type) {
	case map[string]any:
		t := l.NewTable()
		for k, e := range v {
			t.RawSetString(k, toLua(l, e))
		}
		return t
	case []any:
		t := l.NewTable()
		for _, e := range v {
			t.Append(toLua(l, e))
		}
		return t
	case string:
		return lua.LString(v)
	case float64:
		return lua.LNumber(v)
	case bool:
		return lua.LBool(v)
	}
	return lua.LNil
}

func readYAML(t *testing.T, path string, into any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	j, err := yaml.YAMLToJSON(b)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if err := json.Unmarshal(j, into); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}
