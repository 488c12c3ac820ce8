package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/portico-dev/portico/test/harness/nstest"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// The lab as the README runs it: up, first results printed (every web pod answers curl on
// both addresses), Ctrl-C removes everything; and a lab killed outright is found by the
// next start and removed by `lab down` (its cgroups, which hold every process it started,
// cannot be removed while one still runs).
func TestLabUpAndDown(t *testing.T) {
	nstest.NeedRoot(t, "the lab creates network namespaces, cgroups and BPF programs")
	testenv.NeedAPI(t)
	if left := leftovers(); len(left) > 0 {
		t.Skipf("a lab is running or was left behind here (%s); this test needs the lab's names", strings.Join(left, ", "))
	}
	dir := t.TempDir()
	if _, err := testenv.Build(dir, "operator", "agent"); err != nil {
		t.Fatal(err)
	}
	lab := filepath.Join(dir, "lab")
	if out, err := exec.Command("go", "build", "-o", lab, ".").CombinedOutput(); err != nil {
		t.Fatalf("build the lab: %v\n%s", err, out)
	}
	port := freePort(t)
	t.Cleanup(func() {
		if out, err := exec.Command(lab, "down").CombinedOutput(); err != nil {
			t.Errorf("lab down: %v\n%s", err, out)
		}
	})

	cmd, out := start(t, lab, dir, port)
	printed := out.String()
	for _, want := range []string{"LBPool default", "Service web: 192.0.2.", "30 times", "export KUBECONFIG="} {
		if !strings.Contains(printed, want) {
			t.Errorf("the lab did not print %q:\n%s", want, printed)
		}
	}
	for _, fam := range []string{"http://192.0.2.", "http://[2001:db8::"} {
		if n := answeringPods(printed, fam); n != 3 {
			t.Errorf("%d web pods answered curl %s…, want 3:\n%s", n, fam, printed)
		}
	}
	// One gRPC connection, and every greeter answers (the sample asks for least request, which
	// spreads calls but not exactly evenly), no call failing.
	if greeters := strings.Count(printed, "x Hello from greeter-"); greeters != 3 || !strings.Contains(printed, "gRPC: 300 calls over one connection") || strings.Contains(printed, "x error:") {
		t.Errorf("the gRPC calls over one connection did not reach the 3 greeters (%d did):\n%s", greeters, printed)
	}
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the lab after Ctrl-C: %v\n%s", err, out)
	}
	if left := leftovers(); len(left) > 0 {
		t.Fatalf("Ctrl-C left %s behind", strings.Join(left, ", "))
	}

	cmd, _ = start(t, lab, dir, port)
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	again := exec.Command(lab, "-bin", dir, "-api-port", fmt.Sprint(port), "up")
	if got, err := again.CombinedOutput(); err == nil || !strings.Contains(string(got), "make lab-down") {
		t.Fatalf("a lab started over a killed one: %v, said %q; want an error that names make lab-down", err, got)
	}
	if got, err := exec.Command(lab, "down").CombinedOutput(); err != nil {
		t.Fatalf("lab down: %v\n%s", err, got)
	}
	if left := leftovers(); len(left) > 0 {
		t.Fatalf("lab down left %s behind", strings.Join(left, ", "))
	}
}

// start runs the lab and waits (2 minutes at most) until it has printed its first results.
func start(t *testing.T, lab, bin string, port int) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(lab, "-bin", bin, "-api-port", fmt.Sprint(port), "up")
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	out := &bytes.Buffer{}
	up := make(chan bool, 1)
	go func() {
		s := bufio.NewScanner(pipe)
		for s.Scan() {
			out.WriteString(s.Text() + "\n")
			// The last line the lab prints once it is up (after "Up with first results").
			if strings.HasPrefix(s.Text(), "Logs are in ") {
				up <- true
			}
		}
		up <- false
	}()
	select {
	case ok := <-up:
		if !ok {
			_ = cmd.Wait()
			t.Fatalf("the lab ended before it was up:\n%s%s", out, stderr.String())
		}
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Kill()
		t.Fatalf("the lab was not up within 2 minutes:\n%s%s", out, stderr.String())
	}
	return cmd, out
}

// answeringPods counts the distinct web pods in the curl answers printed under the first
// address starting with prefix.
func answeringPods(printed, prefix string) int {
	_, rest, ok := strings.Cut(printed, "$ curl "+prefix)
	if !ok {
		return 0
	}
	pods := map[string]bool{}
	for _, line := range strings.Split(rest, "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 4 || f[1] != "x" {
			break
		}
		pods[f[2]] = strings.HasPrefix(f[2], "web-")
	}
	n := 0
	for _, web := range pods {
		if web {
			n++
		}
	}
	return n
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
