// Package nstest helps tests that use network namespaces and BPF: run code on a thread
// inside a namespace, serve echo traffic there, make a client and backend pair of
// namespaces, mount a private bpffs, time a client's first connection.
package nstest

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portico-dev/portico/test/harness/lab"
)

// NeedRoot skips a test that needs root (network namespaces, BPF, cgroups, raw sockets),
// saying why, when it runs without root or with -short (make test-unit).
func NeedRoot(t testing.TB, why string) {
	t.Helper()
	switch {
	case testing.Short():
		t.Skip("-short: skips what needs root (" + why + ")")
	case os.Geteuid() != 0:
		t.Skip("needs root: " + why)
	}
}

// Netns creates network namespaces, deleted (with the links in them) when the test ends.
func Netns(t testing.TB, names ...string) {
	t.Helper()
	for _, ns := range names {
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
		IP(t, "netns", "add", ns)
	}
}

// IP runs ip(8) with args, failing the test when it fails.
func IP(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// Enter starts a thread inside a network namespace and returns a function that runs
// code on it, for what acts on the calling thread's namespace (test runs' FIB lookups,
// interface indexes, TCX attachment). The thread ends with the test.
func Enter(t testing.TB, name string) func(func()) {
	t.Helper()
	calls := make(chan func())
	stop := make(chan struct{})
	ready := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		ns, err := os.Open("/run/netns/" + name)
		if err == nil {
			err = unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET)
			ns.Close()
		}
		ready <- err
		if err != nil {
			return
		}
		for {
			select {
			case f := <-calls:
				f()
			case <-stop:
				return
			}
		}
	}()
	if err := <-ready; err != nil {
		t.Fatalf("enter namespace %s: %v", name, err)
	}
	t.Cleanup(func() { close(stop) })
	return func(f func()) {
		done := make(chan struct{})
		calls <- func() { defer close(done); f() }
		<-done
	}
}

// Serve starts TCP and UDP echo servers on addr in a namespace; they answer each line or
// datagram with their own address and the client's as they see it. The sockets stay in that
// namespace; the thread that made them is discarded.
func Serve(t testing.TB, netns string, addr netip.AddrPort) {
	t.Helper()
	var r struct {
		tcp net.Listener
		udp net.PacketConn
	}
	err := lab.In(netns, func() (err error) {
		if r.tcp, err = net.Listen("tcp", addr.String()); err != nil {
			return err
		}
		if r.udp, err = net.ListenPacket("udp", addr.String()); err != nil {
			r.tcp.Close()
		}
		return err
	})
	if err != nil {
		t.Fatalf("listen in namespace %s: %v", netns, err)
	}
	t.Cleanup(func() { r.tcp.Close(); r.udp.Close() })
	go func() {
		for {
			c, err := r.tcp.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					if _, err := r.ReadString('\n'); err != nil {
						return
					}
					fmt.Fprintf(c, "from %s for %s\n", c.LocalAddr(), c.RemoteAddr())
				}
			}()
		}
	}()
	go func() {
		buf := make([]byte, 256)
		for {
			_, from, err := r.udp.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = r.udp.WriteTo([]byte(fmt.Sprintf("from %s for %s\n", r.udp.LocalAddr(), from)), from)
		}
	}()
}

// BPFFS mounts a bpffs of the test's own (unmounted when the test ends) and returns it, so
// that nothing is pinned in the machine's /sys/fs/bpf.
func BPFFS(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount bpffs: %v", err)
		}
	})
	return dir
}

// WaitConnect is a client process's body: it prints "trying", then opens a TCP connection to
// addr every millisecond until one succeeds (the test arranges for failed attempts to fail
// at once) and prints when, in Unix nanoseconds; the pause leaves the CPU to what is being
// waited for. It gives up after 10 minutes (kube-proxy's first sync of 10,000 Services can
// take minutes).
func WaitConnect(addr string) {
	fmt.Println("trying")
	for deadline := time.Now().Add(10 * time.Minute); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond); err == nil {
			fmt.Println(time.Now().UnixNano())
			c.Close()
			return
		}
	}
	fmt.Println("error: no connection within 10 minutes")
}

// TimeToConnect starts a client process running WaitConnect, calls change once it is
// trying, and returns how long after the change its first connection succeeded.
func TimeToConnect(t testing.TB, cmd *exec.Cmd, change func()) (time.Duration, error) {
	t.Helper()
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	lines := bufio.NewScanner(out)
	if !lines.Scan() || lines.Text() != "trying" {
		t.Fatalf("client: %q", lines.Text())
	}
	t0 := time.Now()
	change()
	if !lines.Scan() {
		return 0, fmt.Errorf("client ended without a line: %w", lines.Err())
	}
	ns, err := strconv.ParseInt(lines.Text(), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("client: %s", lines.Text())
	}
	return time.Unix(0, ns).Sub(t0), nil
}

// Pair is a client namespace with a cgroup of its own, and a backend namespace serving echo
// traffic (Serve) on Backends, joined by a veth pair; the client has no other route.
type Pair struct {
	Client, BackendNS, Cgroup string
	// Backends are the backend's address and port in each subnet, in NewPair's order.
	Backends []netip.AddrPort
}

// NewPair makes a Pair named after prefix (three letters) and the process: in each subnet
// (an IPv4 /30, an IPv6 /64) the client at ::1 or .1 and the backend, serving on port, at
// the next address. Everything goes when the test ends. Without root or cgroup v2 the test
// is skipped.
func NewPair(t testing.TB, prefix string, port uint16, subnets ...netip.Prefix) *Pair {
	t.Helper()
	NeedRoot(t, "creates network namespaces, a cgroup and BPF programs")
	root := "/sys/fs/cgroup/unified"
	if _, err := os.Stat(filepath.Join(root, "cgroup.procs")); err != nil {
		t.Skipf("needs cgroup v2 at %s: %v", root, err)
	}
	id := fmt.Sprint(os.Getpid() % 100000)
	p := &Pair{Client: prefix + "c" + id, BackendNS: prefix + "b" + id, Cgroup: filepath.Join(root, "portico-"+prefix+"-"+id)}
	Netns(t, p.Client, p.BackendNS)
	t.Cleanup(func() {
		for range 50 { // the kernel releases the cgroup shortly after its last process exits
			if err := os.Remove(p.Cgroup); err == nil || os.IsNotExist(err) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("could not remove cgroup %s", p.Cgroup)
	})
	cv, bv := prefix+"v"+id, prefix+"p"+id
	commands := [][]string{
		{"link", "add", cv, "netns", p.Client, "type", "veth", "peer", "name", bv, "netns", p.BackendNS},
	}
	for _, subnet := range subnets {
		client := subnet.Masked().Addr().Next()
		p.Backends = append(p.Backends, netip.AddrPortFrom(client.Next(), port))
		bits := fmt.Sprintf("/%d", subnet.Bits())
		var nodad []string // IPv6 addresses are usable at once, without duplicate detection
		if client.Is6() {
			nodad = []string{"nodad"}
		}
		commands = append(commands,
			append([]string{"-n", p.Client, "addr", "add", client.String() + bits, "dev", cv}, nodad...),
			append([]string{"-n", p.BackendNS, "addr", "add", client.Next().String() + bits, "dev", bv}, nodad...))
	}
	commands = append(commands,
		[]string{"-n", p.Client, "link", "set", cv, "up"}, []string{"-n", p.BackendNS, "link", "set", bv, "up"},
		[]string{"-n", p.Client, "link", "set", "lo", "up"}, []string{"-n", p.BackendNS, "link", "set", "lo", "up"})
	for _, args := range commands {
		IP(t, args...)
	}
	if err := os.Mkdir(p.Cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, b := range p.Backends {
		Serve(t, p.BackendNS, b)
	}
	return p
}

// Command prepares a process in the client namespace and cgroup; the caller closes the
// returned cgroup file once the process has started.
func (p *Pair) Command(t testing.TB, name string, args ...string) (*exec.Cmd, *os.File) {
	t.Helper()
	return CommandIn(t, p.Client, p.Cgroup, name, args...)
}

// CommandIn prepares a process in a network namespace and a cgroup; the caller closes the
// returned cgroup file once the process has started.
func CommandIn(t testing.TB, netns, cgroup, name string, args ...string) (*exec.Cmd, *os.File) {
	t.Helper()
	cg, err := os.Open(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", netns, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	return cmd, cg
}
