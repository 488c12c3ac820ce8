package agent

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portico-dev/portico/internal/loadbalancer"
)

// metrics are the agent's Prometheus metrics.
type metrics struct {
	services, frontends, waiting prometheus.Gauge
	sync                         *prometheus.HistogramVec
	errors                       prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		services: prometheus.NewGauge(prometheus.GaugeOpts{Name: "portico_agent_services",
			Help: "Services with at least one frontend programmed in this node's datapath."}),
		frontends: prometheus.NewGauge(prometheus.GaugeOpts{Name: "portico_agent_frontends",
			Help: "Frontends (address, port, protocol, scope) programmed in this node's datapath."}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{Name: "portico_agent_services_waiting_for_room",
			Help: "Services some frontend of which does not fit in this node's datapath maps (programmed once room frees; docs/datapath.md)."}),
		sync: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "portico_agent_sync_duration_seconds",
			Help:    "Time to compute and program a change: one Service (kind=service) or everything at start (kind=full).",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 18)}, []string{"kind"}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{Name: "portico_agent_sync_errors_total",
			Help: "Syncs that failed to program the datapath (retried)."}),
	}
	for _, c := range []prometheus.Collector{m.services, m.frontends, m.waiting, m.sync, m.errors} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register metrics: %w", err)
		}
	}
	return m, nil
}

// programmed records what the syncer holds.
func (m *metrics) programmed(s *loadbalancer.Syncer) {
	svcs, fs := s.Counts()
	m.services.Set(float64(svcs))
	m.frontends.Set(float64(fs))
	m.waiting.Set(float64(s.Waiting()))
}
