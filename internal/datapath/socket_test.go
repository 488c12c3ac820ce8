package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/test/harness/nstest"
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
// error. Protocol "udp-sendto" uses an unconnected socket and prints the reply's source.
func client(target string) {
	proto, addr, _ := strings.Cut(target, " ")
	switch proto {
	case "udp-sendto":
		sendto(addr)
		return
	case "tcp-hold":
		hold(addr)
		return
	}
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

// hold keeps one TCP connection: it exchanges a line, waits for a line on stdin, and
// exchanges another on the same connection.
func hold(addr string) {
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	for _, round := range []string{"first", "second"} {
		if round == "second" {
			if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
				fmt.Println("error:", err)
				return
			}
		}
		_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := conn.Write([]byte("hello\n")); err != nil {
			fmt.Println("error:", err)
			return
		}
		reply, err := r.ReadString('\n')
		if err != nil {
			fmt.Println("error:", err)
			return
		}
		// Ask the kernel, not Go's copy from dial time: after a restart this reads the
		// adopted socket map.
		fmt.Printf("%s peer=%s reply=%s\n", round, peerOf(conn), strings.TrimSpace(reply))
	}
}

func peerOf(conn net.Conn) string {
	raw, err := conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		return "error: " + err.Error()
	}
	var peer string
	_ = raw.Control(func(fd uintptr) {
		sa, err := unix.Getpeername(int(fd))
		switch a := sa.(type) {
		case *unix.SockaddrInet4:
			peer = netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)).String()
		case *unix.SockaddrInet6:
			peer = netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port)).String()
		default:
			peer = fmt.Sprintf("error: %v", err)
		}
	})
	return peer
}

// sendto uses Go's unbound UDP socket, which is dual-stack: for an IPv4 frontend the reply
// reaches it through the IPv6 hooks as an IPv4-mapped address, which this also covers.
func sendto(addr string) {
	to, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	conn, err := net.ListenUDP("udp", nil)
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.WriteToUDP([]byte("hello\n"), to); err != nil {
		fmt.Println("error:", err)
		return
	}
	buf := make([]byte, 256)
	n, from, err := conn.ReadFromUDPAddrPort(buf)
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	fmt.Printf("peer=%s reply=%s\n", netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), strings.TrimSpace(string(buf[:n])))
}

// topology is a client namespace and a backend namespace on one veth pair, a cgroup for
// the client, and echo servers on the backend's addresses, port 8080. The client namespace
// has no default route: an untranslated frontend address goes nowhere.
type topology struct {
	t                       testing.TB
	client, backend, cgroup string
	backIP, backIP6         netip.Addr
}

func newTopology(t testing.TB) *topology {
	t.Helper()
	p := nstest.NewPair(t, "ptc", 8080, netip.MustParsePrefix("10.250.0.0/30"), netip.MustParsePrefix("fd00:250::/64"))
	return &topology{t: t, client: p.Client, backend: p.BackendNS, cgroup: p.Cgroup, backIP: p.Backends[0].Addr(), backIP6: p.Backends[1].Addr()}
}

// command prepares a client process in the client namespace, outside the test's cgroup (no
// Portico).
func (top *topology) command(proto string, addr netip.AddrPort) *exec.Cmd {
	cmd := exec.Command("ip", "netns", "exec", top.client, os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"="+proto+" "+addr.String())
	return cmd
}

// clientCmd prepares a client process in the client namespace and cgroup. The caller closes
// the returned cgroup file once the process has started.
func (top *topology) clientCmd(proto string, addr netip.AddrPort) (*exec.Cmd, *os.File) {
	top.t.Helper()
	cg, err := os.Open(top.cgroup)
	if err != nil {
		top.t.Fatal(err)
	}
	cmd := top.command(proto, addr)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	return cmd, cg
}

// dial runs a client to completion and returns what it printed.
func (top *topology) dial(proto string, addr netip.AddrPort) string {
	top.t.Helper()
	cmd, cg := top.clientCmd(proto, addr)
	defer cg.Close()
	out, err := cmd.CombinedOutput()
	if err != nil {
		top.t.Fatalf("client: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out))
}

func TestSocketLBTranslatesConnectionsOfTheCgroup(t *testing.T) {
	top := newTopology(t)
	lb := top.attach()

	type family struct {
		name                         string
		web, dns, empty, notFrontend netip.AddrPort
		backend                      netip.AddrPort
	}
	families := []family{
		{"v4", netip.MustParseAddrPort("10.96.0.10:80"), netip.MustParseAddrPort("10.96.0.53:53"), netip.MustParseAddrPort("10.96.0.11:80"),
			netip.MustParseAddrPort("10.96.0.99:80"), netip.AddrPortFrom(top.backIP, 8080)},
		{"v6", netip.MustParseAddrPort("[fd00:96::10]:80"), netip.MustParseAddrPort("[fd00:96::53]:53"), netip.MustParseAddrPort("[fd00:96::11]:80"),
			netip.MustParseAddrPort("[fd00:96::99]:80"), netip.AddrPortFrom(top.backIP6, 8080)},
	}
	var all []loadbalancer.Frontend
	for _, f := range families {
		all = append(all,
			internal(f.web, loadbalancer.TCP, f.backend),
			internal(f.dns, loadbalancer.UDP, f.backend),
			internal(f.empty, loadbalancer.TCP))
	}
	if err := lb.Apply(all); err != nil {
		t.Fatal(err)
	}

	for _, f := range families {
		for _, tc := range []struct {
			name, proto string
			to          netip.AddrPort
			want        string
		}{
			{"tcp to a ClusterIP reaches the backend and sees the VIP as peer", "tcp", f.web, fmt.Sprintf("peer=%s reply=from %s", f.web, f.backend)},
			{"connected udp likewise", "udp", f.dns, fmt.Sprintf("peer=%s reply=from %s", f.dns, f.backend)},
			{"unconnected udp: the reply comes from the VIP", "udp-sendto", f.dns, fmt.Sprintf("peer=%s reply=from %s", f.dns, f.backend)},
			{"no backends: refused", "tcp", f.empty, "connection refused"},
			{"not a frontend: untouched (no route out)", "tcp", f.notFrontend, "network is unreachable"},
		} {
			t.Run(f.name+"/"+tc.name, func(t *testing.T) {
				if got := top.dial(tc.proto, tc.to); !strings.Contains(got, tc.want) {
					t.Fatalf("client printed %q, want %q", got, tc.want)
				}
			})
		}
	}

	// Removing frontends stops their translation and leaves only what is still wanted.
	keep := []loadbalancer.Frontend{all[1], all[4]} // the two DNS frontends
	if err := lb.Apply(keep); err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if got := top.dial("tcp", f.web); !strings.Contains(got, "network is unreachable") {
			t.Fatalf("after removal the client printed %q, want %s untranslated", got, f.web)
		}
		if got := top.dial("udp", f.dns); !strings.Contains(got, "reply=from "+f.backend.String()) {
			t.Fatalf("a kept frontend stopped working: %q", got)
		}
	}
	if n4, n6 := entries(t, lb.sock.PorticoSvc4), entries(t, lb.sock.PorticoSvc6); n4 != 2 || n6 != 2 {
		t.Fatalf("service maps hold %d and %d entries after removal, want 2 each (frontend and its slot)", n4, n6)
	}
}

func entries(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	n := 0
	k := make([]byte, m.KeySize())
	v := make([]byte, m.ValueSize())
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// startClient starts a client that takes orders on stdin ("tcp-hold") and
// returns its stdin and its output lines; the process ends with the test.
func startClient(t testing.TB, client *exec.Cmd) (io.Writer, *bufio.Scanner) {
	t.Helper()
	stdin, err := client.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := client.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := client.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Process.Kill(); _ = client.Wait() })
	return stdin, bufio.NewScanner(stdout)
}

// loaded returns a Datapath with its programs and maps loaded but attached nowhere.
func loaded(t testing.TB) *Datapath {
	t.Helper()
	nstest.NeedRoot(t, "loads BPF programs")
	d, err := Load(Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

// attachPinned loads a Datapath pinned in pins (nothing pinned when empty) and attaches it to the
// topology's cgroup. The caller closes it.
func (top *topology) attachPinned(pins string) (*Datapath, error) {
	d, err := Load(Options{PinDir: pins})
	if err != nil {
		return nil, err
	}
	if err := d.AttachCgroup(top.cgroup); err != nil {
		return nil, errors.Join(err, d.Close())
	}
	return d, nil
}

// attach is attachPinned without pins, closed when the test ends.
func (top *topology) attach() *Datapath {
	top.t.Helper()
	d, err := top.attachPinned("")
	if err != nil {
		top.t.Fatal(err)
	}
	top.t.Cleanup(func() { _ = d.Close() })
	return d
}

// internal is a frontend for clients on the node.
func internal(addr netip.AddrPort, proto loadbalancer.Protocol, backends ...netip.AddrPort) loadbalancer.Frontend {
	f := loadbalancer.Frontend{Address: addr, Protocol: proto, Scope: loadbalancer.Internal}
	for _, b := range backends {
		f.Backends = append(f.Backends, loadbalancer.Backend{Address: b})
	}
	return f
}

func TestApplyRejectsInvalidFrontends(t *testing.T) {
	s := loaded(t)
	for _, f := range []loadbalancer.Frontend{
		internal(netip.MustParseAddrPort("[fd00::1]:80"), loadbalancer.TCP, netip.MustParseAddrPort("10.0.0.1:80")),
		{Address: netip.MustParseAddrPort("[::ffff:10.96.0.1]:80"), Protocol: loadbalancer.TCP},
	} {
		if err := s.Apply([]loadbalancer.Frontend{f}); err == nil {
			t.Errorf("Apply(%v) accepted it", f)
		}
	}
}

func TestRestartKeepsTranslationAndEstablishedConnections(t *testing.T) {
	top := newTopology(t)
	pins := filepath.Join(nstest.BPFFS(t), "node-a")
	web := netip.MustParseAddrPort("10.96.0.10:80")
	backend := netip.AddrPortFrom(top.backIP, 8080)
	frontends := []loadbalancer.Frontend{internal(web, loadbalancer.TCP, backend)}

	first, err := top.attachPinned(pins)
	if err != nil {
		t.Fatal(err)
	}
	current := first
	t.Cleanup(func() {
		if err := current.Uninstall(); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	if err := first.Apply(frontends); err != nil {
		t.Fatal(err)
	}

	// A client holds one connection across the restart.
	holder, cg := top.clientCmd("tcp-hold", web)
	stdin, lines := startClient(t, holder)
	cg.Close()
	want := fmt.Sprintf("peer=%s reply=from %s", web, backend)
	if !lines.Scan() || !strings.HasPrefix(lines.Text(), "first "+want) {
		t.Fatalf("before the restart the holder printed %q, want %q", lines.Text(), "first "+want)
	}

	// The agent exits: new connections are still translated.
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if got := top.dial("tcp", web); !strings.HasPrefix(got, want) {
		t.Fatalf("with the agent gone a new client printed %q, want %q", got, want)
	}

	// A new agent adopts the pins and the state in them.
	second, err := top.attachPinned(pins)
	if err != nil {
		t.Fatal(err)
	}
	current = second
	if len(second.ids) != 1 || second.ids[refOf(backend, loadbalancer.TCP)] == 0 {
		t.Fatalf("adopted backend ids %v, want the one backend", second.ids)
	}
	dns := netip.MustParseAddrPort("10.96.0.53:53")
	if err := second.Apply(append(frontends, internal(dns, loadbalancer.UDP, backend))); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(stdin, "go on\n"); err != nil {
		t.Fatal(err)
	}
	if !lines.Scan() || !strings.HasPrefix(lines.Text(), "second "+want) {
		t.Fatalf("after the restart the held connection printed %q, want %q", lines.Text(), "second "+want)
	}
	if got := top.dial("udp", dns); !strings.Contains(got, "reply=from "+backend.String()) {
		t.Fatalf("a frontend added after the restart: %q", got)
	}
}

// Update and Delete touch one frontend and keep backends exactly as long as a slot names
// them; Apply is a resync built from them.
func TestUpdateAndDeleteKeepBackendsWhileUsed(t *testing.T) {
	s := loaded(t)
	a, b, c := netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.2:80"), netip.MustParseAddrPort("10.0.0.3:80")
	web, api := netip.MustParseAddrPort("10.96.0.1:80"), netip.MustParseAddrPort("10.96.0.2:80")
	v6 := netip.MustParseAddrPort("[fd00:96::1]:80")
	check := func(step string, svc4, svc6, backends int) {
		t.Helper()
		if n4, n6, nb := entries(t, s.sock.PorticoSvc4), entries(t, s.sock.PorticoSvc6), entries(t, s.sock.PorticoBe4)+entries(t, s.sock.PorticoBe6); n4 != svc4 || n6 != svc6 || nb != backends {
			t.Fatalf("%s: service entries %d+%d, backends %d; want %d+%d, %d", step, n4, n6, nb, svc4, svc6, backends)
		}
		if s.applied4.entries != svc4 || s.applied6.entries != svc6 || len(s.ids) != backends {
			t.Fatalf("%s: the mirror disagrees with the maps", step)
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(s.Update(internal(web, loadbalancer.TCP, a, b)))
	must(s.Update(internal(api, loadbalancer.TCP, b, c)))
	check("two frontends", 6, 0, 3)
	must(s.Update(internal(web, loadbalancer.TCP, b)))
	check("web shrinks to the shared backend", 5, 0, 2)
	must(s.Delete(api, loadbalancer.TCP, loadbalancer.Internal))
	check("api deleted", 2, 0, 1)
	must(s.Update(internal(v6, loadbalancer.TCP, netip.MustParseAddrPort("[fd00::1]:80"))))
	check("an IPv6 frontend beside", 2, 2, 2)
	must(s.Apply([]loadbalancer.Frontend{internal(api, loadbalancer.UDP, a)}))
	check("apply replaces everything", 2, 0, 1)
	must(s.Apply(nil))
	check("apply nothing", 0, 0, 0)
}

// TestApplyIntoEmptyMapsMatchesUpdates checks the batched first Apply against the same
// frontends written one Update at a time: every map must hold the same entries.
func TestApplyIntoEmptyMapsMatchesUpdates(t *testing.T) {
	batched, oneByOne := loaded(t), loaded(t)
	shared := netip.MustParseAddrPort("10.0.0.1:8080")
	fs := []loadbalancer.Frontend{
		internal(netip.MustParseAddrPort("10.96.0.1:80"), loadbalancer.TCP, shared, netip.MustParseAddrPort("10.0.0.2:8080")),
		internal(netip.MustParseAddrPort("10.96.0.2:53"), loadbalancer.UDP, shared),
		internal(netip.MustParseAddrPort("[fd00::1]:80"), loadbalancer.TCP, netip.MustParseAddrPort("[fd00::10]:8080")),
		{Address: netip.MustParseAddrPort("203.0.113.1:443"), Protocol: loadbalancer.TCP, Scope: loadbalancer.External, Balancing: loadbalancer.Maglev, Affinity: time.Minute,
			SourceRanges: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")},
			Backends:     []loadbalancer.Backend{local(shared), {Address: netip.MustParseAddrPort("10.0.0.3:8080"), Terminating: true}}},
		internal(netip.MustParseAddrPort("10.96.0.3:80"), loadbalancer.TCP), // no backends
	}
	if err := batched.Apply(fs); err != nil {
		t.Fatal(err)
	}
	for _, f := range fs {
		if err := oneByOne.Update(f); err != nil {
			t.Fatal(err)
		}
	}
	for _, pair := range [][2]*ebpf.Map{
		{batched.sock.PorticoSvc4, oneByOne.sock.PorticoSvc4}, {batched.sock.PorticoSvc6, oneByOne.sock.PorticoSvc6},
		{batched.sock.PorticoBe4, oneByOne.sock.PorticoBe4}, {batched.sock.PorticoBe6, oneByOne.sock.PorticoBe6},
		{batched.sock.PorticoMaglev, oneByOne.sock.PorticoMaglev}, {batched.sock.PorticoSrcrange4, oneByOne.sock.PorticoSrcrange4},
	} {
		got, want := dump(t, pair[0]), dump(t, pair[1])
		if len(got) == 0 || !maps.Equal(got, want) {
			t.Errorf("%s: batched Apply wrote %d entries, one Update at a time %d, or they differ", pair[1], len(got), len(want))
		}
	}
	// The mirror is right too: a change after the batched Apply writes only what changed.
	if err := batched.Update(internal(netip.MustParseAddrPort("10.96.0.2:53"), loadbalancer.UDP)); err != nil {
		t.Fatal(err)
	}
	if err := oneByOne.Update(internal(netip.MustParseAddrPort("10.96.0.2:53"), loadbalancer.UDP)); err != nil {
		t.Fatal(err)
	}
	if got, want := dump(t, batched.sock.PorticoSvc4), dump(t, oneByOne.sock.PorticoSvc4); !maps.Equal(got, want) {
		t.Errorf("after an Update: the service maps differ")
	}
}

// dump reads a map's entries as raw bytes.
func dump(t *testing.T, m *ebpf.Map) map[string]string {
	t.Helper()
	out := map[string]string{}
	var k, v []byte
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[string(k)] = string(v)
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}
