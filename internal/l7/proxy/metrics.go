package proxy

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the proxy's, per listener (the agent names listeners after Service ports).
type metrics struct {
	requests     *prometheus.CounterVec
	duration     *prometheus.HistogramVec
	retries      *prometheus.CounterVec
	denied       *prometheus.CounterVec
	ejections    *prometheus.CounterVec
	cut          *prometheus.CounterVec
	unresponsive *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "portico_l7_requests_total",
			Help: "Requests through the L7 proxy by listener and the code the client got: gRPC status for gRPC, HTTP status otherwise, reset when the response was cut."},
			[]string{"listener", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "portico_l7_request_duration_seconds",
			Help: "Time from a request's arrival to the end of its response, retries included.", Buckets: prometheus.ExponentialBuckets(100e-6, 4, 10)},
			[]string{"listener"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "portico_l7_retries_total",
			Help: "Requests sent again to another backend, by the failure that caused it."}, []string{"listener", "failure"}),
		denied: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "portico_l7_retries_denied_total",
			Help: "Retries not made because the retry budget was spent."}, []string{"listener"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "portico_l7_ejections_total",
			Help: "Backends ejected by outlier detection."}, []string{"listener"}),
		cut: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "portico_l7_connections_cut_total",
			Help: "HTTP/2 client connections the proxy ended for the client's fault, by the GOAWAY's error code."}, []string{"listener", "code"}),
		unresponsive: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "portico_l7_backend_connections_given_up_total",
			Help: "HTTP/2 backend connections given up because the backend's process answered nothing: no SETTINGS on a new connection (no-settings), no answer to a PING (no-ping-answer)."},
			[]string{"listener", "reason"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.duration, m.retries, m.denied, m.ejections, m.cut, m.unresponsive} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register the L7 proxy's metrics: %w", err)
		}
	}
	return m, nil
}

func (m *metrics) request(listener, code string, took time.Duration) {
	m.requests.WithLabelValues(listener, code).Inc()
	m.duration.WithLabelValues(listener).Observe(took.Seconds())
}

// forget drops a removed listener's series.
func (m *metrics) forget(listener string) {
	l := prometheus.Labels{"listener": listener}
	m.requests.DeletePartialMatch(l)
	m.duration.DeletePartialMatch(l)
	m.retries.DeletePartialMatch(l)
	m.denied.DeletePartialMatch(l)
	m.ejections.DeletePartialMatch(l)
	m.cut.DeletePartialMatch(l)
	m.unresponsive.DeletePartialMatch(l)
}
