package proxy

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

var errBackendGone = errors.New("the backend was removed")

// upstreams are one backend's HTTP/2 connections: usually one that carries every request,
// more when the backend limits the streams of a connection.
type upstreams struct {
	addr         string
	unresponsive func(reason string) // told of a connection given up for the backend's silence
	wg           sync.WaitGroup      // the connections' goroutines

	mu      sync.Mutex
	conns   []*h2conn
	dialing bool
	waiters []func(*h2conn, error)
	closed  bool
}

// get returns a connection that takes a new stream. When there is none it returns nil and
// then calls then, from another goroutine, once a new connection is up or failed.
func (u *upstreams) get(then func(*h2conn, error)) (*h2conn, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return nil, errBackendGone
	}
	for _, c := range u.conns {
		if c.capacity() {
			return c, nil
		}
	}
	u.waiters = append(u.waiters, then)
	if !u.dialing {
		u.dialing = true
		go u.dial()
	}
	return nil, nil
}

// backendSilence is how long a backend may acknowledge nothing before its connection is
// given up: its node died, or the network to it dropped everything. Keep-alive probes find
// that out on a connection with nothing in flight; TCP_USER_TIMEOUT when requests wait
// unacknowledged, where probes do not run and TCP would retransmit for a quarter of an hour.
// The streams on it are then lost, and retried when they may be.
const backendSilence = 10 * time.Second

// backendDialer connects to backends (HTTP/2 and HTTP/1.1 alike).
func backendDialer() *net.Dialer {
	return &net.Dialer{Timeout: 2 * time.Second, Control: userTimeout,
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: backendSilence / 2, Interval: backendSilence / 5, Count: 3}}
}

func (u *upstreams) dial() {
	c, err := u.connect()
	u.mu.Lock()
	waiters := u.waiters
	u.waiters, u.dialing = nil, false
	switch {
	case err == nil && u.closed:
		c.close(errBackendGone)
		c, err = nil, errBackendGone
	case err == nil:
		u.conns = append(u.conns, c)
	}
	u.mu.Unlock()
	for _, then := range waiters {
		then(c, err)
	}
}

// connect dials the backend and waits for its SETTINGS, its half of the connection
// preface. A backend whose kernel accepts connections while its process answers nothing
// (stopped, wedged) fails here, before any request went to it, so the requests waiting for
// the connection may go elsewhere.
func (u *upstreams) connect() (*h2conn, error) {
	nc, err := backendDialer().Dial("tcp", u.addr)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", u.addr, err)
	}
	c := newConn(nc, true)
	c.ub = u
	c.start(&u.wg)
	t := time.NewTimer(settingsTimeout)
	defer t.Stop()
	select {
	case <-c.ready:
		return c, nil
	case <-c.done:
		return nil, fmt.Errorf("connect to %s: the backend closed the connection before its SETTINGS", u.addr)
	case <-t.C:
		err := fmt.Errorf("connect to %s: no SETTINGS from the backend within %v", u.addr, settingsTimeout)
		u.unresponsive("no-settings")
		c.close(err)
		return nil, err
	}
}

// remove forgets a closed connection.
func (u *upstreams) remove(c *h2conn) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.conns = slices.DeleteFunc(u.conns, func(o *h2conn) bool { return o == c })
}

// closeAll closes every connection at once (the streams on them are reset) and takes no
// new requests.
func (u *upstreams) closeAll() {
	u.mu.Lock()
	u.closed = true
	conns := slices.Clone(u.conns)
	u.mu.Unlock()
	for _, c := range conns {
		c.close(errBackendGone)
	}
}

// userTimeout sets a connection's TCP_USER_TIMEOUT to backendSilence.
func userTimeout(_, _ string, rc syscall.RawConn) error {
	var err error
	if cerr := rc.Control(func(fd uintptr) {
		err = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(backendSilence.Milliseconds()))
	}); cerr != nil {
		return cerr
	}
	if err != nil {
		return fmt.Errorf("set TCP_USER_TIMEOUT: %w", err)
	}
	return nil
}
