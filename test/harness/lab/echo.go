package lab

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"

	"google.golang.org/grpc"

	"github.com/portico-dev/portico/test/harness/greeter"
)

// EchoImage is the lab's built-in echo workload: on each container port (TCP and UDP 8080
// when the container declares none) it answers every line, HTTP request and datagram with
// one line naming the pod: "pod=<name> node=<node> server=<ip:port> client=<ip:port>".
const EchoImage = "portico.dev/lab/echo"

// GreeterImage is the lab's gRPC workload: test/greeter on real grpc-go, answering "Hello
// from <pod>" on each TCP container port (50051 when the container declares none).
const GreeterImage = "portico.dev/lab/greeter"

// Echo is a parsed echo answer.
type Echo struct {
	Pod, Node      string
	Server, Client netip.AddrPort
}

// ParseEcho parses an answer of the echo workload.
func ParseEcho(answer string) (Echo, error) {
	var e Echo
	var err error
	fields := map[string]string{}
	for _, f := range strings.Fields(answer) {
		if k, v, ok := strings.Cut(f, "="); ok {
			fields[k] = v
		}
	}
	e.Pod, e.Node = fields["pod"], fields["node"]
	if e.Server, err = netip.ParseAddrPort(fields["server"]); err == nil {
		e.Client, err = netip.ParseAddrPort(fields["client"])
	}
	if e.Pod == "" || err != nil {
		return Echo{}, fmt.Errorf("%q is not an echo answer", answer)
	}
	return e, nil
}

// echo serves one pod's ports. close stops every listener and connection.
type echo struct {
	pod, node string
	mu        sync.Mutex
	closers   []io.Closer
	closed    bool
}

// Port is a container port the echo serves.
type Port struct {
	Number   int32
	Protocol string // "TCP" or "UDP"
	// GRPC serves the greeter (GreeterImage) instead of the echo.
	GRPC bool
}

// closerFunc closes by calling itself.
type closerFunc func()

func (f closerFunc) Close() error { f(); return nil }

// serveEcho starts the echo for pod p (in its namespace) on ports, on each of its addresses.
func serveEcho(p *Pod, ports []Port) (*echo, error) {
	e := &echo{pod: p.Name, node: p.Node}
	for _, port := range ports {
		for _, a := range p.IPs {
			addr := netip.AddrPortFrom(a, uint16(port.Number)).String()
			err := In(p.NS, func() error {
				if port.Protocol == "UDP" {
					pc, err := net.ListenPacket("udp", addr)
					if err == nil && e.track(pc) {
						go e.datagrams(pc)
					}
					return err
				}
				if port.GRPC {
					ln, err := net.Listen("tcp", addr)
					if err != nil {
						return err
					}
					s := grpc.NewServer()
					(&greeter.Server{Name: p.Name}).Register(s)
					if e.track(closerFunc(s.Stop)) {
						go func() { _ = s.Serve(ln) }()
					} else {
						_ = ln.Close()
					}
					return nil
				}
				ln, err := net.Listen("tcp", addr)
				if err == nil && e.track(ln) {
					go e.accept(ln)
				}
				return err
			})
			if err != nil {
				e.close()
				return nil, fmt.Errorf("echo in %s: %w", p.NS, err)
			}
		}
	}
	return e, nil
}

// track remembers c for close; false (and c closed) when the echo is closed already.
func (e *echo) track(c io.Closer) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		c.Close()
		return false
	}
	e.closers = append(e.closers, c)
	return true
}

func (e *echo) close() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.closed = true
	for _, c := range e.closers {
		c.Close()
	}
	e.closers = nil
}

func (e *echo) answer(server, client net.Addr) string {
	return fmt.Sprintf("pod=%s node=%s server=%s client=%s\n", e.pod, e.node, server, client)
}

func (e *echo) accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		if e.track(c) {
			go e.converse(c)
		}
	}
}

// converse answers each line, or each request when the first line is an HTTP request line.
func (e *echo) converse(c net.Conn) {
	defer c.Close()
	r := bufio.NewReader(c)
	for first := true; ; first = false {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if f := strings.Fields(line); first && len(f) == 3 && strings.HasPrefix(f[2], "HTTP/1.") {
			e.http(c, bufio.NewReader(io.MultiReader(strings.NewReader(line), r)))
			return
		}
		if _, err := io.WriteString(c, e.answer(c.LocalAddr(), c.RemoteAddr())); err != nil {
			return
		}
	}
}

// http answers HTTP/1.1 requests on c until the client closes.
func (e *echo) http(c net.Conn, r *bufio.Reader) {
	for {
		req, err := http.ReadRequest(r)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, req.Body)
		body := e.answer(c.LocalAddr(), c.RemoteAddr())
		resp := &http.Response{StatusCode: http.StatusOK, ProtoMajor: 1, ProtoMinor: 1, Request: req,
			Header: http.Header{"Content-Type": {"text/plain"}}, ContentLength: int64(len(body)),
			Body: io.NopCloser(strings.NewReader(body)), Close: req.Close}
		if err := resp.Write(c); err != nil || req.Close {
			return
		}
	}
}

func (e *echo) datagrams(pc net.PacketConn) {
	buf := make([]byte, 2048)
	for {
		_, from, err := pc.ReadFrom(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err == nil {
			_, _ = pc.WriteTo([]byte(e.answer(pc.LocalAddr(), from)), from)
		}
	}
}
