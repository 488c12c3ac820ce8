package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// What the proxy tells both its clients and its backends: how much each stream and each
// connection may send ahead of what the proxy passed on. The proxy gives credit back only
// once the other side's socket took what it received, so a slow reader on one side slows
// the sender on the other (whatever window the reader itself offers), and the proxy holds
// at most these windows per stream and connection.
const (
	streamWindow = 1 << 20
	connWindow   = 8 << 20
	maxFrame     = 16 << 10  // the protocol's default, so frames pass on without splitting
	maxWindow    = 1<<31 - 1 // no flow-control window may pass it (RFC 9113 6.9.1)
	maxStreams   = 1000      // per client connection
	// maxHeaderList bounds a header block's fields (RFC 9113's size: names, values and 32
	// bytes each), as Go's and nginx's defaults do; a longer one fails its stream.
	maxHeaderList = 1 << 20
	// pingDelay is how long a PING's answer may wait for other frames to share its write.
	// gRPC peers ping for every burst of data they receive (to estimate the bandwidth delay
	// product), and an answer of its own costs a system call on both sides.
	pingDelay = time.Millisecond
	// maxAnswers bounds the frames a peer may make the proxy queue in answer to its own
	// (PING and SETTINGS acknowledgements, resets of streams it may not open) while one
	// write waits for it to read: a peer that floods them and reads nothing is cut off
	// rather than having them pile up (CVE-2019-9512, -9514, -9515).
	maxAnswers = 10000
	// A client that has reset more than prematureResets streams within prematureAge of
	// opening them, while the proxy was still answering, and more than half the streams it
	// opened, is cut off: each of its requests costs a backend a request, each reset costs
	// the client nothing (CVE-2023-44487). Long streams a client ends do not count.
	prematureResets = 500
	prematureAge    = time.Second
)

// side tells which of its two streams an event of an exchange is about.
type side uint8

const (
	down side = iota // the client's stream, on a connection the proxy serves
	up               // the stream to the backend
)

// item is what a stream still has to write, in order: a header block, data, or the end.
type item struct {
	header []hpack.HeaderField // a header block (non-nil), else data
	data   []byte
	end    bool
	// credit: the data came from this stream of another connection, which gets it back as
	// window once the data is written here.
	from   *h2conn
	fromID uint32
}

// h2stream is one stream of a connection, as the connection sees it.
type h2stream struct {
	id      uint32
	x       *exchange
	window  int32  // how much data the peer lets us send
	queue   []item // waiting for window (data) or behind data
	sentEnd bool   // END_STREAM written
	gotEnd  bool   // the peer's END_STREAM read
	unacked int32  // read and passed on, not yet given back as window
}

// credit is window to give back to a stream of a connection, once its data was written on.
type credit struct {
	c  *h2conn
	id uint32
	n  int32
}

// h2conn is one HTTP/2 connection: to a client (the proxy serves it) or to a backend (the
// proxy is its client). One goroutine reads its frames and hands each to the stream's
// exchange; another writes whatever the exchanges queued since its last write in one system
// call, so that the frames of many streams share a write. Nothing is held under mu while
// calling out: an exchange may lock a connection, never the other way round.
type h2conn struct {
	nc     net.Conn
	io     *sockIO
	client bool   // the proxy is the client: a connection to a backend
	peer   string // a client's address without its port, for x-forwarded-for
	rd     *http2.Framer
	srv    *h2server  // for a client's connection: where new streams go
	ub     *upstreams // for a backend's connection: the backend's connections
	done   chan struct{}
	wdone  chan struct{} // the writer returned
	wake   chan struct{}
	pinged *time.Timer // writes a PING's answer that nothing else took along
	// A backend's connection: ready closes when the backend's SETTINGS arrive; heard counts
	// the frames read, for the watchdog (liveness.go).
	ready    chan struct{}
	heard    atomic.Uint32
	watchdog *time.Timer

	mu          sync.Mutex
	out, spare  []byte
	sent        []credit // the credits of the data in out, given once it is written
	sentSpare   []credit
	fr          *http2.Framer // writes into out
	enc         *hpack.Encoder
	hbuf        bytes.Buffer
	streams     map[uint32]*h2stream
	lastID      uint32 // the highest stream ID opened (by either side)
	sendWindow  int32
	initWindow  int32  // the peer's initial stream window
	peerFrame   uint32 // the peer's largest frame
	peerStreams uint32 // the peer's limit of concurrent streams
	recvWindow  int32  // what the peer may still send on the connection
	unacked     int32
	pingWaits   bool      // a PING's answer waits in out
	lazy        int       // out holds only PING answers while len(out) == lazy: they may wait
	answers     int       // frames queued in answer to the peer's since the writer took out
	opened      int       // a client's connection: streams the client opened
	cancelled   int       // and reset early (prematureAge), before the proxy answered in full
	idle        time.Time // a client's connection: since when no stream is open (zero: one is)
	writing     bool      // the writer writes what it took from out
	goingAway   bool      // no new streams: GOAWAY sent or received
	finishing   bool      // going away and no stream left: close once the output is written
	closed      bool
	// A backend's connection's liveness (liveness.go).
	gotSettings bool
	watching    bool      // the watchdog runs
	heardSeen   uint32    // heard when the watchdog last saw it change
	quietSince  time.Time // and when that was
	pingSent    time.Time // the watchdog's PING waits for an answer since; zero: none
	lastPing    time.Time
	spoke       bool // the backend sent HEADERS or DATA since the last PING
}

func newConn(nc net.Conn, client bool) *h2conn {
	c := &h2conn{nc: nc, client: client, done: make(chan struct{}), wdone: make(chan struct{}), wake: make(chan struct{}, 1),
		streams: map[uint32]*h2stream{}, sendWindow: 65535, initWindow: 65535, peerFrame: maxFrame, peerStreams: 1 << 31, recvWindow: 65535}
	c.io = newSockIO(nc)
	if !client {
		c.idle = time.Now()
		if host, _, err := net.SplitHostPort(nc.RemoteAddr().String()); err == nil {
			c.peer = host
		}
	}
	c.rd = http2.NewFramer(nil, bufio.NewReaderSize(c.io, 32<<10))
	c.rd.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.rd.MaxHeaderListSize = maxHeaderList
	c.rd.SetMaxReadFrameSize(maxFrame)
	c.rd.SetReuseFrames()
	c.fr = http2.NewFramer(connWriter{c}, nil)
	c.enc = hpack.NewEncoder(&c.hbuf)
	c.pinged = time.AfterFunc(time.Hour, c.kick)
	c.pinged.Stop()
	if client {
		c.ready = make(chan struct{})
		c.watchdog = time.AfterFunc(time.Hour, c.check)
		c.watchdog.Stop()
	}
	return c
}

// connWriter lets the write framer append to the connection's output; its callers hold mu.
type connWriter struct{ c *h2conn }

func (w connWriter) Write(p []byte) (int, error) {
	w.c.out = append(w.c.out, p...)
	return len(p), nil
}

// start writes the connection's preface (the client's magic string for a backend
// connection, then the settings and the connection window) and runs its reader and writer.
func (c *h2conn) start(wg *sync.WaitGroup) {
	c.mu.Lock()
	if c.client {
		c.out = append(c.out, http2.ClientPreface...)
	}
	settings := []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: streamWindow}, {ID: http2.SettingMaxFrameSize, Val: maxFrame},
		{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderList}}
	if c.client {
		settings = append(settings, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	} else {
		settings = append(settings, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: maxStreams})
	}
	_ = c.fr.WriteSettings(settings...)
	_ = c.fr.WriteWindowUpdate(0, connWindow-65535)
	c.recvWindow = connWindow
	c.mu.Unlock()
	wg.Add(2)
	go func() { defer wg.Done(); defer close(c.wdone); c.write() }()
	go func() { defer wg.Done(); c.read() }()
	c.kick()
}

func (c *h2conn) kick() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// unlockKick releases mu and wakes the writer when the output holds something to write now:
// anything but PING answers, which wait for company (pingDelay), or the connection's end.
// A frame the peer expects no answer to (its WINDOW_UPDATE, the end of its stream) thus
// costs no write of its own on either side.
func (c *h2conn) unlockKick() {
	now := len(c.out) > c.lazy || c.finishing
	c.mu.Unlock()
	if now {
		c.kick()
	}
}

// write writes what was queued, until the connection closes.
func (c *h2conn) write() {
	for {
		select {
		case <-c.wake:
		case <-c.done:
			return
		}
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return
		}
		out, sent := c.out, c.sent
		c.writing = len(out) > 0
		c.out, c.spare, c.lazy, c.answers = c.spare[:0], nil, 0, 0
		c.sent, c.sentSpare = c.sentSpare[:0], nil
		finished := len(out) == 0 && c.finishing
		if c.pingWaits {
			c.pingWaits = false
			c.pinged.Stop()
		}
		c.mu.Unlock()
		if finished {
			c.linger()
			return
		}
		if len(out) == 0 {
			continue
		}
		if _, err := c.io.Write(out); err != nil {
			c.close(fmt.Errorf("write: %w", err))
			give(sent)
			return
		}
		give(sent)
		clear(sent) // the connections they name may go
		c.mu.Lock()
		c.spare, c.sentSpare, c.writing = out, sent, false
		finishing := c.finishing
		// Closed during this write: end() left what was queued since (the GOAWAY saying
		// why, often) to this writer, which writes it now if the socket takes it at once.
		closed, last := c.closed, c.out
		if closed {
			c.out = nil
		}
		c.mu.Unlock()
		if closed {
			c.io.tryWrite(last)
			return
		}
		if finishing {
			c.kick()
		}
	}
}

// linger ends a connection that went away and has no stream left, once its writer wrote
// all: it sends FIN, and the reader reads (and drops) what the peer still sends until the
// peer closes its side too or a second passes. Closed at once with unread input, the socket
// would send a reset, and the peer could lose what the proxy wrote last (its GOAWAY).
func (c *h2conn) linger() {
	if !c.halfClose() {
		c.close(errors.New("gone away"))
	}
}

// halfClose sends FIN and gives the reader a second to read what the peer still sends; it
// says false when the connection cannot close one side.
func (c *h2conn) halfClose() bool {
	tc, ok := c.nc.(interface{ CloseWrite() error })
	if !ok || tc.CloseWrite() != nil {
		return false
	}
	_ = c.nc.SetReadDeadline(time.Now().Add(time.Second))
	return true
}

// close ends the connection at once: every stream on it is lost. What was queued last (a
// GOAWAY saying why, often) goes out if the socket takes it at once: written here, or by
// the writer once the write it is in the middle of ends.
func (c *h2conn) close(err error) { c.end(err, false) }

// fail ends the connection for a fault of the peer's: a GOAWAY with code says why (err),
// and the socket sends FIN after it and reads what the peer still sends (for up to a
// second, 256 KiB at most) before it closes, so that the peer reads the GOAWAY rather
// than a reset. A client's connection counts in portico_l7_connections_cut_total. Only the
// reader calls it.
func (c *h2conn) fail(code http2.ErrCode, err error) {
	if c.srv != nil {
		c.srv.s.metrics.cut.WithLabelValues(c.srv.s.name, code.String()).Inc()
	}
	c.goAway(code, err.Error())
	c.end(err, true)
}

func (c *h2conn) end(err error, drain bool) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	streams := c.streams
	c.streams = map[uint32]*h2stream{}
	credits := c.sent // written or not, the data in out is done with
	c.sent = nil
	var last []byte
	if !c.writing {
		last = c.out
	}
	c.mu.Unlock()
	close(c.done)
	c.pinged.Stop()
	if c.watchdog != nil {
		c.watchdog.Stop()
	}
	if len(last) > 0 {
		c.io.tryWrite(last)
	}
	if !drain {
		_ = c.nc.Close()
	}
	for _, st := range streams {
		credits = st.drop(credits)
	}
	give(credits)
	for _, st := range streams {
		st.x.lost(c, st.id, Reset, err)
	}
	if c.ub != nil {
		c.ub.remove(c)
	}
	if c.srv != nil {
		c.srv.forget(c)
	}
	if drain {
		select { // a write in progress (the GOAWAY, often) goes out before the FIN
		case <-c.wdone:
		case <-time.After(time.Second):
		}
		if c.halfClose() {
			_, _ = io.CopyN(io.Discard, c.nc, 256<<10) // a flood is cut short all the same
		}
		_ = c.nc.Close()
	}
}

// read reads frames until the connection fails or closes.
func (c *h2conn) read() {
	if !c.client {
		buf := make([]byte, len(http2.ClientPreface))
		_ = c.nc.SetReadDeadline(time.Now().Add(30 * time.Second))
		if _, err := io.ReadFull(c.nc, buf); err != nil || string(buf) != http2.ClientPreface {
			c.fail(http2.ErrCodeProtocol, errors.New("not an HTTP/2 client (prior knowledge)"))
			return
		}
		_ = c.nc.SetReadDeadline(time.Time{})
	}
	for {
		f, err := c.rd.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				if err = c.refuse(se.StreamID, se.Code, err); err == nil {
					continue
				}
			}
			var ce http2.ConnectionError
			if !errors.As(err, &ce) { // the connection failed or closed
				c.close(fmt.Errorf("read: %w", err))
				return
			}
			c.fail(http2.ErrCode(ce), fmt.Errorf("read: %w", err))
			return
		}
		if c.client {
			c.heard.Add(1)
		}
		if err := c.handle(f); err != nil {
			code := http2.ErrCodeProtocol
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				code = http2.ErrCode(ce)
			}
			c.fail(code, err)
			return
		}
	}
}

// handle is one frame read.
func (c *h2conn) handle(f http2.Frame) error {
	id := f.Header().StreamID
	switch f := f.(type) {
	case *http2.DataFrame:
		n := int32(f.Header().Length)
		c.mu.Lock()
		c.spoke = true
		c.recvWindow -= n
		if c.recvWindow < 0 {
			c.mu.Unlock()
			return errors.New("the peer sent more than its window")
		}
		if id > c.lastID {
			c.mu.Unlock()
			return fmt.Errorf("DATA on idle stream %d: %w", id, http2.ConnectionError(http2.ErrCodeProtocol))
		}
		st := c.streams[id]
		ended := st != nil && st.gotEnd // the peer ended it already
		if st != nil && f.StreamEnded() {
			st.gotEnd = true
		}
		c.mu.Unlock()
		pad := n - int32(len(f.Data()))
		if ended {
			c.credit(0, n)
			return c.refuse(id, http2.ErrCodeStreamClosed, fmt.Errorf("DATA after the end of stream %d", id))
		}
		if st == nil {
			c.credit(0, n) // a stream closed already: its data only counts for the connection
			return c.closedStream(id)
		}
		if pad > 0 {
			c.credit(0, pad)
		}
		st.x.data(c, id, f.Data(), f.StreamEnded())
		if f.StreamEnded() {
			c.settleID(id)
		}
	case *http2.MetaHeadersFrame:
		c.mu.Lock()
		c.spoke = true
		st := c.streams[id]
		if st == nil {
			if !c.client && id%2 == 0 {
				c.mu.Unlock()
				return fmt.Errorf("a client opened stream %d, an even one: %w", id, http2.ConnectionError(http2.ErrCodeProtocol))
			}
			if c.client || id <= c.lastID {
				c.mu.Unlock()
				return c.closedStream(id)
			}
			c.lastID = id
			if f.HasPriority() && f.Priority.StreamDep == id {
				c.mu.Unlock()
				return c.refuse(id, http2.ErrCodeProtocol, nil)
			}
			if c.goingAway || len(c.streams) >= maxStreams {
				c.mu.Unlock()
				return c.refuse(id, http2.ErrCodeRefusedStream, nil)
			}
			c.opened++
			x := c.srv.newExchange(c, id)
			st = &h2stream{id: id, x: x, window: c.initWindow, gotEnd: f.StreamEnded()}
			c.streams[id] = st
			c.idle = time.Time{}
			c.mu.Unlock()
			x.start(f.Fields, f.StreamEnded(), f.Truncated)
			return nil
		}
		if st.gotEnd { // the peer ended the stream already
			c.mu.Unlock()
			return c.refuse(id, http2.ErrCodeStreamClosed, fmt.Errorf("HEADERS after the end of stream %d", id))
		}
		if f.StreamEnded() {
			st.gotEnd = true
		}
		c.mu.Unlock()
		if f.Truncated { // fields are missing: what is there must not pass on
			code := http2.ErrCodeProtocol
			if c.client {
				code = http2.ErrCodeCancel
			}
			return c.refuse(id, code, fmt.Errorf("a header block longer than %d bytes", maxHeaderList))
		}
		st.x.headers(c, id, f.Fields, f.StreamEnded())
		if f.StreamEnded() {
			c.settleID(id)
		}
	case *http2.RSTStreamFrame:
		c.mu.Lock()
		if id > c.lastID {
			c.mu.Unlock()
			return fmt.Errorf("RST_STREAM on idle stream %d: %w", id, http2.ConnectionError(http2.ErrCodeProtocol))
		}
		st, credits := c.forget(id, nil)
		var err error
		if st != nil && !c.client && time.Since(st.x.t0) < prematureAge {
			c.cancelled++
			if c.cancelled > prematureResets && 2*c.cancelled > c.opened {
				err = fmt.Errorf("the client reset %d of the %d streams it opened before they were answered: %w",
					c.cancelled, c.opened, http2.ConnectionError(http2.ErrCodeEnhanceYourCalm))
			}
		}
		c.unlockKick()
		give(credits)
		if st != nil {
			st.x.reset(c, id, f.ErrCode)
		}
		return err
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		var credits []credit
		c.mu.Lock()
		err := f.ForeachSetting(func(s http2.Setting) error {
			if err := s.Valid(); err != nil {
				return err
			}
			switch s.ID {
			case http2.SettingInitialWindowSize:
				if s.Val > maxWindow {
					return fmt.Errorf("an initial window of %d: %w", s.Val, http2.ConnectionError(http2.ErrCodeFlowControl))
				}
				delta := int32(s.Val) - c.initWindow
				for _, st := range c.streams {
					if int64(st.window)+int64(delta) > maxWindow {
						return fmt.Errorf("a new initial window takes stream %d's past %d: %w", st.id, maxWindow, http2.ConnectionError(http2.ErrCodeFlowControl))
					}
				}
				c.initWindow = int32(s.Val)
				for _, st := range c.streams {
					st.window += delta
				}
			case http2.SettingMaxFrameSize:
				c.peerFrame = s.Val
			case http2.SettingMaxConcurrentStreams:
				c.peerStreams = s.Val
			case http2.SettingHeaderTableSize:
				c.enc.SetMaxDynamicTableSizeLimit(s.Val)
			}
			return nil
		})
		_ = c.fr.WriteSettingsAck()
		err = errors.Join(err, c.answer())
		if c.client && !c.gotSettings && err == nil {
			c.gotSettings = true
			close(c.ready)
		}
		credits = c.flushAll(credits)
		c.unlockKick()
		give(credits)
		return err
	case *http2.PingFrame:
		if !f.IsAck() {
			c.mu.Lock()
			only := len(c.out) == c.lazy
			_ = c.fr.WritePing(true, f.Data)
			if only {
				c.lazy = len(c.out)
			}
			err := c.answer()
			if !c.pingWaits {
				c.pingWaits = true
				c.pinged.Reset(pingDelay)
			}
			c.mu.Unlock()
			return err
		}
	case *http2.WindowUpdateFrame:
		var credits []credit
		c.mu.Lock()
		if id == 0 {
			if int64(c.sendWindow)+int64(f.Increment) > maxWindow {
				c.mu.Unlock()
				return fmt.Errorf("the connection's window past %d: %w", maxWindow, http2.ConnectionError(http2.ErrCodeFlowControl))
			}
			c.sendWindow += int32(f.Increment)
			credits = c.flushAll(credits)
		} else if id > c.lastID {
			c.mu.Unlock()
			return fmt.Errorf("WINDOW_UPDATE on idle stream %d: %w", id, http2.ConnectionError(http2.ErrCodeProtocol))
		} else if st := c.streams[id]; st != nil {
			if int64(st.window)+int64(f.Increment) > maxWindow {
				c.mu.Unlock()
				return c.refuse(id, http2.ErrCodeFlowControl, fmt.Errorf("stream %d's window past %d", id, maxWindow))
			}
			st.window += int32(f.Increment)
			credits = c.flush(st, credits)
		}
		c.unlockKick()
		give(credits)
	case *http2.GoAwayFrame:
		c.mu.Lock()
		c.goingAway = true
		var lost []*h2stream
		var credits []credit
		if c.client {
			for sid := range c.streams {
				if sid > f.LastStreamID { // the backend never saw it: safe to send elsewhere
					var st *h2stream
					st, credits = c.forget(sid, credits)
					lost = append(lost, st)
				}
			}
		}
		c.noteIdle()
		c.unlockKick()
		give(credits)
		for _, st := range lost {
			st.x.lost(c, st.id, Unavailable, errors.New("the backend is going away"))
		}
	case *http2.PriorityFrame:
		if f.StreamDep != id {
			return nil // priorities are otherwise ignored
		}
		return c.refuse(id, http2.ErrCodeProtocol, errors.New("a stream that depends on itself")) // RFC 9113 5.3.1
	case *http2.PushPromiseFrame:
		return errors.New("push promise, though push is off")
	}
	return nil
}

// closedStream answers a client's DATA or HEADERS on a stream that is closed with
// RST_STREAM STREAM_CLOSED (RFC 9113 5.1), a stream error: the frame may have crossed the
// proxy's own reset, and a reset of a closed stream is ignored, where a connection error
// would cost the client its other streams. A backend's frames on a stream the proxy closed
// (it cancelled the attempt) are dropped without a word.
func (c *h2conn) closedStream(id uint32) error {
	if c.client {
		return nil
	}
	return c.refuse(id, http2.ErrCodeStreamClosed, nil)
}

// answer counts a frame queued in answer to one of the peer's, and fails once the peer
// made the proxy queue more than maxAnswers of them since the writer last took the
// output. Callers hold mu.
func (c *h2conn) answer() error {
	c.answers++
	if c.answers > maxAnswers {
		return fmt.Errorf("the peer made the proxy queue %d answers without reading them: %w", c.answers, http2.ConnectionError(http2.ErrCodeEnhanceYourCalm))
	}
	return nil
}

// settleID settles stream id after an END_STREAM was read on it.
func (c *h2conn) settleID(id uint32) {
	c.mu.Lock()
	var credits []credit
	if st := c.streams[id]; st != nil {
		credits = c.settle(st, nil)
	}
	c.unlockKick()
	give(credits)
}

// settle forgets a stream once both sides ended it. A backend that answered in full before
// the request ended gets the rest of the request cancelled; a client answered in full before
// its request ended is told to stop sending (RST_STREAM NO_ERROR, RFC 9113 8.1). Callers
// hold mu.
func (c *h2conn) settle(st *h2stream, credits []credit) []credit {
	switch {
	case st.gotEnd && st.sentEnd:
	case c.client && st.gotEnd:
		_ = c.fr.WriteRSTStream(st.id, http2.ErrCodeCancel)
	case !c.client && st.sentEnd:
		_ = c.fr.WriteRSTStream(st.id, http2.ErrCodeNo)
	default:
		return credits
	}
	_, credits = c.forget(st.id, credits)
	return credits
}

// noteIdle marks a connection that is going away and has no stream left: its writer closes
// it once what was written to it is out. Callers hold mu, and kick the writer after.
func (c *h2conn) noteIdle() {
	if c.goingAway && len(c.streams) == 0 && !c.closed {
		c.finishing = true
	}
}

// drop empties a removed stream's queue, giving back the window of data never written.
// Callers hold the stream's connection's mu.
func (st *h2stream) drop(credits []credit) []credit {
	for _, it := range st.queue {
		if it.from != nil && len(it.data) > 0 {
			credits = append(credits, credit{it.from, it.fromID, int32(len(it.data))})
		}
	}
	st.queue = nil
	return credits
}

// give hands credits back to their connections.
func give(credits []credit) {
	for _, cr := range credits {
		cr.c.credit(cr.id, cr.n)
	}
}

// credit gives back n bytes of window: to the connection, and to stream id while it may
// still send. A window update goes out once a quarter of the window is owed.
func (c *h2conn) credit(id uint32, n int32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.unacked += n
	wrote := false
	if c.unacked >= connWindow/4 {
		_ = c.fr.WriteWindowUpdate(0, uint32(c.unacked))
		c.recvWindow += c.unacked
		c.unacked, wrote = 0, true
	}
	if st := c.streams[id]; id != 0 && st != nil && !st.gotEnd {
		st.unacked += n
		if st.unacked >= streamWindow/4 {
			_ = c.fr.WriteWindowUpdate(id, uint32(st.unacked))
			st.unacked, wrote = 0, true
		}
	}
	if wrote {
		c.kick()
	}
}

// open starts a stream to the backend with its request header, for x. It fails when the
// connection is closed or going away.
func (c *h2conn) open(x *exchange, header []hpack.HeaderField, end bool) (uint32, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.goingAway {
		return 0, errors.New("the backend connection is going away")
	}
	id := c.lastID + 2
	if c.lastID == 0 {
		id = 1
	}
	c.lastID = id
	st := &h2stream{id: id, x: x, window: c.initWindow}
	c.streams[id] = st
	c.watch()
	c.writeHeader(st, header, end)
	c.kick()
	return id, nil
}

// send queues an item on stream id and writes what its windows allow. An item for a stream
// that is gone is dropped (its window given back).
func (c *h2conn) send(id uint32, it item) {
	c.mu.Lock()
	st := c.streams[id]
	if st == nil || st.sentEnd {
		c.mu.Unlock()
		if it.from != nil && len(it.data) > 0 {
			it.from.credit(it.fromID, int32(len(it.data)))
		}
		return
	}
	st.queue = append(st.queue, it)
	credits := c.flush(st, nil)
	c.unlockKick()
	give(credits)
}

// forget removes stream id, when it is there, and returns it, with the window of what it
// never wrote added to credits. Callers hold mu.
func (c *h2conn) forget(id uint32, credits []credit) (*h2stream, []credit) {
	st := c.streams[id]
	if st == nil {
		return nil, credits
	}
	delete(c.streams, id)
	if !c.client && len(c.streams) == 0 {
		c.idle = time.Now()
	}
	c.noteIdle()
	return st, st.drop(credits)
}

// resetStream resets stream id (when it is open) and forgets it.
func (c *h2conn) resetStream(id uint32, code http2.ErrCode) { c.reset(id, code, false) }

// refuse resets stream id for a frame the peer may not send on it (a stream error): the
// reset counts as an answer (maxAnswers), and the stream's exchange, when it was open,
// loses it (why).
func (c *h2conn) refuse(id uint32, code http2.ErrCode, why error) error {
	st, err := c.reset(id, code, true)
	if st != nil {
		st.x.lost(c, id, "", why)
	}
	return err
}

// reset writes RST_STREAM for stream id and forgets the stream, returning it when it was
// open; answer counts the reset against maxAnswers.
func (c *h2conn) reset(id uint32, code http2.ErrCode, answer bool) (*h2stream, error) {
	c.mu.Lock()
	st, credits := c.forget(id, nil)
	if !c.closed && id != 0 {
		_ = c.fr.WriteRSTStream(id, code)
	}
	var err error
	if answer {
		err = c.answer()
	}
	c.unlockKick()
	give(credits)
	return st, err
}

// goAway tells the peer that no new stream will be taken, and why (debug, may be empty);
// the connection closes once its streams end.
func (c *h2conn) goAway(code http2.ErrCode, debug string) {
	c.mu.Lock()
	if !c.closed && !c.goingAway {
		c.goingAway = true
		last := c.lastID
		if c.client {
			last = 0
		}
		_ = c.fr.WriteGoAway(last, code, []byte(debug))
		c.noteIdle()
	}
	c.unlockKick()
}

// flushAll writes what every stream's window allows. Callers hold mu.
func (c *h2conn) flushAll(credits []credit) []credit {
	for _, st := range c.streams {
		if len(st.queue) > 0 {
			credits = c.flush(st, credits)
		}
	}
	return credits
}

// flush writes from the front of a stream's queue while windows allow. The credits of the
// data it writes wait in sent for the socket to take it; it returns those of the data of a
// stream it forgets. Callers hold mu.
func (c *h2conn) flush(st *h2stream, credits []credit) []credit {
	for len(st.queue) > 0 {
		it := &st.queue[0]
		if it.header != nil {
			c.writeHeader(st, it.header, it.end)
		} else {
			// No window left (a peer's smaller SETTINGS can even make it negative): wait.
			n := max(0, min(int32(len(it.data)), st.window, c.sendWindow))
			if n == 0 && len(it.data) > 0 {
				return credits
			}
			last := n == int32(len(it.data))
			_ = c.fr.WriteData(st.id, it.end && last, it.data[:n])
			st.window -= n
			c.sendWindow -= n
			if it.from != nil && n > 0 {
				c.sent = append(c.sent, credit{it.from, it.fromID, n})
			}
			if !last {
				it.data = it.data[n:]
				continue
			}
			st.sentEnd = st.sentEnd || it.end
		}
		st.queue[0] = item{}
		st.queue = st.queue[1:]
	}
	if st.sentEnd {
		credits = c.settle(st, credits)
	}
	return credits
}

// writeHeader encodes and writes a header block, split to the peer's frame size. Callers
// hold mu.
func (c *h2conn) writeHeader(st *h2stream, header []hpack.HeaderField, end bool) {
	c.hbuf.Reset()
	for _, f := range header {
		_ = c.enc.WriteField(f)
	}
	block := c.hbuf.Bytes()
	size := int(c.peerFrame)
	first := block[:min(len(block), size)]
	block = block[len(first):]
	_ = c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: st.id, BlockFragment: first, EndStream: end, EndHeaders: len(block) == 0})
	for len(block) > 0 {
		frag := block[:min(len(block), size)]
		block = block[len(frag):]
		_ = c.fr.WriteContinuation(st.id, len(block) == 0, frag)
	}
	st.sentEnd = st.sentEnd || end
}

// idleSince is since when a client's connection has had no stream open; zero while one is.
func (c *h2conn) idleSince() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.idle
}

// capacity says whether the connection takes a new stream.
func (c *h2conn) capacity() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.closed && !c.goingAway && uint32(len(c.streams)) < c.peerStreams && c.lastID < 1<<31-2
}
