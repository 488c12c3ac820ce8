package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/portico-dev/portico/internal/datapath"
)

// conntrackCollector reports the packet layer's flow tables: both counted once per scrape.
type conntrackCollector struct {
	dp                           *datapath.Datapath
	capacity                     float64
	entries, fresh, capacityDesc *prometheus.Desc
}

func newConntrackCollector(dp *datapath.Datapath, capacity uint32) *conntrackCollector {
	return &conntrackCollector{dp: dp, capacity: float64(capacity),
		entries: prometheus.NewDesc("portico_agent_conntrack_entries",
			"Entries of confirmed flows in the packet layer's conntrack table (two per flow), counted at each scrape.", nil, nil),
		fresh: prometheus.NewDesc("portico_agent_conntrack_new_entries",
			"Entries of flows not confirmed yet (no reply past the handshake), in their own table of a quarter of the conntrack size.", nil, nil),
		capacityDesc: prometheus.NewDesc("portico_agent_conntrack_capacity",
			"Size of the packet layer's conntrack table (--conntrack-size, or the pinned table's).", nil, nil)}
}

func (c *conntrackCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.entries
	ch <- c.fresh
	ch <- c.capacityDesc
}

func (c *conntrackCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(c.capacityDesc, prometheus.GaugeValue, c.capacity)
	confirmed, unconfirmed, _ := c.dp.ConntrackEntries() // what was counted before a failure
	ch <- prometheus.MustNewConstMetric(c.entries, prometheus.GaugeValue, float64(confirmed))
	ch <- prometheus.MustNewConstMetric(c.fresh, prometheus.GaugeValue, float64(unconfirmed))
}
