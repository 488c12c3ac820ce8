package datapath

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The client runs as a child process of this test binary, so that it can live in the test's
// client namespace and cgroup; TestMain turns the binary into that client when asked.
const helperEnv = "PORTICO_DATAPATH_CLIENT"

func TestMain(m *testing.M) {
	if target := os.Getenv(helperEnv); target != "" {
		client(target)
		return
	}
	os.Exit(m.Run())
}

// client dials "proto addr", sends a line, and prints the peer it sees and the reply, or the
// error.
func client(target string) {
	proto, addr, _ := strings.Cut(target, " ")
	conn, err := net.DialTimeout(proto, addr, 2*time.Second)
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Write([]byte("hello\n")); err != nil {
		fmt.Println("error:", err)
		return
	}
	buf := make([]byte, 256)
	n, err := conn.Read(buf)
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	fmt.Printf("peer=%s reply=%s\n", conn.RemoteAddr(), strings.TrimSpace(string(buf[:n])))
}

// topology is a client namespace and a backend namespace on one veth pair, and a cgroup for
// the client. The client namespace has no default route: an untranslated frontend address
// goes nowhere.
type topology struct {
	t                 *testing.T
	client, backend   string
	cgroup            string
	clientIP, backIP  netip.Addr
	backendListenAddr string
}

func newTopology(t *testing.T) *topology {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces, a cgroup and BPF programs")
	}
	root := "/sys/fs/cgroup/unified"
	if _, err := os.Stat(filepath.Join(root, "cgroup.procs")); err != nil {
		t.Skipf("needs cgroup v2 at %s: %v", root, err)
	}
	id := fmt.Sprintf("%d", os.Getpid()%100000)
	top := &topology{t: t, client: "ptc-c" + id, backend: "ptc-b" + id, cgroup: filepath.Join(root, "portico-test-"+id),
		clientIP: netip.MustParseAddr("10.250.0.1"), backIP: netip.MustParseAddr("10.250.0.2")}
	t.Cleanup(top.teardown)
	top.run("ip", "netns", "add", top.client)
	top.run("ip", "netns", "add", top.backend)
	top.run("ip", "link", "add", "ptc-v"+id, "netns", top.client, "type", "veth", "peer", "name", "ptc-p"+id, "netns", top.backend)
	top.run("ip", "-n", top.client, "addr", "add", top.clientIP.String()+"/30", "dev", "ptc-v"+id)
	top.run("ip", "-n", top.backend, "addr", "add", top.backIP.String()+"/30", "dev", "ptc-p"+id)
	for _, ns := range []string{top.client, top.backend} {
		top.run("ip", "-n", ns, "link", "set", "lo", "up")
	}
	top.run("ip", "-n", top.client, "link", "set", "ptc-v"+id, "up")
	top.run("ip", "-n", top.backend, "link", "set", "ptc-p"+id, "up")
	if err := os.Mkdir(top.cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	return top
}

func (top *topology) run(args ...string) {
	top.t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		top.t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func (top *topology) teardown() {
	_ = exec.Command("ip", "netns", "del", top.client).Run()
	_ = exec.Command("ip", "netns", "del", top.backend).Run()
	// The cgroup is empty once the clients have exited; rmdir retries while the kernel
	// finishes releasing it.
	for i := 0; i < 50; i++ {
		if err := os.Remove(top.cgroup); err == nil || os.IsNotExist(err) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	top.t.Errorf("could not remove cgroup %s", top.cgroup)
}

// serve starts TCP and UDP echo servers on port in the backend namespace that answer with
// their own address. The sockets stay in that namespace; the thread that made them is
// discarded.
func (top *topology) serve(port uint16) {
	top.t.Helper()
	type result struct {
		tcp net.Listener
		udp net.PacketConn
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		ns, err := os.Open("/run/netns/" + top.backend)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer ns.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- result{err: err}
			return
		}
		addr := netip.AddrPortFrom(top.backIP, port).String()
		tcp, err := net.Listen("tcp4", addr)
		if err != nil {
			done <- result{err: err}
			return
		}
		udp, err := net.ListenPacket("udp4", addr)
		done <- result{tcp, udp, err}
	}()
	r := <-done
	if r.err != nil {
		top.t.Fatalf("listen in backend namespace: %v", r.err)
	}
	top.t.Cleanup(func() { r.tcp.Close(); r.udp.Close() })
	go func() {
		for {
			c, err := r.tcp.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if _, err := bufio.NewReader(c).ReadString('\n'); err == nil {
					fmt.Fprintf(c, "from %s\n", c.LocalAddr())
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
			_, _ = r.udp.WriteTo([]byte(fmt.Sprintf("from %s\n", r.udp.LocalAddr())), from)
		}
	}()
}

// dial runs a client in the client namespace and cgroup and returns what it printed.
func (top *topology) dial(proto string, addr netip.AddrPort) string {
	top.t.Helper()
	cg, err := os.Open(top.cgroup)
	if err != nil {
		top.t.Fatal(err)
	}
	defer cg.Close()
	cmd := exec.Command("ip", "netns", "exec", top.client, os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"="+proto+" "+addr.String())
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	out, err := cmd.CombinedOutput()
	if err != nil {
		top.t.Fatalf("client: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out))
}

func TestSocketLBTranslatesConnectionsOfTheCgroup(t *testing.T) {
	top := newTopology(t)
	top.serve(8080)
	lb, err := AttachSocketLB(top.cgroup)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lb.Close() })

	vip := netip.MustParseAddrPort("10.96.0.10:80")
	dns := netip.MustParseAddrPort("10.96.0.53:53")
	empty := netip.MustParseAddrPort("10.96.0.11:80")
	backend := netip.AddrPortFrom(top.backIP, 8080)
	if err := lb.Apply([]Frontend{
		{Address: vip, Protocol: TCP, Backends: []netip.AddrPort{backend}},
		{Address: dns, Protocol: UDP, Backends: []netip.AddrPort{backend}},
		{Address: empty, Protocol: TCP},
	}); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name, proto string
		to          netip.AddrPort
		want        string
	}{
		{"tcp to a ClusterIP reaches the backend and sees the VIP as peer", "tcp4", vip, fmt.Sprintf("peer=%s reply=from %s", vip, backend)},
		{"connected udp likewise", "udp4", dns, fmt.Sprintf("peer=%s reply=from %s", dns, backend)},
		{"no backends: refused", "tcp4", empty, "connection refused"},
		{"not a frontend: untouched (no route out)", "tcp4", netip.MustParseAddrPort("10.96.0.99:80"), "network is unreachable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := top.dial(tc.proto, tc.to); !strings.Contains(got, tc.want) {
				t.Fatalf("client printed %q, want %q", got, tc.want)
			}
		})
	}

	// Removing a frontend stops its translation.
	if err := lb.Apply([]Frontend{{Address: dns, Protocol: UDP, Backends: []netip.AddrPort{backend}}}); err != nil {
		t.Fatal(err)
	}
	if got := top.dial("tcp4", vip); !strings.Contains(got, "network is unreachable") {
		t.Fatalf("after removal the client printed %q, want the VIP untranslated", got)
	}
	var k sockLBSvc4Key
	var v sockLBSvcValue
	n := 0
	for it := lb.objs.PorticoSvc4.Iterate(); it.Next(&k, &v); {
		n++
	}
	if n != 2 {
		t.Fatalf("service map holds %d entries after removal, want 2 (frontend and its slot)", n)
	}
}

func TestApplyRejectsIPv6ForNow(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs")
	}
	s := &SocketLB{ids: map[backendRef]uint32{}, nextID: 1}
	if err := loadSockLBObjects(&s.objs, nil); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	err := s.Apply([]Frontend{{Address: netip.MustParseAddrPort("[fd00::1]:80"), Protocol: TCP}})
	if err == nil || !strings.Contains(err.Error(), "only IPv4") {
		t.Fatalf("err = %v", err)
	}
}
