// Package nstest helps tests that use network namespaces and BPF: run code on a thread
// inside a namespace, serve echo traffic there, mount a private bpffs.
package nstest

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

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
	type result struct {
		tcp net.Listener
		udp net.PacketConn
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		ns, err := os.Open("/run/netns/" + netns)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer ns.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- result{err: err}
			return
		}
		tcp, err := net.Listen("tcp", addr.String())
		if err != nil {
			done <- result{err: err}
			return
		}
		udp, err := net.ListenPacket("udp", addr.String())
		done <- result{tcp, udp, err}
	}()
	r := <-done
	if r.err != nil {
		t.Fatalf("listen in namespace %s: %v", netns, r.err)
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
