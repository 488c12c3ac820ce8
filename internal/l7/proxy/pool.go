package proxy

import (
	"context"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// backend is one endpoint with its own connections: HTTP/2 multiplexes every request over
// one (more when the backend limits streams per connection), HTTP/1.1 keeps a pool.
type backend struct {
	addr      netip.AddrPort
	host      string          // addr as a URL host
	transport *http.Transport // HTTP/1.1
	h2        *upstreams      // HTTP/2
	inflight  atomic.Int64

	failures     atomic.Int64 // in a row
	ejections    atomic.Int64
	ejectedUntil atomic.Int64 // unix nanoseconds; 0: never ejected

	draining atomic.Bool
	// drained ends when the drain timeout is over: requests still in flight are reset.
	drained context.Context
	reset   context.CancelFunc
	timer   *time.Timer
}

func (b *backend) usable(now int64) bool {
	return !b.draining.Load() && b.ejectedUntil.Load() <= now
}

// pool holds a listener's backends.
type pool struct {
	protocol Protocol
	told     poolEvents
	rr       atomic.Uint64

	mu       sync.RWMutex
	all      []*backend // the backends requests may go to (ejected ones included)
	draining map[*backend]bool
	closed   bool
}

// poolEvents are what a pool tells its listener's metrics.
type poolEvents struct {
	ejected      func()              // a backend was ejected
	unresponsive func(reason string) // a backend connection was given up: "no-settings", "no-ping-answer"
}

func newPool(p Protocol, told poolEvents) *pool {
	return &pool{protocol: p, told: told, draining: map[*backend]bool{}}
}

func (p *pool) newBackend(a netip.AddrPort) *backend {
	ctx, cancel := context.WithCancel(context.Background())
	b := &backend{addr: a, host: a.String(), drained: ctx, reset: cancel}
	if p.protocol == HTTP1 {
		b.transport = &http.Transport{
			DialContext:         backendDialer().DialContext,
			MaxIdleConnsPerHost: 1024,
			IdleConnTimeout:     2 * time.Minute,
			DisableCompression:  true,
		}
	} else {
		b.h2 = &upstreams{addr: b.host, unresponsive: p.told.unresponsive}
		context.AfterFunc(ctx, b.h2.closeAll) // drained: what is left is reset
	}
	return b
}

// shut closes a backend's idle connections (HTTP/1.1) or every connection (HTTP/2, whose
// streams were reset already when it drained).
func (b *backend) shut() {
	b.reset()
	if b.transport != nil {
		b.transport.CloseIdleConnections()
	}
}

// set makes addrs the backends. A new address gets a backend; a backend whose address is
// gone drains: no new requests, and those in flight are reset after drain.
func (p *pool) set(addrs []netip.AddrPort, drain time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	next := make([]*backend, 0, len(addrs))
	for _, a := range addrs {
		i := slices.IndexFunc(p.all, func(b *backend) bool { return b.addr == a })
		if i >= 0 {
			next = append(next, p.all[i])
		} else if !slices.ContainsFunc(next, func(b *backend) bool { return b.addr == a }) {
			next = append(next, p.newBackend(a))
		}
	}
	for _, b := range p.all {
		if !slices.Contains(next, b) {
			b.timer = time.AfterFunc(drain, b.reset)
			b.draining.Store(true) // after the timer: whoever sees draining sees the timer
			p.draining[b] = true
		}
	}
	p.all = next
	for b := range p.draining {
		if b.inflight.Load() == 0 {
			p.retire(b)
		}
	}
}

// retire closes a drained backend's connections. Callers hold p.mu.
func (p *pool) retire(b *backend) {
	b.timer.Stop()
	b.shut()
	delete(p.draining, b)
}

// pick returns a usable backend, one not in tried when there is one; nil: none is usable.
func (p *pool) pick(alg Algorithm, tried []*backend) *backend {
	p.mu.RLock()
	defer p.mu.RUnlock()
	now := time.Now().UnixNano()
	var buf [16]*backend
	cands := buf[:0]
	for _, b := range p.all {
		if b.usable(now) && !slices.Contains(tried, b) {
			cands = append(cands, b)
		}
	}
	if len(cands) == 0 && len(tried) > 0 {
		for _, b := range p.all {
			if b.usable(now) {
				cands = append(cands, b)
			}
		}
	}
	switch {
	case len(cands) == 0:
		return nil
	case len(cands) == 1:
		return cands[0]
	}
	switch alg {
	case Random:
		return cands[rand.IntN(len(cands))]
	case LeastRequest:
		i, j := rand.IntN(len(cands)), rand.IntN(len(cands)-1)
		if j >= i {
			j++
		}
		if cands[j].inflight.Load() < cands[i].inflight.Load() {
			return cands[j]
		}
		return cands[i]
	default:
		return cands[p.rr.Add(1)%uint64(len(cands))]
	}
}

// release ends a request on b (which counted itself in b.inflight), and retires b when it
// was the last one of a draining backend.
func (p *pool) release(b *backend) {
	if b.inflight.Add(-1) == 0 && b.draining.Load() {
		p.mu.Lock()
		if p.draining[b] {
			p.retire(b)
		}
		p.mu.Unlock()
	}
}

// report tells whether a request on b succeeded, for outlier detection.
func (p *pool) report(b *backend, ok bool, o *Outlier) {
	if o == nil {
		return
	}
	if ok {
		b.failures.Store(0)
		return
	}
	if b.failures.Add(1) < int64(o.ConsecutiveFailures) {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	out := 0
	for _, c := range p.all {
		if !c.usable(now.UnixNano()) {
			out++
		}
	}
	if out+1 > len(p.all)*o.MaxEjectionPercent/100 || out+1 >= len(p.all) || !b.usable(now.UnixNano()) {
		return // too many out already (the last one always stays), or b is out
	}
	b.failures.Store(0)
	n := min(b.ejections.Add(1), 10)
	b.ejectedUntil.Store(now.Add(time.Duration(n) * o.BaseEjection).UnixNano())
	p.told.ejected()
}

// close resets every backend's requests and closes its connections.
func (p *pool) close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	all := p.all
	for b := range p.draining {
		all = append(all, b)
		p.retire(b)
	}
	p.all = nil
	p.mu.Unlock()
	for _, b := range all {
		b.shut()
		if b.h2 != nil {
			b.h2.closeAll()
			b.h2.wg.Wait()
		}
	}
}
