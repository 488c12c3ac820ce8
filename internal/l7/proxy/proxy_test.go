package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/portico-dev/portico/internal/l7/proxy"
	"github.com/portico-dev/portico/test/harness/greeter"
	"github.com/portico-dev/portico/test/harness/nstest"
)

// backend is a greeter serving on loopback.
type backend struct {
	*greeter.Server
	addr netip.AddrPort
	srv  *grpc.Server
}

// greeters starts n greeters named backend-1..n on loopback, with the server options given;
// they stop with the test.
func greeters(t testing.TB, n int, opts ...grpc.ServerOption) []*backend {
	t.Helper()
	out := make([]*backend, n)
	for i := range out {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		b := &backend{Server: &greeter.Server{Name: fmt.Sprintf("backend-%d", i+1)}, addr: netip.MustParseAddrPort(ln.Addr().String()), srv: grpc.NewServer(opts...)}
		b.Register(b.srv)
		go func() { _ = b.srv.Serve(ln) }()
		t.Cleanup(b.srv.Stop)
		out[i] = b
	}
	return out
}

// refusing is a loopback address where nothing listens: connections are refused. The port
// stays bound (a socket that never listens, without SO_REUSEADDR) until the test ends: a
// port merely closed again may be handed to the next listener asking for any port — the
// proxy's own, in one CI run, which then answered for the "refusing" backend.
func refusing(t testing.TB) netip.AddrPort {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*syscall.SockaddrInet4).Port))
}

func addrs(bs []*backend) []netip.AddrPort {
	out := make([]netip.AddrPort, len(bs))
	for i, b := range bs {
		out[i] = b.addr
	}
	return out
}

// serve runs a proxy with one listener, "svc", on loopback, with its metrics in reg; it
// closes with the test.
func serve(t testing.TB, cfg proxy.Config) (*proxy.Proxy, netip.AddrPort, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	p, err := proxy.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	cfg.Listen = netip.MustParseAddrPort("127.0.0.1:0")
	if cfg.Protocol == "" {
		cfg.Protocol = proxy.GRPC
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 10 * time.Second
	}
	if err := p.Set(map[string]proxy.Config{"svc": cfg}); err != nil {
		t.Fatal(err)
	}
	addr, ok := p.Addr("svc")
	if !ok {
		t.Fatal("no listener")
	}
	return p, addr, reg
}

// count is the sum of a counter's samples in reg whose labels include want.
func count(t testing.TB, reg *prometheus.Registry, name string, want map[string]string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	total := 0.0
	for _, mf := range families {
		if mf.GetName() != name {
			continue
		}
	samples:
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, l := range m.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if got[k] != v {
					continue samples
				}
			}
			total += m.GetCounter().GetValue()
		}
	}
	return total
}

// dial opens one gRPC connection (grpc-go keeps exactly one per address).
func dial(t testing.TB, addr netip.AddrPort) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr.String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// hellos makes n calls over cc, from workers goroutines, and counts the answers by backend
// name; failed calls count under "error: <code> <message>".
func hellos(t testing.TB, cc *grpc.ClientConn, n, workers int) map[string]int {
	t.Helper()
	var mu sync.Mutex
	got := map[string]int{}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				out, err := greeter.Call(ctx, cc, "hi")
				cancel()
				key := strings.TrimPrefix(out, "Hello from ")
				if err != nil {
					key = "error: " + status.Code(err).String() + " " + status.Convert(err).Message()
				}
				mu.Lock()
				got[key]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return got
}

// failed counts the failed calls of a hellos result.
func failed(got map[string]int) int {
	n := 0
	for k, v := range got {
		if strings.HasPrefix(k, "error: ") {
			n += v
		}
	}
	return n
}

func spread(got map[string]int, names ...string) float64 {
	lo, hi := -1, 0
	for _, n := range names {
		c := got[n]
		if lo < 0 || c < lo {
			lo = c
		}
		hi = max(hi, c)
	}
	if lo <= 0 {
		return 0
	}
	return float64(hi) / float64(lo)
}

// The seed scenario: one client, one connection, 300 calls, three backends. Every backend
// answers, evenly (max/min at most 1.2) with round robin; every backend answers with the
// other algorithms too.
func TestOneConnectionSpreadsOverEveryBackend(t *testing.T) {
	bs := greeters(t, 3)
	names := []string{"backend-1", "backend-2", "backend-3"}
	for _, alg := range []proxy.Algorithm{proxy.RoundRobin, proxy.LeastRequest, proxy.Random} {
		t.Run(string(alg), func(t *testing.T) {
			_, addr, _ := serve(t, proxy.Config{Algorithm: alg, Backends: addrs(bs)})
			got := hellos(t, dial(t, addr), 300, 1)
			t.Logf("%s: %v", alg, got)
			for _, n := range names {
				if got[n] == 0 {
					t.Fatalf("%s never answered: %v", n, got)
				}
			}
			if sum := got[names[0]] + got[names[1]] + got[names[2]]; sum != 300 {
				t.Fatalf("%d of 300 calls answered by a backend: %v", sum, got)
			}
			if r := spread(got, names...); alg == proxy.RoundRobin && r > 1.2 {
				t.Fatalf("max/min %.2f > 1.2: %v", r, got)
			}
		})
	}
}

// Streams of every kind work through the proxy; gRPC status codes, messages and trailers
// come back unchanged; large messages cross (flow control); the client's deadline reaches the
// backend and ends the call there.
func TestStreamsStatusesTrailersAndDeadlines(t *testing.T) {
	bs := greeters(t, 1)
	_, addr, _ := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(bs)})
	cc := dial(t, addr)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	t.Run("server streaming", func(t *testing.T) {
		s, err := cc.NewStream(ctx, greeter.StreamDesc(greeter.Count), greeter.Count)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.SendMsg(wrapperspb.String("5:10ms")); err != nil {
			t.Fatal(err)
		}
		_ = s.CloseSend()
		var got []string
		for {
			m := new(wrapperspb.StringValue)
			if err := s.RecvMsg(m); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatal(err)
			}
			got = append(got, m.Value)
		}
		if want := []string{"backend-1 0", "backend-1 1", "backend-1 2", "backend-1 3", "backend-1 4"}; !slices.Equal(got, want) {
			t.Fatalf("got %v, want %v", got, want)
		}
	})
	t.Run("client streaming, 3 MiB in", func(t *testing.T) {
		s, err := cc.NewStream(ctx, greeter.StreamDesc(greeter.Sum), greeter.Sum)
		if err != nil {
			t.Fatal(err)
		}
		chunk := strings.Repeat("y", 1<<20)
		for range 3 {
			if err := s.SendMsg(wrapperspb.String(chunk)); err != nil {
				t.Fatal(err)
			}
		}
		_ = s.CloseSend()
		m := new(wrapperspb.StringValue)
		if err := s.RecvMsg(m); err != nil || m.Value != fmt.Sprint(3<<20) {
			t.Fatalf("sum %q, %v; want %d", m.Value, err, 3<<20)
		}
	})
	t.Run("bidirectional, answers as requests arrive", func(t *testing.T) {
		s, err := cc.NewStream(ctx, greeter.StreamDesc(greeter.Echo), greeter.Echo)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			// The next message goes only after the answer to this one came back.
			if err := s.SendMsg(wrapperspb.String(fmt.Sprint(i))); err != nil {
				t.Fatal(err)
			}
			m := new(wrapperspb.StringValue)
			if err := s.RecvMsg(m); err != nil || m.Value != fmt.Sprintf("backend-1: %d", i) {
				t.Fatalf("echo %d: %q, %v", i, m.Value, err)
			}
		}
		_ = s.CloseSend()
		if err := s.RecvMsg(new(wrapperspb.StringValue)); !errors.Is(err, io.EOF) {
			t.Fatalf("end of stream: %v", err)
		}
	})
	t.Run("3 MiB answer", func(t *testing.T) {
		out, err := greeter.Call(ctx, cc, fmt.Sprintf("big:%d", 3<<20))
		if err != nil || len(out) != 3<<20 {
			t.Fatalf("%d bytes, %v", len(out), err)
		}
	})
	t.Run("status and trailers unchanged", func(t *testing.T) {
		for _, code := range []codes.Code{codes.NotFound, codes.Unavailable, codes.PermissionDenied, codes.Internal} {
			var trailer metadata.MD
			_, err := greeter.Call(ctx, cc, fmt.Sprintf("fail:%d:no such greeting, 100%% sure", code), grpc.Trailer(&trailer))
			st := status.Convert(err)
			if st.Code() != code || st.Message() != "no such greeting, 100% sure" || !slices.Equal(trailer.Get("portico-test"), []string{"failed"}) {
				t.Fatalf("got %v %q, trailer %v; want %v, the message and portico-test: failed", st.Code(), st.Message(), trailer, code)
			}
		}
	})
	t.Run("deadline reaches the backend", func(t *testing.T) {
		dctx, dcancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer dcancel()
		_, err := greeter.Call(dctx, cc, "sleep:5s")
		if status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("got %v; want DeadlineExceeded", err)
		}
		if left := time.Duration(bs[0].LastDeadline.Load()); left <= 0 || left > 300*time.Millisecond {
			t.Fatalf("the backend saw %v left; want the client's deadline (at most 300ms)", left)
		}
	})
}

// A backend that refuses connections costs no call when retries are on (and a third of them
// when they are off: the test can tell).
func TestRetriesHideARefusingBackend(t *testing.T) {
	bs := greeters(t, 2)
	backends := append(addrs(bs), refusing(t))
	// A budget that lets every request in flight retry: the floor of 3 retries in flight
	// would otherwise fail a fourth concurrent one now and then, as it should.
	retries := &proxy.Retries{Attempts: 2, RetryOn: []proxy.Failure{proxy.ConnectFailure, proxy.Reset, proxy.RefusedStream, proxy.Unavailable}, BudgetPercent: 100}
	_, addr, reg := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: backends, Retries: retries})
	if got := hellos(t, dial(t, addr), 300, 4); failed(got) != 0 || got["backend-1"]+got["backend-2"] != 300 {
		t.Fatalf("with retries: %v", got)
	}
	if n, ok := count(t, reg, "portico_l7_retries_total", map[string]string{"listener": "svc", "failure": "ConnectFailure"}), count(t, reg, "portico_l7_requests_total", map[string]string{"code": "0"}); n < 50 || ok != 300 {
		t.Fatalf("metrics: %v retries after connect failures (want about 100), %v requests with code 0 (want 300)", n, ok)
	}
	_, addr, _ = serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: backends})
	if got := hellos(t, dial(t, addr), 300, 4); failed(got) < 50 {
		t.Fatalf("without retries, a third of the calls should fail: %v", got)
	}
}

// A backend killed while calls are in flight costs no call: what was in flight on it is
// retried elsewhere, and it is then passed over. The same for a backend that stops
// gracefully (GOAWAY: the streams it did not take go elsewhere). (The budget lets every
// request in flight retry here: with 20% and 8 clients, the floor of 3 retries in flight is
// what bounds them, and a fourth call failing at once is the budget doing its job.)
func TestBackendKilledMidRun(t *testing.T) {
	for name, stop := range map[string]func(*grpc.Server){"killed": (*grpc.Server).Stop, "graceful stop": (*grpc.Server).GracefulStop} {
		t.Run(name, func(t *testing.T) {
			bs := greeters(t, 3)
			for _, b := range bs {
				b.Delay = 2 * time.Millisecond // calls are in flight when the stop comes
			}
			retries := &proxy.Retries{Attempts: 2, RetryOn: []proxy.Failure{proxy.ConnectFailure, proxy.Reset, proxy.RefusedStream, proxy.Unavailable}, BudgetPercent: 100}
			_, addr, _ := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(bs), Retries: retries,
				Outlier: &proxy.Outlier{ConsecutiveFailures: 3, BaseEjection: 30 * time.Second, MaxEjectionPercent: 50}})
			cc := dial(t, addr)
			done := make(chan map[string]int)
			go func() { done <- hellos(t, cc, 2000, 8) }()
			for bs[1].Calls.Load() < 100 {
				time.Sleep(time.Millisecond)
			}
			stop(bs[1].srv)
			got := <-done
			t.Logf("%v", got)
			if n := failed(got); n != 0 {
				t.Fatalf("%d calls failed after a backend stopped: %v", n, got)
			}
		})
	}
}

// drain reads a stream whose first message was read to its end, and counts its messages.
func drain(s grpc.ClientStream) (int, error) {
	n := 1
	for {
		if err := s.RecvMsg(new(wrapperspb.StringValue)); errors.Is(err, io.EOF) {
			return n, nil
		} else if err != nil {
			return n, err
		}
		n++
	}
}

// A backend removed from the listener gets no new calls; a stream in flight on it runs to its
// end. One that outlives the drain timeout is reset.
func TestDrainingBackendFinishesWhatIsInFlight(t *testing.T) {
	bs := greeters(t, 3)
	p, addr, _ := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(bs[:1]), DrainTimeout: 10 * time.Second})
	cc := dial(t, addr)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	open := func(n int) grpc.ClientStream {
		s, err := cc.NewStream(ctx, greeter.StreamDesc(greeter.Count), greeter.Count)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.SendMsg(wrapperspb.String(fmt.Sprintf("%d:100ms", n))); err != nil {
			t.Fatal(err)
		}
		_ = s.CloseSend()
		if err := s.RecvMsg(new(wrapperspb.StringValue)); err != nil { // it runs on backend-1
			t.Fatal(err)
		}
		return s
	}
	long := open(10)
	set := func(cfg proxy.Config) {
		cfg.Listen, cfg.Protocol = netip.MustParseAddrPort("127.0.0.1:0"), proxy.GRPC // as serve asked: the listener stays
		if err := p.Set(map[string]proxy.Config{"svc": cfg}); err != nil {
			t.Fatal(err)
		}
	}
	set(proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(bs[1:]), DrainTimeout: 10 * time.Second})
	got := hellos(t, cc, 30, 1)
	if got["backend-1"] != 0 || got["backend-2"]+got["backend-3"] != 30 {
		t.Fatalf("a removed backend still gets calls: %v", got)
	}
	if n, err := drain(long); n != 10 || err != nil {
		t.Fatalf("the stream in flight on the removed backend got %d of 10 messages: %v", n, err)
	}

	// Back, then removed with a short drain: a long stream is reset when it is over.
	set(proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(bs[:1]), DrainTimeout: 300 * time.Millisecond})
	long = open(50)
	set(proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(bs[1:]), DrainTimeout: 300 * time.Millisecond})
	if n, err := drain(long); err == nil || n >= 50 {
		t.Fatalf("a stream outliving the drain timeout got %d of 50 messages and %v; want it reset", n, err)
	}
}

// Least request sends fewer calls to a slow backend than round robin does.
func TestLeastRequestAvoidsASlowBackend(t *testing.T) {
	bs := greeters(t, 3)
	bs[0].Delay = 20 * time.Millisecond
	_, addr, _ := serve(t, proxy.Config{Algorithm: proxy.LeastRequest, Backends: addrs(bs)})
	got := hellos(t, dial(t, addr), 600, 12)
	t.Logf("%v", got)
	if slow := got["backend-1"]; slow*5 > 600 {
		t.Fatalf("the slow backend got %d of 600 calls; round robin would give it 200, least request should give it under 120", slow)
	}
}

// A backend that keeps answering UNAVAILABLE is ejected: it gets only the calls that
// counted its failures, and those come back to the client unchanged.
func TestOutlierIsEjected(t *testing.T) {
	bs := greeters(t, 3)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sick := grpc.NewServer(grpc.UnknownServiceHandler(func(any, grpc.ServerStream) error {
		return status.Error(codes.Unavailable, "sick")
	}))
	go func() { _ = sick.Serve(ln) }()
	defer sick.Stop()
	backends := append(addrs(bs), netip.MustParseAddrPort(ln.Addr().String()))
	_, addr, reg := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: backends,
		Outlier: &proxy.Outlier{ConsecutiveFailures: 3, BaseEjection: time.Minute, MaxEjectionPercent: 50}})
	got := hellos(t, dial(t, addr), 300, 1)
	t.Logf("%v", got)
	if n := got["error: Unavailable sick"]; n != 3 {
		t.Fatalf("the sick backend answered %d calls; want 3 (then ejected): %v", n, got)
	}
	if n, bad := count(t, reg, "portico_l7_ejections_total", nil), count(t, reg, "portico_l7_requests_total", map[string]string{"code": "14"}); n != 1 || bad != 3 {
		t.Fatalf("metrics: %v ejections (want 1), %v requests answered UNAVAILABLE (want 3)", n, bad)
	}
}

// A backend that does not answer within the per-try timeout fails its calls with
// DEADLINE_EXCEEDED and is ejected like one that answers UNAVAILABLE.
func TestSilentBackendIsEjected(t *testing.T) {
	bs := greeters(t, 3)
	bs[0].Delay = 2 * time.Second
	_, addr, reg := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(bs), Retries: &proxy.Retries{PerTryTimeout: 100 * time.Millisecond},
		Outlier: &proxy.Outlier{ConsecutiveFailures: 2, BaseEjection: time.Minute, MaxEjectionPercent: 50}})
	got := hellos(t, dial(t, addr), 30, 1)
	t.Logf("%v", got)
	if n := got["error: DeadlineExceeded portico proxy: attempt timeout"]; n != 2 || got["backend-2"]+got["backend-3"] != 28 {
		t.Fatalf("the silent backend failed %d calls; want 2 (then ejected), the others the other 28: %v", n, got)
	}
	if n := count(t, reg, "portico_l7_ejections_total", nil); n != 1 {
		t.Fatalf("%v ejections; want 1", n)
	}
}

// With no usable backend the client gets the proxy's own UNAVAILABLE at once.
func TestNoBackendIsUnavailable(t *testing.T) {
	_, addr, _ := serve(t, proxy.Config{Algorithm: proxy.RoundRobin})
	_, err := greeter.Call(context.Background(), dial(t, addr), "hi")
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "no backend") {
		t.Fatalf("got %v; want UNAVAILABLE: no backend", err)
	}
}

// request sends a request (a POST when body is not empty) with "X-Forwarded-For:
// 198.51.100.7" and "X-Test: kept", and returns the response and its body.
func request(t testing.TB, client *http.Client, url, body string) (*http.Response, string) {
	t.Helper()
	method, r := http.MethodGet, io.Reader(nil)
	if body != "" {
		method, r = http.MethodPost, strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Test", "kept")
	req.Header.Set("X-Forwarded-For", "198.51.100.7")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	return resp, string(out)
}

// HTTP/1.1: keep-alive clients are spread per request too, headers go both ways, and the
// client's address is appended to X-Forwarded-For.
func TestHTTP1(t *testing.T) {
	var backends []netip.AddrPort
	for i := range 3 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Backend", fmt.Sprint(i+1))
			fmt.Fprintf(w, "%s %s", r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Test"))
		})}
		go func() { _ = srv.Serve(ln) }()
		t.Cleanup(func() { _ = srv.Close() })
		backends = append(backends, netip.MustParseAddrPort(ln.Addr().String()))
	}
	_, addr, _ := serve(t, proxy.Config{Protocol: proxy.HTTP1, Algorithm: proxy.RoundRobin, Backends: backends})
	client := &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1}}
	got := map[string]int{}
	for range 30 {
		resp, body := request(t, client, "http://"+addr.String()+"/", "")
		if body != "198.51.100.7, 127.0.0.1 kept" {
			t.Fatalf("the backend saw %q", body)
		}
		got[resp.Header.Get("X-Backend")]++
	}
	if got["1"] != 10 || got["2"] != 10 || got["3"] != 10 {
		t.Fatalf("one keep-alive connection, 30 requests: %v", got)
	}
}

// HTTP/2 without gRPC (h2c, prior knowledge): one connection is spread per request, bodies
// go both ways, the backend's status codes come back unchanged, the client's address is
// appended to x-forwarded-for; with no backend the proxy answers 503, and 504 when the
// request timeout is over.
func TestHTTP2(t *testing.T) {
	var backends []netip.AddrPort
	for i := range 3 {
		backends = append(backends, h2cBackend(t, func(w http.ResponseWriter, r *http.Request) {
			body, _ := io.ReadAll(r.Body)
			if r.URL.Path == "/slow" {
				time.Sleep(2 * time.Second)
			}
			w.Header().Set("X-Backend", fmt.Sprint(i+1))
			w.WriteHeader(http.StatusCreated)
			fmt.Fprintf(w, "%s %s %s", r.Proto, r.Header.Get("X-Forwarded-For"), body)
		}))
	}
	client := h2cClient()
	do := func(addr netip.AddrPort, path string) (*http.Response, string) {
		t.Helper()
		return request(t, client, "http://"+addr.String()+path, "ping")
	}

	_, addr, _ := serve(t, proxy.Config{Protocol: proxy.HTTP2, Algorithm: proxy.RoundRobin, Backends: backends, RequestTimeout: 500 * time.Millisecond})
	got := map[string]int{}
	for range 30 {
		resp, body := do(addr, "/")
		if resp.StatusCode != http.StatusCreated || resp.ProtoMajor != 2 || body != "HTTP/2.0 198.51.100.7, 127.0.0.1 ping" {
			t.Fatalf("got %s %s %q", resp.Proto, resp.Status, body)
		}
		got[resp.Header.Get("X-Backend")]++
	}
	if got["1"] != 10 || got["2"] != 10 || got["3"] != 10 {
		t.Fatalf("one HTTP/2 connection, 30 requests: %v", got)
	}
	if resp, body := do(addr, "/slow"); resp.StatusCode != http.StatusGatewayTimeout || !strings.Contains(body, "request timeout") {
		t.Fatalf("past the request timeout: %s %q; want 504", resp.Status, body)
	}

	_, addr, _ = serve(t, proxy.Config{Protocol: proxy.HTTP2, Algorithm: proxy.RoundRobin})
	if resp, body := do(addr, "/"); resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "no backend") {
		t.Fatalf("no backend: %s %q; want 503", resp.Status, body)
	}
}

// Flow control is end to end: a client that reads nothing holds the backend back after
// about a window (the client's, or the proxy's 1 MiB per stream when the client's is
// larger), rather than the proxy taking the whole answer in; once the client reads, all of
// it arrives. A client that opens its window wide and then reads nothing is held by its
// socket: the proxy gives window back to the backend only for what the socket took.
func TestSlowClientHoldsTheBackendBack(t *testing.T) {
	for _, window := range []uint32{65535, 1<<31 - 1} {
		t.Run(fmt.Sprintf("client window %d", window), func(t *testing.T) { slowClient(t, window) })
	}
}

func slowClient(t *testing.T, window uint32) {
	const total = 64 << 20
	var written atomic.Int64
	backend := h2cBackend(t, func(w http.ResponseWriter, r *http.Request) {
		chunk := make([]byte, 16<<10)
		for written.Load() < total {
			if _, err := w.Write(chunk); err != nil {
				return
			}
			written.Add(int64(len(chunk)))
		}
	})
	_, addr, _ := serve(t, proxy.Config{Protocol: proxy.HTTP2, Algorithm: proxy.RoundRobin, Backends: []netip.AddrPort{backend}})

	// A client at the frame level: it gives window back only when the test says so.
	nc, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(30 * time.Second))
	fr := http2.NewFramer(nc, nc)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "big"}, {":path", "/"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if _, err := io.WriteString(nc, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	var wide error
	if window > 65535 {
		wide = fr.WriteWindowUpdate(0, window-65535)
	}
	if err := errors.Join(fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: window}), wide,
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block.Bytes(), EndStream: true, EndHeaders: true})); err != nil {
		t.Fatal(err)
	}
	last := int64(-1)
	for n := written.Load(); n != last; n = written.Load() { // until the backend's writes stop
		last = n
		time.Sleep(500 * time.Millisecond)
	}
	if last > 16<<20 { // a window and what the two sockets buffer
		t.Fatalf("the backend wrote %d MiB of %d for a client that reads nothing; want it held back after a few", last>>20, total>>20)
	}
	// Now read it all, giving window back per 32 KiB.
	rd := http2.NewFramer(nc, bufio.NewReader(nc))
	got, owed := 0, 0
	for got < total {
		f, err := rd.ReadFrame()
		if err != nil {
			t.Fatalf("after %d of %d bytes: %v", got, total, err)
		}
		if d, ok := f.(*http2.DataFrame); ok {
			got += len(d.Data())
			if owed += len(d.Data()); owed >= 32<<10 {
				if err := errors.Join(fr.WriteWindowUpdate(0, uint32(owed)), fr.WriteWindowUpdate(1, uint32(owed))); err != nil {
					t.Fatal(err)
				}
				owed = 0
			}
		}
	}
	t.Logf("the backend wrote %d KiB before the client read; then %d MiB passed", last>>10, got>>20)
}

// The request timeout bounds a gRPC call that has no deadline of its own: the client gets
// DEADLINE_EXCEEDED from the proxy, and the backend's call is cancelled.
func TestRequestTimeout(t *testing.T) {
	bs := greeters(t, 1)
	_, addr, reg := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(bs), RequestTimeout: 200 * time.Millisecond})
	t0 := time.Now()
	_, err := greeter.Call(context.Background(), dial(t, addr), "sleep:5s")
	if st := status.Convert(err); st.Code() != codes.DeadlineExceeded || !strings.Contains(st.Message(), "request timeout") || time.Since(t0) > 3*time.Second {
		t.Fatalf("got %v after %v; want DEADLINE_EXCEEDED from the proxy after 200ms", err, time.Since(t0))
	}
	if n := count(t, reg, "portico_l7_requests_total", map[string]string{"code": "4"}); n != 1 {
		t.Fatalf("%v requests counted with code 4; want 1", n)
	}
}

// BenchmarkUnary is unary gRPC through the proxy, in one process (client, proxy and
// greeters): for profiles (-cpuprofile); test/bench's BenchmarkL7 compares it with nginx.
func BenchmarkUnary(b *testing.B) {
	bs := greeters(b, 3)
	_, addr, _ := serve(b, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(bs)})
	cc := dial(b, addr)
	if _, err := greeter.Call(context.Background(), cc, "hi"); err != nil {
		b.Fatal(err)
	}
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := greeter.Call(context.Background(), cc, "hi"); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// The retry budget caps retries in flight: with three refusing backends and a slow good one,
// 16 calls at once want a dozen retries; at 20% only 3 may be in flight (the floor), the rest
// are denied and their calls fail; at 100% every call gets its retries.
func TestRetryBudget(t *testing.T) {
	good := greeters(t, 1)[0]
	good.Delay = 300 * time.Millisecond
	backends := []netip.AddrPort{good.addr}
	for range 3 {
		backends = append(backends, refusing(t))
	}
	for _, budget := range []int{20, 100} {
		retries := &proxy.Retries{Attempts: 3, RetryOn: []proxy.Failure{proxy.ConnectFailure}, BudgetPercent: budget}
		_, addr, reg := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: backends, Retries: retries})
		got := hellos(t, dial(t, addr), 16, 16)
		denied := count(t, reg, "portico_l7_retries_denied_total", nil)
		t.Logf("budget %d%%: %v, %v retries denied", budget, got, denied)
		switch {
		case budget == 20 && (denied == 0 || failed(got) == 0):
			t.Fatalf("budget 20%%: %v retries denied, %d calls failed; want some of both", denied, failed(got))
		case budget == 100 && (denied != 0 || failed(got) != 0):
			t.Fatalf("budget 100%%: %v retries denied, %d calls failed; want none", denied, failed(got))
		}
	}
}

// A listener's port is free as soon as Set removes it, even while its requests drain: the
// agent hands freed ports to the next Service at once.
func TestRemovedListenerFreesItsPortAtOnce(t *testing.T) {
	bs := greeters(t, 1)
	p, addr, _ := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(bs)})
	cc := dial(t, addr)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := cc.NewStream(ctx, greeter.StreamDesc(greeter.Count), greeter.Count)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SendMsg(wrapperspb.String("20:100ms")); err != nil { // in flight for 2 s
		t.Fatal(err)
	}
	_ = s.CloseSend()
	if err := s.RecvMsg(new(wrapperspb.StringValue)); err != nil {
		t.Fatal(err)
	}
	cfg := proxy.Config{Listen: addr, Protocol: proxy.GRPC, Algorithm: proxy.RoundRobin, Backends: addrs(bs), DrainTimeout: 10 * time.Second}
	if err := p.Set(map[string]proxy.Config{}); err != nil {
		t.Fatal(err)
	}
	if err := p.Set(map[string]proxy.Config{"other": cfg}); err != nil {
		t.Fatalf("the port of a removed listener is still taken: %v", err)
	}
	if n, err := drain(s); n != 20 || err != nil {
		t.Fatalf("the stream in flight on the removed listener got %d of 20 messages: %v", n, err)
	}
}

// A client connection with no request in flight for longer than the idle timeout is told to
// go away (GOAWAY, NO_ERROR) and closed; one whose call outlasts the timeout is not cut.
func TestIdleClientConnectionIsClosed(t *testing.T) {
	bs := greeters(t, 1)
	bs[0].Delay = 600 * time.Millisecond
	_, addr, _ := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(bs), IdleTimeout: 200 * time.Millisecond})
	if _, err := greeter.Call(context.Background(), dial(t, addr), "hi"); err != nil {
		t.Fatalf("a call that outlasts the idle timeout: %v", err)
	}

	_, fr := rawClient(t, addr)
	t0 := time.Now()
	var away *http2.GoAwayFrame
	for {
		f, err := fr.ReadFrame()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("an idle connection is still open after %v: %v", time.Since(t0).Round(time.Millisecond), err)
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			away = g
		}
	}
	if away == nil || away.ErrCode != http2.ErrCodeNo {
		t.Fatalf("closed without a GOAWAY NO_ERROR first: %v", away)
	}
	t.Logf("an idle connection closed after %v", time.Since(t0).Round(time.Millisecond))
}

// rawClient is an HTTP/2 connection to addr, its preface and settings sent, that gives up
// reading after 5 seconds.
func rawClient(t *testing.T, addr netip.AddrPort) (net.Conn, *http2.Framer) {
	nc, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	fr := http2.NewFramer(nc, nc)
	if _, err := nc.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	_ = nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	return nc, fr
}

// A PING's answer waits for other frames to share its write, but not for ever: a PING
// followed only by frames that need no answer (a WINDOW_UPDATE) still gets one.
func TestLonePingIsAnswered(t *testing.T) {
	_, addr, _ := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(greeters(t, 1))})
	_, fr := rawClient(t, addr)
	for !next[*http2.SettingsFrame](t, fr).IsAck() { // the proxy's answer to ours, so that the PING comes alone
	}
	data := [8]byte{'p', 'o', 'r', 't', 'i', 'c', 'o', '!'}
	if err := fr.WritePing(false, data); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteWindowUpdate(0, 1000); err != nil {
		t.Fatal(err)
	}
	if p := next[*http2.PingFrame](t, fr); !p.IsAck() || p.Data != data {
		t.Fatalf("got PING ack=%v %q; want the ack of %q", p.IsAck(), p.Data, data)
	}
}

// A client that sends PINGs and reads none of the answers is cut off once the answers pile
// up behind a full socket, rather than having the proxy keep them all.
func TestPingFloodIsCutOff(t *testing.T) {
	_, addr, reg := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(greeters(t, 1))})
	nc, _ := rawClient(t, addr)
	var batch bytes.Buffer
	fr := http2.NewFramer(&batch, nil)
	for range 4096 {
		_ = fr.WritePing(false, [8]byte{})
	}
	_ = nc.SetWriteDeadline(time.Now().Add(20 * time.Second))
	const rounds = 1000 // 4M PINGs, 68 MB: more than any socket buffers
	for i := range rounds {
		if _, err := nc.Write(batch.Bytes()); err != nil {
			t.Logf("cut off after %d PINGs: %v", i*4096, err)
			if n := count(t, reg, "portico_l7_connections_cut_total", map[string]string{"code": "ENHANCE_YOUR_CALM"}); n != 1 {
				t.Fatalf("%v connections counted as cut for ENHANCE_YOUR_CALM; want 1", n)
			}
			return
		}
	}
	t.Fatalf("the proxy took %d PINGs from a client that reads nothing", rounds*4096)
}

// A client that opens streams and resets them at once (each costs a backend a request, the
// client nothing) is cut off with GOAWAY ENHANCE_YOUR_CALM.
func TestRapidResetIsCutOff(t *testing.T) {
	_, addr, reg := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(greeters(t, 1))})
	nc, fr := rawClient(t, addr)
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":authority", "greeter"},
		{":path", "/greeter.Greeter/Hello"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	go func() { // writes until the proxy closes the connection
		w := http2.NewFramer(nc, nil)
		for id := uint32(1); id < 20000; id += 2 {
			err := errors.Join(w.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block.Bytes(), EndHeaders: true}),
				w.WriteRSTStream(id, http2.ErrCodeCancel))
			if err != nil {
				return
			}
		}
	}()
	g := next[*http2.GoAwayFrame](t, fr) // a read timeout: still open after 10,000 streams opened and reset
	if g.ErrCode != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("GOAWAY %v %q; want ENHANCE_YOUR_CALM", g.ErrCode, g.DebugData())
	}
	t.Logf("GOAWAY %v %q", g.ErrCode, g.DebugData())
	if n := count(t, reg, "portico_l7_connections_cut_total", map[string]string{"code": "ENHANCE_YOUR_CALM"}); n != 1 {
		t.Fatalf("%v connections counted as cut for ENHANCE_YOUR_CALM; want 1", n)
	}
}

// A backend whose node dies without a word (nothing answers, nothing resets) is given up
// after 10 s of silence, even while a request waits on it unacknowledged, where TCP's
// keep-alive does not probe and TCP would retransmit for a quarter of an hour: the call is
// retried on the other backend. The silent backend is in a network namespace of its own,
// behind a veth pair whose far end the test takes down.
func TestSilentBackendIsGivenUp(t *testing.T) {
	t.Parallel()
	nstest.NeedRoot(t, "puts a backend in a network namespace and cuts its link")
	id := os.Getpid() % 100000
	ns, link := fmt.Sprintf("pds%d", id), fmt.Sprintf("pdv%d", id)
	// A /30 of 198.18.0.0/15 (RFC 2544's) of this process's own.
	near := netip.AddrFrom4([4]byte{198, 18 + byte(id>>14&1), byte(id >> 6), byte(id<<2) + 1})
	farAddr := near.Next()
	ip := func(args ...string) { t.Helper(); nstest.IP(t, args...) }
	nstest.Netns(t, ns)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", link).Run() })
	ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
	ip("addr", "add", near.String()+"/30", "dev", link)
	ip("link", "set", link, "up")
	ip("-n", ns, "addr", "add", farAddr.String()+"/30", "dev", "eth0")
	ip("-n", ns, "link", "set", "eth0", "up")
	var ln net.Listener
	var err error
	nstest.Enter(t, ns)(func() { ln, err = net.Listen("tcp", netip.AddrPortFrom(farAddr, 0).String()) })
	if err != nil {
		t.Fatal(err)
	}
	far := &backend{Server: &greeter.Server{Name: "far"}, addr: netip.MustParseAddrPort(ln.Addr().String()), srv: grpc.NewServer()}
	far.Register(far.srv)
	go func() { _ = far.srv.Serve(ln) }()
	t.Cleanup(far.srv.Stop)
	retries := &proxy.Retries{Attempts: 1, RetryOn: []proxy.Failure{proxy.ConnectFailure, proxy.Reset}, BudgetPercent: 100}
	_, addr, _ := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: []netip.AddrPort{far.addr, greeters(t, 1)[0].addr}, Retries: retries})
	cc := dial(t, addr)
	if got := hellos(t, cc, 4, 1); got["far"] != 2 || got["backend-1"] != 2 {
		t.Fatalf("before the cut: %v; want 2 answers from each", got)
	}

	ip("-n", ns, "link", "set", "eth0", "down")
	// Up again first thing when the test ends, so that the far side's sockets close at once
	// (their peers are gone: they get resets) rather than keeping the namespace for minutes.
	t.Cleanup(func() { _ = exec.Command("ip", "-n", ns, "link", "set", "eth0", "up").Run() })
	t0 := time.Now()
	answeredBy(t, cc, 2, "backend-1") // round robin sends one of them to the silent backend
	t.Logf("both calls answered %v after the cut", time.Since(t0).Round(time.Millisecond))
}

// answeredBy makes n calls over cc at once (each may take a minute) and fails the test
// unless the backend named want answers every one.
func answeredBy(t *testing.T, cc *grpc.ClientConn, n int, want string) {
	t.Helper()
	errs := make(chan error, n)
	for range n {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			out, err := greeter.Call(ctx, cc, "hi")
			if err == nil && out != "Hello from "+want {
				err = fmt.Errorf("answered %q", out)
			}
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatalf("a call: %v; want an answer from %s", err, want)
		}
	}
}

// A backend whose process stops answering while its kernel still accepts connections and
// acknowledges data (SIGSTOP: how a deadlocked or paused process looks from outside, and
// what TCP cannot see) is given up. A call waiting on it is reset once its connection's
// PING goes unanswered, and retried on the other backend; a new connection to it takes no
// request, for its SETTINGS never come, so the calls waiting for it go elsewhere at once.
func TestWedgedBackendIsGivenUp(t *testing.T) {
	t.Parallel()
	good := greeters(t, 1)[0]
	wedged, pid := greeterProcess(t, "wedged")
	retries := &proxy.Retries{Attempts: 1, RetryOn: []proxy.Failure{proxy.ConnectFailure, proxy.Reset}, BudgetPercent: 100}
	_, addr, reg := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: []netip.AddrPort{wedged, good.addr}, Retries: retries})
	cc := dial(t, addr)
	if got := hellos(t, cc, 4, 1); got["wedged"] != 2 || got["backend-1"] != 2 {
		t.Fatalf("before the stop: %v; want 2 answers from each", got)
	}

	stopProcess(t, pid)
	t0 := time.Now()
	answeredBy(t, cc, 2, "backend-1") // round robin sends one of them to the stopped backend
	t.Logf("in flight: both calls answered %v after the stop", time.Since(t0).Round(time.Millisecond))
	if n := count(t, reg, "portico_l7_retries_total", map[string]string{"failure": "Reset"}); n != 1 {
		t.Fatalf("%v calls reset and retried; want the one on the stopped backend", n)
	}
	if n := count(t, reg, "portico_l7_backend_connections_given_up_total", map[string]string{"reason": "no-ping-answer"}); n != 1 {
		t.Fatalf("%v backend connections given up for an unanswered PING; want 1", n)
	}

	// A proxy that never talked to it: the stopped backend's kernel completes its connection.
	retries = &proxy.Retries{Attempts: 1, RetryOn: []proxy.Failure{proxy.ConnectFailure}, BudgetPercent: 100}
	_, addr, reg = serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: []netip.AddrPort{wedged, good.addr}, Retries: retries})
	t0 = time.Now()
	answeredBy(t, dial(t, addr), 2, "backend-1")
	t.Logf("new connection: both calls answered %v after they started", time.Since(t0).Round(time.Millisecond))
	if n := count(t, reg, "portico_l7_retries_total", map[string]string{"failure": "ConnectFailure"}); n != 1 {
		t.Fatalf("%v calls retried for a failed connection; want the one sent to the stopped backend", n)
	}
	if n := count(t, reg, "portico_l7_backend_connections_given_up_total", map[string]string{"reason": "no-settings"}); n != 1 {
		t.Fatalf("%v backend connections given up for want of SETTINGS; want 1", n)
	}
}

// A call the backend answers after a long silence costs its connection one PING, not one
// per quiet spell: a grpc-go server ends a connection pinged more often than its keepalive
// policy's MinTime while it writes nothing (GOAWAY ENHANCE_YOUR_CALM after three such
// PINGs; MinTime is 5 minutes by default, 10 s here, for a call silent for 14 s).
func TestQuietCallIsPingedOnce(t *testing.T) {
	t.Parallel()
	bs := greeters(t, 1, grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second}))
	_, addr, _ := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(bs)})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := greeter.Call(ctx, dial(t, addr), "sleep:14s"); err != nil {
		t.Fatalf("a call answered after 14 s of silence: %v", err)
	}
}

// stopProcess stops a process (SIGSTOP) and waits until every thread of it is stopped: the
// signal takes effect as each thread next leaves the kernel, and one may still be sending
// an answer when kill returns.
func stopProcess(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	for t0 := time.Now(); time.Since(t0) < 5*time.Second; time.Sleep(time.Millisecond) {
		tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		if err != nil {
			t.Fatal(err)
		}
		stopped := 0
		for _, task := range tasks {
			// The state follows the command's name in parentheses.
			if b, err := os.ReadFile(task); err == nil && bytes.HasPrefix(b[bytes.LastIndexByte(b, ')')+1:], []byte(" T")) {
				stopped++
			}
		}
		if len(tasks) > 0 && stopped == len(tasks) {
			return
		}
	}
	t.Fatalf("process %d did not stop", pid)
}

// greeterEnv makes this test binary a greeter of that name, for a test that needs a backend
// in a process of its own: it prints its address, then serves.
const greeterEnv = "PORTICO_TEST_GREETER"

func TestMain(m *testing.M) {
	if name := os.Getenv(greeterEnv); name != "" {
		os.Exit(serveGreeter(name))
	}
	os.Exit(m.Run())
}

func serveGreeter(name string) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(ln.Addr())
	s := grpc.NewServer()
	(&greeter.Server{Name: name}).Register(s)
	fmt.Fprintln(os.Stderr, s.Serve(ln))
	return 1
}

// greeterProcess runs a greeter in a process of its own, killed when the test ends (or
// when the test binary dies), and returns its address and process ID.
func greeterProcess(t *testing.T, name string) (netip.AddrPort, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), greeterEnv+"="+name)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("greeter %s: %v", name, err)
	}
	addr, err := netip.ParseAddrPort(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("greeter %s printed %q: %v", name, line, err)
	}
	return addr, cmd.Process.Pid
}

// A request header list longer than the proxy takes (1 MiB) gets 431, and no backend sees a
// request with the fields past the limit missing.
func TestOversizedHeaderIsRefused(t *testing.T) {
	var seen atomic.Int64
	backend := h2cBackend(t, func(w http.ResponseWriter, r *http.Request) { seen.Add(1) })
	_, addr, _ := serve(t, proxy.Config{Protocol: proxy.HTTP2, Algorithm: proxy.RoundRobin, Backends: []netip.AddrPort{backend}})

	_, fr := rawClient(t, addr)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := writeOversized(fr, 1, ":method", "GET", ":scheme", "http", ":authority", "big", ":path", "/"); err != nil {
		t.Fatal(err)
	}
	if st := next[*http2.MetaHeadersFrame](t, fr).PseudoValue("status"); st != "431" || seen.Load() != 0 {
		t.Fatalf("got %s, %d requests at the backend; want 431 and none", st, seen.Load())
	}
}

// h2cBackend serves h on loopback over HTTP/2 without TLS, until the test ends.
func h2cBackend(t *testing.T, h http.HandlerFunc) netip.AddrPort {
	t.Helper()
	var h2 http.Protocols
	h2.SetUnencryptedHTTP2(true)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Protocols: &h2, Handler: h}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return netip.MustParseAddrPort(ln.Addr().String())
}

// h2cClient is an HTTP client that speaks HTTP/2 without TLS (prior knowledge).
func h2cClient() *http.Client {
	var h2 http.Protocols
	h2.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: &http.Transport{Protocols: &h2}, Timeout: 30 * time.Second}
}

// next reads frames until one of type F and returns it; a read error fails the test.
func next[F http2.Frame](t *testing.T, fr *http2.Framer) F {
	t.Helper()
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("waiting for a %T: %v", *new(F), err)
		}
		if g, ok := f.(F); ok {
			return g
		}
	}
}

// writeOversized writes on stream id (and ends it) a header block with the given fields, a
// filler that brings the list to 10 bytes short of 1 MiB, and x-after, which passes the
// limit in the block's last fragment (where the limit costs the stream, not the connection).
func writeOversized(fr *http2.Framer, id uint32, kv ...string) error {
	var fields []hpack.HeaderField
	size := 0
	for i := 0; i < len(kv); i += 2 {
		fields = append(fields, hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
		size += int(fields[len(fields)-1].Size())
	}
	filler := hpack.HeaderField{Name: "x-big"}
	filler.Value = strings.Repeat("a", 1<<20-10-size-int(filler.Size()))
	fields = append(fields, filler, hpack.HeaderField{Name: "x-after", Value: "1"})
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range fields {
		_ = enc.WriteField(f)
	}
	b := block.Bytes()
	first := b[:16<<10]
	err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndStream: true})
	for b = b[len(first):]; err == nil && len(b) > 0; {
		frag := b[:min(len(b), 16<<10)]
		b = b[len(frag):]
		err = fr.WriteContinuation(id, len(b) == 0, frag)
	}
	return err
}

// A backend's response header longer than the proxy takes fails the attempt (503 with the
// reason), rather than reaching the client with fields missing.
func TestOversizedResponseHeaderFails(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() { // a backend at the frame level: it answers its first request with the block
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		defer nc.Close()
		preface := make([]byte, len(http2.ClientPreface))
		if _, err := io.ReadFull(nc, preface); err != nil {
			return
		}
		fr := http2.NewFramer(nc, nc)
		if fr.WriteSettings() != nil {
			return
		}
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			if h, ok := f.(*http2.HeadersFrame); ok {
				_ = writeOversized(fr, h.StreamID, ":status", "200")
			}
		}
	}()
	_, addr, _ := serve(t, proxy.Config{Protocol: proxy.HTTP2, Algorithm: proxy.RoundRobin, Backends: []netip.AddrPort{netip.MustParseAddrPort(ln.Addr().String())}})
	resp, err := h2cClient().Get("http://" + addr.String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "header block longer") || resp.Header.Get("x-after") != "" {
		t.Fatalf("got %s %q; want 503 saying the header block was too long", resp.Status, body)
	}
}

// A window past 2^31-1 is a flow-control error (RFC 9113 6.9.1): the connection's ends the
// connection with GOAWAY FLOW_CONTROL_ERROR, rather than wrapping around and stalling it.
func TestWindowOverflowIsAnError(t *testing.T) {
	_, addr, _ := serve(t, proxy.Config{Algorithm: proxy.RoundRobin, Backends: addrs(greeters(t, 1))})
	_, fr := rawClient(t, addr)
	if err := fr.WriteWindowUpdate(0, 1<<31-1); err != nil { // on top of the initial 65,535
		t.Fatal(err)
	}
	if g := next[*http2.GoAwayFrame](t, fr); g.ErrCode != http2.ErrCodeFlowControl {
		t.Fatalf("GOAWAY %v %q; want FLOW_CONTROL_ERROR", g.ErrCode, g.DebugData())
	}
}
