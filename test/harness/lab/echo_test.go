package lab

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/portico-dev/portico/test/harness/greeter"
)

// The echo answers lines, HTTP requests and datagrams, on both families, naming the pod,
// and stops answering once closed.
func TestEchoAnswersEveryProtocolUntilClosed(t *testing.T) {
	// nstest.NeedRoot stands on this package: the check is written out here.
	if testing.Short() || os.Geteuid() != 0 {
		t.Skip("needs root (and no -short): creates a network namespace")
	}
	ns := fmt.Sprintf("echotest%d", os.Getpid())
	if err := addNS(ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = delNS(ns) })
	p := &Pod{Name: "web-1", Node: "node-9", NS: ns, IPs: []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")}}
	e, err := serveEcho(p, []Port{{8080, "TCP", false}, {8081, "UDP", false}, {50051, "TCP", true}})
	if err != nil {
		t.Fatal(err)
	}
	check := func(what, answer string, server netip.Addr) {
		t.Helper()
		got, err := ParseEcho(answer)
		if err != nil || got.Pod != "web-1" || got.Node != "node-9" || got.Server.Addr() != server || got.Client.Addr() != server {
			t.Errorf("%s: answer %q (%v)", what, answer, err)
		}
	}
	for _, a := range p.IPs {
		// The greeter port answers gRPC (the dialer opens its connection in the namespace).
		cc, err := grpc.NewClient("passthrough:///"+netip.AddrPortFrom(a, 50051).String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(func(ctx context.Context, addr string) (c net.Conn, err error) {
				err = In(ns, func() (err error) { c, err = (&net.Dialer{}).DialContext(ctx, "tcp", addr); return err })
				return c, err
			}))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		out, err := greeter.Call(ctx, cc, "hi")
		cancel()
		_ = cc.Close()
		if err != nil || out != "Hello from web-1" {
			t.Errorf("gRPC on %s: %q, %v", a, out, err)
		}
		tcp := netip.AddrPortFrom(a, 8080).String()
		err = In(ns, func() error {
			c, err := net.DialTimeout("tcp", tcp, time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			r := bufio.NewReader(c)
			for i := range 2 {
				fmt.Fprintln(c, "hello")
				line, err := r.ReadString('\n')
				if err != nil {
					return err
				}
				check(fmt.Sprintf("line %d", i), line, a)
			}
			hc, err := net.DialTimeout("tcp", tcp, time.Second)
			if err != nil {
				return err
			}
			defer hc.Close()
			req, _ := http.NewRequest(http.MethodGet, "http://"+tcp+"/any/path", nil)
			if err := req.Write(hc); err != nil {
				return err
			}
			resp, err := http.ReadResponse(bufio.NewReader(hc), req)
			if err != nil {
				return err
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Errorf("HTTP status %d", resp.StatusCode)
			}
			check("HTTP", string(body), a)
			u, err := net.Dial("udp", netip.AddrPortFrom(a, 8081).String())
			if err != nil {
				return err
			}
			defer u.Close()
			_ = u.SetDeadline(time.Now().Add(time.Second))
			buf := make([]byte, 512)
			if _, err := u.Write([]byte("hi")); err != nil {
				return err
			}
			n, err := u.Read(buf)
			if err != nil {
				return err
			}
			check("UDP", string(buf[:n]), a)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	e.close()
	err = In(ns, func() error {
		c, err := net.DialTimeout("tcp", "127.0.0.1:8080", time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("after close: %v, want connection refused", err)
	}
}

func TestParseEchoRejectsOtherText(t *testing.T) {
	for _, s := range []string{"", "hello", "pod=x node=y server=bad client=1.2.3.4:5", "node=y server=1.2.3.4:80 client=1.2.3.4:5"} {
		if _, err := ParseEcho(s); err == nil {
			t.Errorf("ParseEcho(%q) accepted it", s)
		}
	}
}
