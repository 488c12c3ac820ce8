package proxy

import (
	"fmt"
	"time"
)

// A backend's process may stop answering while its kernel still does (the process is
// stopped, deadlocked, paused): TCP sees nothing wrong, so the proxy asks HTTP/2. A
// connection to a backend with streams open that read nothing for backendQuiet sends a
// PING; nothing read within pingTimeout after that closes it. Once a PING was answered the
// next waits until the backend sent HEADERS or DATA, or pingSpacing passed: grpc-go and
// grpc-java servers end a connection pinged more often than that while they write nothing
// (GOAWAY ENHANCE_YOUR_CALM, "too_many_pings"). A new connection waits settingsTimeout for
// the backend's SETTINGS before it takes requests (upstreams.connect).
const (
	livenessTick    = time.Second
	backendQuiet    = 2 * time.Second
	pingTimeout     = 5 * time.Second
	pingSpacing     = 5 * time.Minute
	settingsTimeout = 2 * time.Second
)

// watch starts the liveness check of a backend connection, when it is not running, as a
// stream opens on it. Callers hold mu.
func (c *h2conn) watch() {
	if c.watching {
		return
	}
	c.watching = true
	c.heardSeen, c.quietSince = c.heard.Load(), time.Now()
	c.watchdog.Reset(livenessTick)
}

// check runs every livenessTick while a backend connection has streams open: it pings a
// connection that was quiet too long, and closes one whose PING went unanswered.
func (c *h2conn) check() {
	c.mu.Lock()
	if c.closed || len(c.streams) == 0 {
		c.watching, c.pingSent = false, time.Time{}
		c.mu.Unlock()
		return
	}
	now := time.Now()
	if heard := c.heard.Load(); heard != c.heardSeen {
		c.heardSeen, c.quietSince, c.pingSent = heard, now, time.Time{}
	}
	switch {
	case !c.pingSent.IsZero() && now.Sub(c.pingSent) >= pingTimeout:
		c.mu.Unlock()
		c.ub.unresponsive("no-ping-answer")
		c.close(fmt.Errorf("the backend answered no PING within %v", pingTimeout))
		return
	case c.pingSent.IsZero() && now.Sub(c.quietSince) >= backendQuiet && (c.spoke || now.Sub(c.lastPing) >= pingSpacing):
		_ = c.fr.WritePing(false, [8]byte{'p', 'o', 'r', 't', 'i', 'c', 'o'})
		c.pingSent, c.lastPing, c.spoke = now, now, false
		c.kick()
	}
	c.watchdog.Reset(livenessTick)
	c.mu.Unlock()
}
