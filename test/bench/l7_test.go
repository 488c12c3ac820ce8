package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/portico-dev/portico/internal/l7/proxy"
	"github.com/portico-dev/portico/test/harness/greeter"
)

// The L7 benchmark's processes are this test binary run again in a role.
const (
	roleEnv    = "PORTICO_BENCH_ROLE"
	argEnv     = "PORTICO_BENCH_ARG"
	l7Backends = 3
)

// runRole runs this process as one of BenchmarkL7's processes, until its stdin closes:
// "greeters" (three greeters on loopback), "proxy" (Portico's proxy in front of the
// addresses in argEnv), "relay" (a TCP relay to the first of them) or "client" (calls, then
// a JSON line of results).
func runRole(role string) {
	arg := os.Getenv(argEnv)
	switch role {
	case "greeters":
		var addrs []string
		for i := range l7Backends {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			s := grpc.NewServer()
			(&greeter.Server{Name: fmt.Sprintf("backend-%d", i+1)}).Register(s)
			go func() { _ = s.Serve(ln) }()
			addrs = append(addrs, ln.Addr().String())
		}
		fmt.Println(strings.Join(addrs, ","))
	case "proxy":
		var backends []netip.AddrPort
		for _, a := range strings.Split(arg, ",") {
			backends = append(backends, netip.MustParseAddrPort(a))
		}
		p, err := proxy.New(nil)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		err = p.Set(map[string]proxy.Config{"bench": {Listen: netip.MustParseAddrPort("127.0.0.1:0"), Protocol: proxy.GRPC,
			Algorithm: proxy.RoundRobin, Backends: backends, DrainTimeout: time.Second}})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		addr, _ := p.Addr("bench")
		fmt.Println(addr)
	case "relay":
		if err := relay(strings.Split(arg, ",")[0]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "client":
		var c clientRun
		if err := json.Unmarshal([]byte(arg), &c); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		out, _ := json.Marshal(c.run())
		fmt.Println(string(out))
		return
	}
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n') // until the benchmark closes it
}

// relay listens on loopback, prints its address and copies each connection's bytes to and
// from a new connection to backend: the least any user-space hop costs, a floor for the
// proxies' added latency. It serves until the process ends.
func relay(backend string) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("tcp", backend)
				if err != nil {
					return
				}
				defer u.Close()
				go func() { _, _ = io.Copy(u, c) }()
				_, _ = io.Copy(c, u)
			}()
		}
	}()
	fmt.Println(ln.Addr())
	return nil
}

// clientRun is one row's client: unary calls over one connection, from Streams goroutines,
// for Seconds.
type clientRun struct {
	Target  string
	Streams int
	Seconds float64
}

type clientResult struct {
	Calls, Errors int
	P50, P99      time.Duration
	Backends      map[string]int
}

func (c clientRun) run() clientResult {
	cc, err := grpc.NewClient("passthrough:///"+c.Target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return clientResult{Errors: 1}
	}
	defer cc.Close()
	ctx := context.Background()
	for range 200 { // warm: connections, HTTP/2 windows, the proxy's backend connections
		_, _ = greeter.Call(ctx, cc, "hi")
	}
	var mu sync.Mutex
	res := clientResult{Backends: map[string]int{}}
	var lat []time.Duration
	end := time.Now().Add(time.Duration(c.Seconds * float64(time.Second)))
	var wg sync.WaitGroup
	for range c.Streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			seen := map[string]int{}
			errs := 0
			for time.Now().Before(end) {
				t0 := time.Now()
				out, err := greeter.Call(ctx, cc, "hi")
				mine = append(mine, time.Since(t0))
				if err != nil {
					errs++
				}
				seen[out]++
			}
			mu.Lock()
			lat = append(lat, mine...)
			res.Errors += errs
			for k, v := range seen {
				res.Backends[strings.TrimPrefix(k, "Hello from ")] += v
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	slices.Sort(lat)
	res.Calls = len(lat)
	if len(lat) > 0 {
		res.P50, res.P99 = lat[len(lat)/2], lat[len(lat)*99/100]
	}
	return res
}

// role starts this test binary in a role, pinned to cpu, and returns it with the first line
// it printed. It stops with the benchmark.
func role(b *testing.B, name, arg string, cpu int, env ...string) (*exec.Cmd, string) {
	b.Helper()
	self, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command("taskset", "-c", strconv.Itoa(cpu), self)
	cmd.Env = append(append(os.Environ(), roleEnv+"="+name, argEnv+"="+arg), env...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = stdin.Close(); _ = cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		b.Fatalf("%s: %v", name, err)
	}
	return cmd, strings.TrimSpace(line)
}

// nginx runs Debian's nginx (one worker, pinned to cpu) with grpc_pass and keepalive to the
// backends, and returns its address and its worker's pid.
func nginx(b *testing.B, backends []string, cpu int) (string, int) {
	b.Helper()
	bin, err := exec.LookPath("nginx")
	if err != nil {
		b.Skip("no nginx: `make bench-tools` installs it (Debian's, with grpc_pass)")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	dir := b.TempDir()
	var upstream strings.Builder
	for _, a := range backends {
		fmt.Fprintf(&upstream, "    server %s;\n", a)
	}
	conf := fmt.Sprintf(`worker_processes 1;
daemon off;
pid %[1]s/nginx.pid;
error_log stderr error;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  upstream greeters {
%[2]s    keepalive 64;
  }
  server {
    listen %[3]s http2;
    location / { grpc_pass grpc://greeters; }
  }
}
`, dir, upstream.String(), addr)
	if err := os.WriteFile(filepath.Join(dir, "nginx.conf"), []byte(conf), 0o644); err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command("taskset", "-c", strconv.Itoa(cpu), bin, "-p", dir, "-c", filepath.Join(dir, "nginx.conf"), "-e", "stderr")
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		// The master stops its worker on TERM; a killed master would leave it running.
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
	for t0 := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			_ = c.Close()
			break
		}
		if time.Since(t0) > 10*time.Second {
			b.Fatal("nginx does not listen")
		}
	}
	out, err := exec.Command("pgrep", "-P", strconv.Itoa(cmd.Process.Pid)).Output()
	worker, err2 := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil || err2 != nil {
		b.Fatalf("nginx's worker: %v %v", err, err2)
	}
	return addr, worker
}

// cpuTime is how much CPU a process used so far.
func cpuTime(b *testing.B, pid int) time.Duration {
	b.Helper()
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+2:]))
	user, _ := strconv.Atoi(f[11])
	sys, _ := strconv.Atoi(f[12])
	return time.Duration(user+sys) * 10 * time.Millisecond // USER_HZ is 100
}

// memory is a process's resident memory now ("VmRSS") or at its peak ("VmHWM"), in KiB.
func memory(b *testing.B, pid int, field string) int {
	b.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			kb, _ := strconv.Atoi(strings.Fields(v)[0])
			return kb
		}
	}
	b.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// BenchmarkL7 measures unary gRPC through Portico's proxy against the same calls direct to
// one backend, through nginx grpc_pass (keepalive) to the same three backends, and through a
// TCP relay to one backend (the floor of any user-space hop): requests per second, p50 and
// p99, with 1 and 64 concurrent streams over one client connection. Two placements: the
// proxies on CPU 1 with client and backends on CPU 0 (each hop crosses CPUs), and everything
// on CPU 0 (no hop does). The proxies run one thread (GOMAXPROCS=1, one nginx worker).
// BENCH_L7_SECONDS sets each row's length (default 5).
func BenchmarkL7(b *testing.B) {
	seconds := float64(envInt("BENCH_L7_SECONDS", 5))
	_, line := role(b, "greeters", "", 0)
	backends := strings.Split(line, ",")
	type path struct {
		name, addr string
		pid        int // 0: nothing between client and backend
		idle       int // its resident KiB before any traffic
	}
	var proxies [2][]path
	for cpu := range proxies {
		portico, paddr := role(b, "proxy", line, cpu, "GOMAXPROCS=1")
		naddr, nworker := nginx(b, backends, cpu)
		relay, raddr := role(b, "relay", line, cpu, "GOMAXPROCS=1")
		proxies[cpu] = []path{{name: "portico proxy", addr: paddr, pid: portico.Process.Pid}, {name: "nginx grpc_pass", addr: naddr, pid: nworker}, {name: "tcp relay", addr: raddr, pid: relay.Process.Pid}}
		for i := range proxies[cpu] {
			proxies[cpu][i].idle = memory(b, proxies[cpu][i].pid, "VmRSS")
		}
	}
	fmt.Printf("\nunary gRPC, one client connection, %v per row; client and 3 backends on CPU 0\n", time.Duration(seconds*float64(time.Second)))
	fmt.Printf("%-9s %-8s %-16s %9s %9s %9s %12s %7s  %s\n", "proxy on", "streams", "path", "req/s", "p50", "p99", "CPU/10k req", "errors", "calls per backend")
	for _, cpu := range []int{1, 0} {
		paths := append([]path{{name: "direct", addr: backends[0]}}, proxies[cpu]...)
		for _, streams := range []int{1, 64} {
			for _, p := range paths {
				arg, _ := json.Marshal(clientRun{Target: p.addr, Streams: streams, Seconds: seconds})
				var before time.Duration
				if p.pid != 0 {
					before = cpuTime(b, p.pid)
				}
				_, out := role(b, "client", string(arg), 0)
				var r clientResult
				if err := json.Unmarshal([]byte(out), &r); err != nil {
					b.Fatalf("client: %q: %v", out, err)
				}
				cpuPer := "-"
				if p.pid != 0 && r.Calls > 0 {
					cpuPer = (time.Duration(float64(cpuTime(b, p.pid)-before) * 10000 / float64(r.Calls+200))).Round(time.Millisecond).String()
				}
				rps := float64(r.Calls) / seconds
				fmt.Printf("CPU %-5d %-8d %-16s %9.0f %9s %9s %12s %7d  %v\n", cpu, streams, p.name, rps, r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), cpuPer, r.Errors, r.Backends)
				key := fmt.Sprintf("cpu%d-%s-%d", cpu, strings.Fields(p.name)[0], streams)
				b.ReportMetric(rps, key+"-req/s")
				b.ReportMetric(float64(r.P50.Microseconds()), key+"-p50-µs")
			}
		}
	}
	// The proxy and the relay run in this test binary, whose libraries (the API server's
	// client, envtest) hold most of its memory before any traffic: what the traffic added
	// is the proxy's own.
	fmt.Println("resident memory of the proxies on CPU 1: peak, before any traffic, added by the traffic")
	for _, p := range proxies[1] {
		peak := memory(b, p.pid, "VmHWM")
		fmt.Printf("  %-16s %6.1f MiB %6.1f MiB %6.1f MiB\n", p.name, float64(peak)/1024, float64(p.idle)/1024, float64(peak-p.idle)/1024)
	}
}
