package proxy

import (
	"context"
	"errors"
	"maps"
	"net"
	"slices"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

var errClosing = errors.New("the listener is closing")

// h2server serves a listener's HTTP/2 clients (gRPC, h2c with prior knowledge): each
// request becomes an exchange with a backend.
type h2server struct {
	s  *service
	wg sync.WaitGroup // the connections' goroutines

	mu      sync.Mutex
	conns   map[*h2conn]bool
	closing bool
}

func newH2Server(s *service) *h2server {
	return &h2server{s: s, conns: map[*h2conn]bool{}}
}

// Serve accepts connections until the listener closes.
func (h *h2server) Serve(ln net.Listener) error {
	stop := make(chan struct{})
	defer close(stop)
	go h.sweep(stop)
	for {
		nc, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return err
		}
		if err != nil { // out of file descriptors, say: wait rather than spin
			time.Sleep(10 * time.Millisecond)
			continue
		}
		c := newConn(nc, false)
		c.srv = h
		h.mu.Lock()
		if h.closing {
			h.mu.Unlock()
			_ = nc.Close()
			continue
		}
		h.conns[c] = true
		c.start(&h.wg)
		h.mu.Unlock()
	}
}

// sweep asks the clients whose connections were idle for longer than the listener's idle
// timeout to go away (GOAWAY: the connection closes once written), until stop closes.
func (h *h2server) sweep(stop <-chan struct{}) {
	for {
		timeout := h.s.cfg.Load().idleTimeout()
		t := time.NewTimer(timeout / 4)
		select {
		case <-stop:
			t.Stop()
			return
		case <-t.C:
		}
		h.mu.Lock()
		conns := slices.Collect(maps.Keys(h.conns))
		h.mu.Unlock()
		now := time.Now()
		for _, c := range conns {
			if since := c.idleSince(); !since.IsZero() && now.Sub(since) >= timeout {
				c.goAway(http2.ErrCodeNo, "")
			}
		}
	}
}

// Shutdown asks every client to go away (GOAWAY: no new streams) and waits until the
// streams in flight ended or ctx is done; then it closes what is left.
func (h *h2server) Shutdown(ctx context.Context) error {
	for _, c := range h.stopTaking() {
		c.goAway(http2.ErrCodeNo, "")
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		h.mu.Lock()
		n := len(h.conns)
		h.mu.Unlock()
		if n == 0 {
			break
		}
		select {
		case <-ctx.Done():
			return h.Close()
		case <-tick.C:
		}
	}
	h.wg.Wait()
	return nil
}

// Close closes every connection at once.
func (h *h2server) Close() error {
	for _, c := range h.stopTaking() {
		c.close(errClosing)
	}
	h.wg.Wait()
	return nil
}

// stopTaking closes new connections as they come and returns the open ones.
func (h *h2server) stopTaking() []*h2conn {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closing = true
	return slices.Collect(maps.Keys(h.conns))
}

// forget drops a closed connection.
func (h *h2server) forget(c *h2conn) {
	h.mu.Lock()
	delete(h.conns, c)
	h.mu.Unlock()
}

// newExchange is a new request on c.
func (h *h2server) newExchange(c *h2conn, id uint32) *exchange {
	return &exchange{s: h.s, cfg: h.s.cfg.Load(), down: c, id: id, t0: time.Now()}
}
