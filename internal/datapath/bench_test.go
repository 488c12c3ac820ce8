package datapath

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

// connections is how many connections one measurement opens; rounds how many measurements
// of each path a median is taken over.
const (
	connections = 3000
	rounds      = 5
)

// connectLoop opens connections one after another (connect, one request line, reset) and
// prints the connect latency percentiles and the rate of whole cycles.
func connectLoop(addr string) {
	lat := make([]time.Duration, 0, connections)
	start := time.Now()
	for range connections {
		t0 := time.Now()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			fmt.Println("error:", err)
			return
		}
		lat = append(lat, time.Since(t0))
		_ = c.(*net.TCPConn).SetLinger(0) // reset on close: no TIME_WAIT pile-up
		if _, err := c.Write([]byte("x\n")); err == nil {
			_, _ = bufio.NewReader(c).ReadString('\n')
		}
		c.Close()
	}
	rate := float64(connections) / time.Since(start).Seconds()
	slices.Sort(lat)
	fmt.Printf("%d %d %.0f\n", lat[len(lat)/2].Nanoseconds(), lat[len(lat)*99/100].Nanoseconds(), rate)
}

type connStats struct {
	p50, p99 time.Duration
	rate     float64
}

func (top *topology) connectStats(to netip.AddrPort) connStats {
	top.t.Helper()
	out := top.dial("tcp-loop", to)
	f := strings.Fields(out)
	if len(f) != 3 {
		top.t.Fatalf("client printed %q", out)
	}
	p50, _ := strconv.ParseInt(f[0], 10, 64)
	p99, _ := strconv.ParseInt(f[1], 10, 64)
	rate, _ := strconv.ParseFloat(f[2], 64)
	return connStats{time.Duration(p50), time.Duration(p99), rate}
}

func median(xs []connStats) connStats {
	by := func(get func(connStats) float64) float64 {
		v := make([]float64, len(xs))
		for i, x := range xs {
			v[i] = get(x)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	return connStats{
		p50:  time.Duration(by(func(c connStats) float64 { return float64(c.p50) })),
		p99:  time.Duration(by(func(c connStats) float64 { return float64(c.p99) })),
		rate: by(func(c connStats) float64 { return c.rate }),
	}
}

// BenchmarkSocketLBConnect measures new connections from a client namespace to a backend
// namespace through a ClusterIP translated at the socket layer, with 1, 1,000 and 10,000
// Services programmed, beside a direct connection to the backend in the same run (the limit),
// and how long programming takes. Run it with -benchtime 1x; it prints a table.
func BenchmarkSocketLBConnect(b *testing.B) {
	top := newTopology(b)
	top.serve(8080)
	lb := top.attach()
	backend := netip.AddrPortFrom(top.backIP, 8080)
	vip := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)}), 80)
	}
	fmt.Printf("\n%d sequential connections per measurement, median of %d rounds, client in its own namespace and cgroup\n", connections, rounds)
	fmt.Printf("%-9s %-22s %10s %10s %12s %9s %16s\n", "services", "path", "p50", "p99", "conn/s", "vs direct", "apply all (+1 svc)")
	for _, n := range []int{1, 1000, 10000} {
		frontends := make([]Frontend, n)
		for i := range frontends {
			frontends[i] = internal(vip(i), TCP, backend)
		}
		t0 := time.Now()
		if err := lb.Apply(frontends); err != nil {
			b.Fatal(err)
		}
		full := time.Since(t0)
		t0 = time.Now()
		if err := lb.Update(internal(vip(n), TCP, backend)); err != nil {
			b.Fatal(err)
		}
		plusOne := time.Since(t0)

		var direct, portico []connStats
		for range rounds {
			direct = append(direct, top.connectStats(backend))
			portico = append(portico, top.connectStats(vip(n-1)))
		}
		d, p := median(direct), median(portico)
		fmt.Printf("%-9d %-22s %10s %10s %12.0f %9s %16s\n", n, "direct to backend", d.p50.Round(time.Microsecond), d.p99.Round(time.Microsecond), d.rate, "", "")
		fmt.Printf("%-9d %-22s %10s %10s %12.0f %8.0f%% %16s\n", n, "Portico ClusterIP", p.p50.Round(time.Microsecond), p.p99.Round(time.Microsecond), p.rate,
			100*p.rate/d.rate, fmt.Sprintf("%s (%s)", full.Round(time.Microsecond), plusOne.Round(time.Microsecond)))
		b.ReportMetric(100*p.rate/d.rate, fmt.Sprintf("pct-of-direct-%dsvc", n))
	}
	fmt.Println()
}

// BenchmarkPacketLayer measures the packet programs per packet with BPF_PROG_TEST_RUN: a
// packet of an established flow (conntrack hit, DNAT, FIB lookup, redirect) and a packet for
// the node itself that no frontend matches (the cost every other packet pays), with 1 and
// 10,000 frontends programmed. Run it with -benchtime 1x; it prints a table.
func BenchmarkPacketLayer(b *testing.B) {
	n := newNode(b)
	const repeat = 200000
	perPacket := func(in []byte) time.Duration {
		var took time.Duration
		var err error
		n.exec(func() {
			opts := ebpf.RunOptions{Data: in, Repeat: repeat, Context: skbContext{IngressIfindex: n.ext, Ifindex: n.ext}}
			t0 := time.Now()
			_, err = n.d.np.PorticoNodeportIngress.Run(&opts)
			took = time.Since(t0)
		})
		if err != nil {
			b.Fatal(err)
		}
		return took / repeat
	}
	client := netip.MustParseAddrPort("198.51.100.7:40000")
	backend := local(netip.MustParseAddrPort("10.244.1.10:8080"))
	fmt.Printf("\nper packet at TC ingress, %d runs each (BPF_PROG_TEST_RUN, one CPU)\n", repeat)
	fmt.Printf("%-9s %-34s %10s\n", "services", "packet", "time")
	for _, count := range []int{1, 10000} {
		for i := range count {
			addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, byte(i >> 8), byte(i)}), 80)
			if err := n.d.Update(external(addr, TCP, backend)); err != nil {
				b.Fatal(err)
			}
		}
		flow := pkt{src: client, dst: netip.MustParseAddrPort("203.0.0.0:80"), proto: TCP, tcpFlags: tcpACK}.bytes()
		other := pkt{src: client, dst: netip.MustParseAddrPort("192.0.2.1:22"), proto: TCP, tcpFlags: tcpACK}.bytes()
		fmt.Printf("%-9d %-34s %10s\n", count, "established flow (DNAT, redirect)", perPacket(flow))
		fmt.Printf("%-9d %-34s %10s\n", count, "no frontend (passed on)", perPacket(other))
	}
	fmt.Println()
}
