// Package proxy is the node's L7 proxy: per listener, it spreads each request (not each
// connection) over the backends it is given, with retries that are safe, outlier ejection
// and draining. It speaks gRPC and HTTP/2 over cleartext (prior knowledge) and HTTP/1.1, and
// knows nothing of Kubernetes: the agent gives it listeners and backends. See docs/l7.md.
package proxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Protocol is what clients speak to a listener, and the proxy to its backends.
type Protocol string

const (
	GRPC  Protocol = "GRPC"  // gRPC: HTTP/2 with gRPC's own errors (grpc-status)
	HTTP2 Protocol = "HTTP2" // HTTP/2 over cleartext, prior knowledge
	HTTP1 Protocol = "HTTP1" // HTTP/1.1
)

// Algorithm picks the backend of each request.
type Algorithm string

const (
	RoundRobin   Algorithm = "RoundRobin"
	LeastRequest Algorithm = "LeastRequest" // power of two choices, by requests in flight
	Random       Algorithm = "Random"
)

// Failure is a way a request can fail before a backend processed it.
type Failure string

const (
	ConnectFailure Failure = "ConnectFailure" // the connection was refused or timed out
	Reset          Failure = "Reset"          // the connection or stream was reset before any response
	RefusedStream  Failure = "RefusedStream"  // HTTP/2 REFUSED_STREAM
	Unavailable    Failure = "Unavailable"    // gRPC UNAVAILABLE with no response message
)

// Retries re-send requests that failed in one of the RetryOn ways.
type Retries struct {
	Attempts      int
	PerTryTimeout time.Duration // 0: only the request timeout
	RetryOn       []Failure
	// BudgetPercent caps retries in flight at this share of the requests in flight (at
	// least 3 are always allowed).
	BudgetPercent int
}

// Outlier ejects a backend after ConsecutiveFailures failures in a row, for BaseEjection
// times its number of ejections (at most ten times), keeping at most MaxEjectionPercent of
// the backends (and never the last one) out.
type Outlier struct {
	ConsecutiveFailures int
	BaseEjection        time.Duration
	MaxEjectionPercent  int
}

// Config is one listener.
type Config struct {
	// Listen is the address to listen on; port 0 picks one (Addr tells which).
	Listen    netip.AddrPort
	Protocol  Protocol
	Algorithm Algorithm
	Backends  []netip.AddrPort
	// RequestTimeout bounds each request, retries included; 0: none.
	RequestTimeout time.Duration
	Retries        *Retries
	Outlier        *Outlier
	// DrainTimeout is how long requests in flight on a removed backend may run on.
	DrainTimeout time.Duration
	// IdleTimeout is how long a client's connection with no request in flight stays
	// open; 0: defaultIdleTimeout. HTTP/1.1 listeners keep the one they opened with.
	IdleTimeout time.Duration
}

// defaultIdleTimeout is how long an idle client connection stays open when the
// configuration does not say.
const defaultIdleTimeout = 5 * time.Minute

func (c *Config) idleTimeout() time.Duration {
	return cmp.Or(c.IdleTimeout, defaultIdleTimeout)
}

// attempts is how many times a request may be sent: once, and its retries.
func (c *Config) attempts() int {
	if c.Retries == nil {
		return 1
	}
	return 1 + c.Retries.Attempts
}

// Proxy serves a set of listeners. The zero value is not usable: call New.
type Proxy struct {
	metrics  *metrics
	mu       sync.Mutex
	services map[string]*service
	stopping map[*service]bool // listeners closed, requests in flight finishing
	wg       sync.WaitGroup
}

// New returns a proxy with no listeners, its metrics (docs/metrics.md) registered in reg
// (nil: kept to itself).
func New(reg prometheus.Registerer) (*Proxy, error) {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	return &Proxy{metrics: m, services: map[string]*service{}, stopping: map[*service]bool{}}, nil
}

// Set makes the proxy serve exactly these listeners, by name. A listener whose address and
// protocol stay keeps its connections; its backends and settings change in place, and removed
// backends drain. A listener that cannot be opened is reported and left out; the others are
// set all the same.
func (p *Proxy) Set(cfgs map[string]Config) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(p.services)) {
		s := p.services[name]
		cfg, keep := cfgs[name]
		if keep && s.listen == cfg.Listen && s.protocol == cfg.Protocol {
			continue
		}
		p.stop(s)
		delete(p.services, name)
		if !keep {
			p.metrics.forget(name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(cfgs)) {
		cfg := cfgs[name]
		if s := p.services[name]; s != nil {
			s.set(cfg)
			continue
		}
		s, err := start(name, cfg, p.metrics)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		p.services[name] = s
	}
	return errors.Join(errs...)
}

// Addr is the address a listener listens on.
func (p *Proxy) Addr(name string) (netip.AddrPort, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.services[name]
	if s == nil {
		return netip.AddrPort{}, false
	}
	return s.addr, true
}

// Close stops every listener and resets what is in flight.
func (p *Proxy) Close() {
	p.mu.Lock()
	for name, s := range p.services {
		s.close()
		delete(p.services, name)
	}
	for s := range p.stopping {
		_ = s.srv.Close() // ends the graceful stop at once
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// stop closes a listener at once (its port may be taken again right away) and lets its
// requests in flight finish, within its drain timeout.
func (p *Proxy) stop(s *service) {
	_ = s.ln.Close()
	p.stopping[s] = true
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Load().DrainTimeout)
		defer cancel()
		_ = s.srv.Shutdown(ctx)
		s.close()
		p.mu.Lock()
		delete(p.stopping, s)
		p.mu.Unlock()
	}()
}

// server serves a listener's clients: net/http's for HTTP/1.1, h2server for HTTP/2.
type server interface {
	Serve(net.Listener) error
	Shutdown(context.Context) error
	Close() error
}

// service is one listener: its server, its backends and its settings.
type service struct {
	name     string
	listen   netip.AddrPort // as asked
	addr     netip.AddrPort // as bound
	protocol Protocol
	metrics  *metrics
	ln       net.Listener
	srv      server
	cfg      atomic.Pointer[Config]
	pool     *pool
	served   chan struct{}

	active   atomic.Int64 // requests in flight
	retrying atomic.Int64 // retries in flight
}

func start(name string, cfg Config, m *metrics) (*service, error) {
	ln, err := net.Listen("tcp", cfg.Listen.String())
	if err != nil {
		return nil, fmt.Errorf("listener %s: %w", name, err)
	}
	addr, err := netip.ParseAddrPort(ln.Addr().String())
	if err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("listener %s: %w", name, err)
	}
	s := &service{name: name, listen: cfg.Listen, addr: addr, protocol: cfg.Protocol, metrics: m, ln: ln, served: make(chan struct{}),
		pool: newPool(cfg.Protocol, poolEvents{ejected: func() { m.ejections.WithLabelValues(name).Inc() },
			unresponsive: func(reason string) { m.unresponsive.WithLabelValues(name, reason).Inc() }})}
	if cfg.Protocol == HTTP1 {
		var protos http.Protocols
		protos.SetHTTP1(true)
		s.srv = &http.Server{Handler: s, Protocols: &protos, ReadHeaderTimeout: 30 * time.Second, IdleTimeout: cfg.idleTimeout()}
	} else {
		s.srv = newH2Server(s)
	}
	s.set(cfg)
	go func() {
		defer close(s.served)
		_ = s.srv.Serve(ln) // returns when stopped
	}()
	return s, nil
}

func (s *service) set(cfg Config) {
	c := cfg
	s.cfg.Store(&c)
	s.pool.set(cfg.Backends, cfg.DrainTimeout)
}

// close stops at once: connections close, requests in flight are reset.
func (s *service) close() {
	_ = s.ln.Close()
	_ = s.srv.Close()
	<-s.served
	s.pool.close()
}
