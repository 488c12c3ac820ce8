package l2

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics count, per interface and protocol ("arp", "ndp"), the requests heard, the replies
// sent and the gratuitous announcements sent.
type Metrics struct {
	requests, replies, gratuitous *prometheus.CounterVec
}

// NewMetrics registers the L2 counters with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	vec := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "portico", Subsystem: "l2", Name: name, Help: help},
			[]string{"interface", "protocol"})
	}
	m := &Metrics{
		requests:   vec("requests_total", "ARP requests and neighbour solicitations received."),
		replies:    vec("replies_total", "ARP replies and solicited neighbour advertisements sent for announced addresses."),
		gratuitous: vec("gratuitous_total", "Gratuitous ARP packets and unsolicited neighbour advertisements sent on taking an address over."),
	}
	for _, c := range []prometheus.Collector{m.requests, m.replies, m.gratuitous} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register L2 metrics: %w", err)
		}
	}
	return m, nil
}

// Announcer keeps one responder per interface that has addresses to announce.
type Announcer struct {
	metrics    *Metrics
	mu         sync.Mutex
	responders map[string]*responder
}

// NewAnnouncer returns an announcer that announces nothing yet.
func NewAnnouncer(m *Metrics) *Announcer {
	return &Announcer{metrics: m, responders: map[string]*responder{}}
}

// Set makes the node answer for exactly these addresses, by interface name: interfaces no
// longer listed stop answering at once; addresses new on an interface are announced.
func (a *Announcer) Set(want map[string][]netip.Addr) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var errs []error
	for name, r := range a.responders {
		if len(want[name]) == 0 {
			r.close()
			delete(a.responders, name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(want)) {
		ips := want[name]
		if len(ips) == 0 {
			continue
		}
		r := a.responders[name]
		if r == nil {
			ifi, err := net.InterfaceByName(name)
			if err != nil {
				errs = append(errs, fmt.Errorf("interface %s: %w", name, err))
				continue
			}
			if r, err = listen(ifi, a.metrics); err != nil {
				errs = append(errs, err)
				continue
			}
			a.responders[name] = r
		}
		errs = append(errs, r.set(ips))
	}
	return errors.Join(errs...)
}

// Close stops answering on every interface.
func (a *Announcer) Close() {
	_ = a.Set(nil)
}
