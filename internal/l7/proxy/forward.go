package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// replayLimit is how much of a request body is kept so that the request can be sent again.
const replayLimit = 64 << 10

// gRPC status codes the proxy itself answers with.
const (
	grpcDeadlineExceeded  = 4
	grpcResourceExhausted = 8
	grpcUnavailable       = 14
)

var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// ServeHTTP serves HTTP/1.1 clients (HTTP/2 requests are exchanges, exchange.go). It forwards
// one request: to a backend the algorithm picks, again to another when it
// failed in a way that is safe to retry and the budget allows, and answers the client with
// the backend's response as it arrives (headers, body, trailers), or with the proxy's own
// error when no attempt got a response.
func (s *service) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	cfg := s.cfg.Load()
	s.active.Add(1)
	defer s.active.Add(-1)
	t0, code := time.Now(), "reset" // what the client got; reset unless a response ends whole
	defer func() { s.metrics.request(s.name, code, time.Since(t0)) }()
	ctx := r.Context()
	if cfg.RequestTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.RequestTimeout)
		defer cancel()
	}
	_ = http.NewResponseController(w).EnableFullDuplex()
	var body *replay
	if r.Body != nil && r.Body != http.NoBody {
		body = &replay{src: r.Body}
	}
	var tried []*backend
	var err error
	for try := 0; ; try++ {
		b := s.pool.pick(cfg.Algorithm, tried)
		if b == nil {
			code = s.fail(w, ctx, errors.New("no backend is available"))
			return
		}
		tried = append(tried, b)
		var failure Failure
		var answered bool
		if try == 0 {
			answered, code, failure, err = s.attempt(ctx, w, r, b, body.reader(), cfg, false)
		} else {
			answered, code, failure, err = s.attempt(ctx, w, r, b, body.rewind(), cfg, true)
		}
		if answered {
			return
		}
		if try+1 >= cfg.attempts() || !s.mayRetry(cfg, failure) || !body.replayable() || ctx.Err() != nil {
			code = s.fail(w, ctx, err)
			return
		}
		s.metrics.retries.WithLabelValues(s.name, string(failure)).Inc()
	}
}

// mayRetry says whether a failure is one the listener retries, within its budget.
func (s *service) mayRetry(cfg *Config, f Failure) bool {
	if f == "" || cfg.Retries == nil || !slices.Contains(cfg.Retries.RetryOn, f) {
		return false
	}
	if s.retrying.Load() >= max(3, s.active.Load()*int64(cfg.Retries.BudgetPercent)/100) {
		s.metrics.denied.WithLabelValues(s.name).Inc()
		return false
	}
	return true
}

// attempt sends the request to b. answered says whether the client got a response (the
// backend's), and code which; when not, failure says why, if it is a failure that may be
// retried.
func (s *service) attempt(ctx context.Context, w http.ResponseWriter, r *http.Request, b *backend, body io.Reader, cfg *Config, retry bool) (answered bool, code string, failure Failure, err error) {
	b.inflight.Add(1)
	defer s.pool.release(b)
	if retry {
		s.retrying.Add(1)
		defer s.retrying.Add(-1)
	}
	if cfg.Retries != nil && cfg.Retries.PerTryTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.Retries.PerTryTimeout)
		defer cancel()
	}
	// A draining backend's requests are reset when its drain time is over.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(b.drained, cancel)()

	out := &http.Request{
		Method:        r.Method,
		URL:           &url.URL{Scheme: "http", Host: b.host, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery},
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        forwardHeader(r),
		ContentLength: r.ContentLength,
		Host:          r.Host,
	}
	if body != nil {
		out.Body = io.NopCloser(body)
	}
	resp, err := b.transport.RoundTrip(out.WithContext(ctx))
	if err != nil {
		if r.Context().Err() == nil { // not the client giving up
			s.pool.report(b, false, cfg.Outlier)
		}
		return false, "", classify(err), err
	}
	defer resp.Body.Close()
	// From here on the backend's answer is the client's, whatever it says, and nothing is
	// retried.
	h := w.Header()
	for k, v := range resp.Header {
		if !hopByHop(k) {
			h[k] = v
		}
	}
	w.WriteHeader(resp.StatusCode)
	if backendFailed, err := stream(w, resp.Body); err != nil {
		if backendFailed && r.Context().Err() == nil {
			s.pool.report(b, false, cfg.Outlier)
		}
		// The response is cut short: reset the client's stream rather than end it as if whole.
		panic(http.ErrAbortHandler)
	}
	for k, v := range resp.Trailer {
		h[http.TrailerPrefix+k] = v
	}
	code = strconv.Itoa(resp.StatusCode)
	s.pool.report(b, !failed(HTTP1, code, ""), cfg.Outlier)
	return true, code, "", nil
}

// stream copies a response body to the client, flushing after each read so that streams
// stream. backendFailed tells whether an error was the backend's (not the client's).
func stream(w http.ResponseWriter, body io.Reader) (backendFailed bool, err error) {
	bp := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(bp)
	rc := http.NewResponseController(w)
	for {
		n, err := body.Read(*bp)
		if n > 0 {
			if _, werr := w.Write((*bp)[:n]); werr != nil {
				return false, werr
			}
			if ferr := rc.Flush(); ferr != nil {
				return false, ferr
			}
		}
		if err == io.EOF {
			return false, nil
		}
		if err != nil {
			return true, err
		}
	}
}

// failed says whether a response (its HTTP status, and gRPC status for gRPC) counts as a
// failure of its backend for outlier detection.
func failed(p Protocol, status, grpcStatus string) bool {
	if p == GRPC {
		return grpcStatus == strconv.Itoa(grpcUnavailable)
	}
	return status == "502" || status == "503" || status == "504"
}

// fail answers with the proxy's own error: 503, or 504 when the request timed out. It returns
// the code the client got.
func (s *service) fail(w http.ResponseWriter, ctx context.Context, cause error) string {
	code := http.StatusServiceUnavailable
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		code = http.StatusGatewayTimeout
	}
	http.Error(w, "portico proxy: "+cause.Error(), code)
	return strconv.Itoa(code)
}

// classify names an error of the transport, when it is one the proxy may retry.
func classify(err error) Failure {
	var op *net.OpError
	switch {
	case errors.As(err, &op) && op.Op == "dial", errors.Is(err, syscall.ECONNREFUSED):
		return ConnectFailure
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ECONNABORTED), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return Reset
	}
	return ""
}

// hopByHop says whether a header belongs to one connection and must not be forwarded.
func hopByHop(k string) bool {
	switch k {
	case "Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Trailer", "Transfer-Encoding", "Upgrade":
		return true
	}
	return false
}

// forwardHeader is the request's header as it goes to the backend: without hop-by-hop
// headers (but with "te: trailers", which gRPC needs), with the client's address appended to
// X-Forwarded-For.
func forwardHeader(r *http.Request) http.Header {
	h := make(http.Header, len(r.Header)+1)
	for k, v := range r.Header {
		if hopByHop(k) || k == "Te" {
			continue
		}
		h[k] = v
	}
	for _, c := range r.Header.Values("Connection") {
		for _, name := range strings.Split(c, ",") {
			h.Del(strings.TrimSpace(name))
		}
	}
	if slices.ContainsFunc(r.Header.Values("Te"), func(v string) bool { return strings.Contains(strings.ToLower(v), "trailers") }) {
		h["Te"] = []string{"trailers"}
	}
	if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		if prior := h.Values("X-Forwarded-For"); len(prior) > 0 {
			host = strings.Join(prior, ", ") + ", " + host
		}
		h["X-Forwarded-For"] = []string{host}
	}
	return h
}

// replay keeps the start of a request body so that the request can be sent again. Only one
// attempt reads at a time: a rewind while an earlier attempt is still reading (its transport
// may read on after giving up) makes the request not replayable.
type replay struct {
	mu      sync.Mutex
	src     io.Reader
	buf     []byte
	over    bool // more than replayLimit was read: the start is gone
	eof     bool
	reading bool
	gen     int
}

// reader is the body of the first attempt; nil when the request has none.
func (p *replay) reader() io.Reader {
	if p == nil {
		return nil
	}
	return &replayReader{p: p}
}

// rewind returns the body again from its start, for the next attempt; nil when there is no
// body. replayable says first whether it can.
func (p *replay) rewind() io.Reader {
	if p == nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.gen++
	return &replayReader{p: p, gen: p.gen}
}

func (p *replay) replayable() bool {
	if p == nil {
		return true
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.over && !p.reading
}

var errDetached = errors.New("request body: a later attempt replays it")

type replayReader struct {
	p   *replay
	gen int
	off int
}

func (rr *replayReader) Read(b []byte) (int, error) {
	p := rr.p
	p.mu.Lock()
	if rr.gen != p.gen {
		p.mu.Unlock()
		return 0, errDetached
	}
	if rr.off < len(p.buf) {
		n := copy(b, p.buf[rr.off:])
		rr.off += n
		p.mu.Unlock()
		return n, nil
	}
	if p.eof {
		p.mu.Unlock()
		return 0, io.EOF
	}
	p.reading = true
	p.mu.Unlock()
	n, err := p.src.Read(b)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.reading = false
	if !p.over {
		if len(p.buf)+n > replayLimit {
			p.over, p.buf = true, nil
		} else {
			p.buf = append(p.buf, b[:n]...)
		}
	}
	rr.off += n
	if err == io.EOF {
		p.eof = true
	}
	return n, err
}
