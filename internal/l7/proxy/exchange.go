package proxy

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// exchange is one HTTP/2 request: the client's stream and, per attempt, a stream to a
// backend. Frames pass on as they come, both ways at once; until the response starts the
// request (its header and up to replayLimit of its body) is kept, so that an attempt that
// failed in a way that is safe to retry can be sent again to another backend.
type exchange struct {
	s    *service
	cfg  *Config
	down *h2conn // the client's connection
	id   uint32  // the client's stream
	t0   time.Time

	mu      sync.Mutex
	header  []hpack.HeaderField // the request header as it goes to backends
	body    [][]byte            // the body so far, while it may be sent again
	size    int                 // of the body so far
	length  int                 // the request's content-length; -1: none
	passed  int                 // chunks of body some attempt took (their window went back to the client then)
	keep    bool                // body holds the whole body so far
	reqEnd  bool
	trailer []hpack.HeaderField

	b        *backend // the current attempt's, nil between attempts
	up       *h2conn  // nil while connecting
	upID     uint32
	gen      int // attempts so far: a late answer to an old one is ignored
	tried    []*backend
	retrying bool // the attempt is a retry: it counts against the budget
	answered bool // the client got the response's header
	status   string
	grpc     string
	done     bool
	timer    *time.Timer // the request timeout
	tryTimer *time.Timer
	deadline time.Time // the gRPC client's (grpc-timeout); zero: none
}

// start handles the request's header: it picks a backend and sends the request there. A
// truncated header (longer than maxHeaderList) is answered 431 (gRPC RESOURCE_EXHAUSTED).
func (x *exchange) start(fields []hpack.HeaderField, end, truncated bool) {
	x.s.active.Add(1)
	x.mu.Lock()
	defer x.mu.Unlock()
	x.header = requestHeader(fields, x.down.peer)
	x.reqEnd, x.keep, x.length = end, true, -1
	if cl := field(fields, "content-length"); cl != "" {
		n, err := strconv.ParseUint(cl, 10, 31)
		if err != nil {
			x.reject()
			return
		}
		x.length = int(n)
	}
	if malformed(fields, false) || end && x.length > 0 {
		x.reject()
		return
	}
	if truncated {
		x.reply(http.StatusRequestHeaderFieldsTooLarge, grpcResourceExhausted, fmt.Errorf("the request header is longer than %d bytes", maxHeaderList))
		return
	}
	if x.cfg.RequestTimeout > 0 {
		x.timer = time.AfterFunc(x.cfg.RequestTimeout, x.timeout)
	}
	if d, ok := grpcTimeout(field(fields, "grpc-timeout")); ok && x.cfg.Protocol == GRPC {
		x.deadline = time.Now().Add(d)
	}
	x.next(errors.New("no backend is available"))
}

// next sends the request to a backend not tried yet (when there is one), or answers with
// the proxy's error when no backend is usable.
func (x *exchange) next(why error) {
	b := x.s.pool.pick(x.cfg.Algorithm, x.tried)
	if b == nil {
		x.fail(why, false)
		return
	}
	b.inflight.Add(1)
	x.b, x.up, x.tried = b, nil, append(x.tried, b)
	x.gen++
	gen := x.gen
	if r := x.cfg.Retries; r != nil && r.PerTryTimeout > 0 {
		x.tryTimer = time.AfterFunc(r.PerTryTimeout, func() { x.tryTimeout(gen) })
	}
	c, err := b.h2.get(func(c *h2conn, err error) { x.connected(gen, c, err) })
	switch {
	case err != nil:
		x.failed(ConnectFailure, err)
	case c != nil:
		x.sendTo(c)
	}
}

// connected is a backend connection coming up (or not) for attempt gen.
func (x *exchange) connected(gen int, c *h2conn, err error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	switch {
	case x.done || gen != x.gen:
	case err != nil:
		x.failed(ConnectFailure, err)
	default:
		x.sendTo(c)
	}
}

// sendTo opens the attempt's stream on c and sends what the client sent so far.
func (x *exchange) sendTo(c *h2conn) {
	id, err := c.open(x, x.header, x.reqEnd && len(x.body) == 0 && x.trailer == nil)
	if err != nil {
		x.failed(Unavailable, err)
		return
	}
	x.up, x.upID = c, id
	for i, chunk := range x.body {
		it := item{data: chunk, end: x.reqEnd && x.trailer == nil && i == len(x.body)-1}
		if i >= x.passed {
			it.from, it.fromID = x.down, x.id
		}
		c.send(id, it)
	}
	x.passed = len(x.body)
	if x.trailer != nil {
		c.send(id, item{header: x.trailer, end: true})
	}
	x.forget()
}

// forget drops the kept body once it is too long to send again.
func (x *exchange) forget() {
	if x.size > replayLimit {
		x.keep, x.body = false, nil
	}
}

// data is a DATA frame read on one of the exchange's streams.
func (x *exchange) data(c *h2conn, id uint32, data []byte, end bool) {
	buf := make([]byte, len(data))
	copy(buf, data)
	x.mu.Lock()
	defer x.mu.Unlock()
	if c == x.down {
		x.reqEnd = x.reqEnd || end
		x.size += len(buf)
		if x.length >= 0 && (x.size > x.length || end && x.size != x.length) {
			c.credit(id, int32(len(buf)))
			x.reject()
			return
		}
		if x.done {
			c.credit(id, int32(len(buf)))
			return
		}
		// Kept for a retry; with no stream open (connecting, or between attempts) it is
		// always kept, and goes out when the stream opens.
		if x.keep {
			x.body = append(x.body, buf)
		}
		if x.up != nil {
			x.passed = len(x.body)
			x.up.send(x.upID, item{data: buf, end: end, from: c, fromID: id})
			x.forget()
		}
		return
	}
	if c != x.up || id != x.upID || x.done {
		c.credit(id, int32(len(buf)))
		return
	}
	x.down.send(x.id, item{data: buf, end: end, from: c, fromID: id})
	if end {
		x.complete()
	}
}

// headers is a header block read on one of the exchange's streams: the request's trailer,
// or the response's header or trailer.
func (x *exchange) headers(c *h2conn, id uint32, fields []hpack.HeaderField, end bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if c == x.down {
		// A second header block is a trailer, which ends the stream.
		if !end || malformed(fields, true) || x.length >= 0 && x.size != x.length {
			x.reject()
			return
		}
		if x.done {
			return
		}
		x.trailer, x.reqEnd = responseHeader(fields), true
		if x.up != nil {
			x.up.send(x.upID, item{header: x.trailer, end: true})
		}
		return
	}
	if c != x.up || id != x.upID || x.done {
		return
	}
	out := responseHeader(fields)
	if !x.answered {
		st := field(fields, ":status")
		if strings.HasPrefix(st, "1") { // informational (100 Continue): the final header follows
			x.down.send(x.id, item{header: out})
			return
		}
		x.answered, x.status, x.body, x.keep = true, st, nil, false
		x.stopTry()
	}
	if g := field(fields, "grpc-status"); g != "" {
		x.grpc = g
	}
	x.down.send(x.id, item{header: out, end: end})
	if end {
		x.complete()
	}
}

// reset is a RST_STREAM read on one of the exchange's streams.
func (x *exchange) reset(c *h2conn, id uint32, code http2.ErrCode) {
	f := Reset
	if code == http2.ErrCodeRefusedStream {
		f = RefusedStream
	}
	x.lost(c, id, f, fmt.Errorf("stream reset: %v", code))
}

// lost is one of the exchange's streams gone: reset, or its connection closed.
func (x *exchange) lost(c *h2conn, id uint32, f Failure, err error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	switch {
	case x.done:
	case c == x.down: // the client gave up
		x.cancelAttempt(false)
		x.finish("reset")
	case c != x.up || id != x.upID:
	case !x.answered:
		x.failed(f, err)
	default: // cut short: the client's stream is reset rather than ended as if whole
		x.down.resetStream(x.id, http2.ErrCodeInternal)
		bad := false
		x.endAttempt(&bad)
		x.finish("reset")
	}
}

// failed ends an attempt that got no response, and tries again when the failure is one to
// retry and the budget allows.
func (x *exchange) failed(f Failure, err error) {
	bad := false
	x.endAttempt(&bad)
	if !x.deadline.IsZero() && !time.Now().Before(x.deadline) {
		// The backend gave up at the client's deadline (grpc-go resets the stream): the
		// client is owed DEADLINE_EXCEEDED, which its own timer may not have said yet.
		x.fail(fmt.Errorf("the client's deadline passed: %w", err), true)
		return
	}
	if len(x.tried) >= x.cfg.attempts() || !x.keep || !x.s.mayRetry(x.cfg, f) {
		x.fail(err, false)
		return
	}
	x.s.metrics.retries.WithLabelValues(x.s.name, string(f)).Inc()
	x.s.retrying.Add(1)
	x.retrying = true
	x.next(err)
}

// endAttempt ends the current attempt; ok, when not nil, tells outlier detection how it went.
func (x *exchange) endAttempt(ok *bool) {
	if x.b == nil {
		return
	}
	x.stopTry()
	if ok != nil {
		x.s.pool.report(x.b, *ok, x.cfg.Outlier)
	}
	x.s.pool.release(x.b)
	if x.retrying {
		x.s.retrying.Add(-1)
		x.retrying = false
	}
	x.b, x.up = nil, nil
}

func (x *exchange) stopTry() {
	if x.tryTimer != nil {
		x.tryTimer.Stop()
		x.tryTimer = nil
	}
}

// complete is the response read to its end.
func (x *exchange) complete() {
	ok := !failed(x.cfg.Protocol, x.status, x.grpc)
	x.endAttempt(&ok)
	if x.cfg.Protocol == GRPC {
		x.finish(cmp.Or(x.grpc, "unknown"))
	} else {
		x.finish(x.status)
	}
}

// finish counts the request, once.
func (x *exchange) finish(code string) {
	x.done = true
	if x.timer != nil {
		x.timer.Stop()
	}
	x.s.metrics.request(x.s.name, code, time.Since(x.t0))
	x.s.active.Add(-1)
}

// timeout is the request timeout: an attempt in flight is cancelled and the client gets
// DEADLINE_EXCEEDED (504), or its stream is reset when the response had started. A backend
// that had not answered by then counts a failure for outlier detection.
func (x *exchange) timeout() {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.done {
		return
	}
	x.cancelAttempt(true)
	x.fail(errors.New("request timeout"), true)
}

// tryTimeout is the per-try timeout of attempt gen: the backend may have acted on the
// request, so it is not sent again; its silence counts a failure for outlier detection.
func (x *exchange) tryTimeout(gen int) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.done || gen != x.gen || x.answered {
		return
	}
	x.cancelAttempt(true)
	x.fail(errors.New("attempt timeout"), true)
}

// cancelAttempt resets the attempt in flight. When it is the backend's fault (a timeout),
// a backend that had not answered yet counts a failure.
func (x *exchange) cancelAttempt(backendsFault bool) {
	if x.up != nil {
		x.up.resetStream(x.upID, http2.ErrCodeCancel)
	}
	if !backendsFault {
		x.endAttempt(nil)
		return
	}
	ok := x.answered
	x.endAttempt(&ok)
}

// fail answers with the proxy's own error: for gRPC a trailers-only response with
// UNAVAILABLE (or DEADLINE_EXCEEDED), as grpc-go clients expect; otherwise 503 (or 504).
// A client whose response had started gets its stream reset.
func (x *exchange) fail(cause error, timeout bool) {
	if x.answered {
		x.down.resetStream(x.id, http2.ErrCodeCancel)
		x.finish("reset")
		return
	}
	if timeout {
		x.reply(http.StatusGatewayTimeout, grpcDeadlineExceeded, cause)
	} else {
		x.reply(http.StatusServiceUnavailable, grpcUnavailable, cause)
	}
}

// reply answers the client with the proxy's own error: for gRPC a trailers-only response
// with grpcCode, as grpc-go clients expect; otherwise status, with the cause as its body.
func (x *exchange) reply(status, grpcCode int, cause error) {
	msg := "portico proxy: " + cause.Error()
	if x.cfg.Protocol == GRPC {
		x.down.send(x.id, item{end: true, header: []hpack.HeaderField{
			{Name: ":status", Value: "200"}, {Name: "content-type", Value: "application/grpc"},
			{Name: "grpc-status", Value: strconv.Itoa(grpcCode)}, {Name: "grpc-message", Value: grpcMessage(msg)}}})
		x.finish(strconv.Itoa(grpcCode))
		return
	}
	body := []byte(msg + "\n")
	x.down.send(x.id, item{header: []hpack.HeaderField{{Name: ":status", Value: strconv.Itoa(status)},
		{Name: "content-type", Value: "text/plain; charset=utf-8"}, {Name: "content-length", Value: strconv.Itoa(len(body))}}})
	x.down.send(x.id, item{data: body, end: true})
	x.finish(strconv.Itoa(status))
}

// connectionHeader says whether a field belongs to one connection (RFC 9113 8.2.2).
func connectionHeader(name string) bool {
	switch name {
	case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade":
		return true
	}
	return false
}

// reject ends a malformed request: the client's stream is reset (PROTOCOL_ERROR), and the
// attempt in flight, if any, cancelled (the response may have ended already).
func (x *exchange) reject() {
	x.down.resetStream(x.id, http2.ErrCodeProtocol)
	if !x.done {
		x.cancelAttempt(false)
		x.finish("reset")
	}
}

// malformed says whether a request's header, or its trailer, is malformed (RFC 9113 8.1.1,
// 8.2.2, 8.3.1): a pseudo-field in a trailer, a connection-specific field, "te" other than
// "trailers", a header without :method, :scheme or :path. A malformed request reaches no
// backend (nor does one whose body disagrees with its content-length, beyond what passed
// before that showed); its stream is reset (PROTOCOL_ERROR), as Go's HTTP/2 server and
// Envoy do.
func malformed(fields []hpack.HeaderField, trailer bool) bool {
	for _, f := range fields {
		if trailer && strings.HasPrefix(f.Name, ":") || connectionHeader(f.Name) || f.Name == "te" && f.Value != "trailers" {
			return true
		}
	}
	return !trailer && (field(fields, ":method") == "" || field(fields, ":scheme") == "" || field(fields, ":path") == "")
}

// requestHeader is a request's header as it goes to a backend, the client's address
// appended to x-forwarded-for.
func requestHeader(fields []hpack.HeaderField, client string) []hpack.HeaderField {
	out := make([]hpack.HeaderField, 0, len(fields)+1)
	var xff []string
	for _, f := range fields {
		if f.Name == "x-forwarded-for" {
			xff = append(xff, f.Value)
		} else {
			out = append(out, hpack.HeaderField{Name: f.Name, Value: f.Value, Sensitive: f.Sensitive})
		}
	}
	if client != "" {
		out = append(out, hpack.HeaderField{Name: "x-forwarded-for", Value: strings.Join(append(xff, client), ", ")})
	}
	return out
}

// responseHeader is a response's header or trailer (or a request's trailer) as it passes
// on: without connection-specific fields.
func responseHeader(fields []hpack.HeaderField) []hpack.HeaderField {
	out := make([]hpack.HeaderField, 0, len(fields))
	for _, f := range fields {
		if !connectionHeader(f.Name) {
			out = append(out, hpack.HeaderField{Name: f.Name, Value: f.Value, Sensitive: f.Sensitive})
		}
	}
	return out
}

// field is the value of a header field, "" when it is missing.
// grpcTimeout reads a grpc-timeout value: at most 8 digits and a unit (gRPC over HTTP/2).
func grpcTimeout(v string) (time.Duration, bool) {
	units := map[byte]time.Duration{'H': time.Hour, 'M': time.Minute, 'S': time.Second, 'm': time.Millisecond, 'u': time.Microsecond, 'n': time.Nanosecond}
	if len(v) < 2 || len(v) > 9 {
		return 0, false
	}
	unit, ok := units[v[len(v)-1]]
	n, err := strconv.ParseUint(v[:len(v)-1], 10, 64)
	if !ok || err != nil || n > uint64(math.MaxInt64/unit) {
		return 0, false // not one, or beyond what a Duration holds: no deadline to keep
	}
	return time.Duration(n) * unit, true
}

func field(fields []hpack.HeaderField, name string) string {
	for _, f := range fields {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}

// grpcMessage percent-encodes what gRPC's message header may not carry as is.
func grpcMessage(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '%' {
			b.WriteString("%" + strings.ToUpper(strconv.FormatInt(int64(c)|0x100, 16)[1:]))
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}
