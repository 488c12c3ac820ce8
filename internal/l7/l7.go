// Package l7 turns L7Policies into the node's L7 proxy listeners (docs/l7.md): which Service
// ports and families get one, with what settings and backends (Want, ProxyConfig), the port
// each listener keeps (Listeners), and which policies are in force (Programmed). The proxy
// itself is package proxy.
package l7

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/l7/proxy"
	"github.com/portico-dev/portico/internal/loadbalancer"
)

// Options configure the node's L7 proxy (docs/l7.md).
type Options struct {
	// FirstPort and LastPort bound the ports its listeners take on the node's addresses.
	FirstPort, LastPort uint16
}

// Listeners runs the node's L7 proxy: a listener per Service port and family with an
// L7Policy, on the node's address of the family, at a port of the agent's range that the
// listener keeps while it exists. It is safe for concurrent use.
type Listeners struct {
	proxy *proxy.Proxy
	opts  Options

	mu        sync.Mutex
	listeners map[string]proxy.Config // by listener name: namespace/service/port/family
	ports     map[string]uint16       // the port each listener name holds
}

// NewListeners returns the listeners of p, with ports from o's range.
func NewListeners(p *proxy.Proxy, o Options) *Listeners {
	return &Listeners{proxy: p, opts: o, listeners: map[string]proxy.Config{}, ports: map[string]uint16{}}
}

// Set makes the listeners of one Service these (by port and family; none: the Service has
// no L7Policy here), and returns where each that listens is. What cannot listen is a
// problem: that port keeps its connection balancing.
func (l *Listeners) Set(svc types.NamespacedName, want map[loadbalancer.ProxyKey]proxy.Config) (map[loadbalancer.ProxyKey]netip.AddrPort, []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	prefix := svc.String() + "/"
	for name := range l.listeners {
		if strings.HasPrefix(name, prefix) {
			delete(l.listeners, name)
		}
	}
	names := map[loadbalancer.ProxyKey]string{}
	var problems []string
	for k, cfg := range want {
		name := prefix + k.Port + "/" + map[bool]string{true: "ipv4", false: "ipv6"}[k.IPv4]
		port, ok := l.port(name)
		if !ok {
			problems = append(problems, fmt.Sprintf("port %s: no free port left for the L7 proxy in %d-%d", k.Port, l.opts.FirstPort, l.opts.LastPort))
			continue
		}
		cfg.Listen = netip.AddrPortFrom(cfg.Listen.Addr(), port)
		l.listeners[name] = cfg
		names[k] = name
	}
	for name := range l.ports {
		if _, ok := l.listeners[name]; !ok {
			delete(l.ports, name)
		}
	}
	if err := l.proxy.Set(l.listeners); err != nil {
		problems = append(problems, "L7 proxy: "+err.Error())
	}
	out := map[loadbalancer.ProxyKey]netip.AddrPort{}
	for k, name := range names {
		if a, ok := l.proxy.Addr(name); ok {
			out[k] = a
		} else {
			delete(l.listeners, name) // it did not open: try again at the next sync
		}
	}
	return out, problems
}

// port returns the port a listener holds, or a free one of the range.
func (l *Listeners) port(name string) (uint16, bool) {
	if p, ok := l.ports[name]; ok {
		return p, true
	}
	used := map[uint16]bool{}
	for _, p := range l.ports {
		used[p] = true
	}
	for p := l.opts.FirstPort; p >= l.opts.FirstPort && p <= l.opts.LastPort; p++ {
		if !used[p] {
			l.ports[name] = p
			return p, true
		}
	}
	return 0, false
}

// Want turns the L7Policy that won each port of svc (by port name, "" for an unnamed
// one, as the operator resolves them) into the proxy's
// listeners on this node: one per family the Service has and the node has an address of, with
// the port's ready endpoints as backends (terminating ones drain).
func Want(node loadbalancer.Node, svc *corev1.Service, endpointSlices []*discoveryv1.EndpointSlice, won map[string]*lbv1.L7Policy) (map[loadbalancer.ProxyKey]proxy.Config, []string) {
	out := map[loadbalancer.ProxyKey]proxy.Config{}
	var problems []string
	for _, port := range svc.Spec.Ports {
		p := won[port.Name]
		if p == nil {
			continue
		}
		if port.Protocol != "" && port.Protocol != corev1.ProtocolTCP {
			problems = append(problems, fmt.Sprintf("L7Policy %s: port %s is %s; the L7 proxy takes TCP only", p.Name, loadbalancer.PortName(port), port.Protocol))
			continue
		}
		cfg, err := ProxyConfig(&p.Spec)
		if err != nil {
			problems = append(problems, fmt.Sprintf("L7Policy %s: %v", p.Name, err))
			continue
		}
		for _, fam := range svc.Spec.IPFamilies {
			is4 := fam == corev1.IPv4Protocol
			i := slices.IndexFunc(node.Addresses, func(a netip.Addr) bool { return a.Is4() == is4 })
			if i < 0 {
				continue
			}
			c := cfg
			c.Listen = netip.AddrPortFrom(node.Addresses[i], 0)
			c.Backends = nil
			for _, b := range loadbalancer.PortEndpoints(node, svc, endpointSlices, is4, port).Cluster {
				if !b.Terminating {
					c.Backends = append(c.Backends, b.Address)
				}
			}
			out[loadbalancer.ProxyKey{Port: loadbalancer.PortName(port), IPv4: is4}] = c
		}
	}
	return out, problems
}

// ProxyConfig is the proxy's side of an L7Policy. The API server fills in the CRD's defaults;
// retryOn has none there (empty means every safe failure).
func ProxyConfig(s *lbv1.L7PolicySpec) (proxy.Config, error) {
	c := proxy.Config{Protocol: proxy.Protocol(s.Protocol), Algorithm: proxy.Algorithm(cmp.Or(s.Algorithm, string(proxy.RoundRobin)))}
	var err error
	d := func(v lbv1.Duration, def time.Duration) time.Duration {
		if v == "" || err != nil {
			return def
		}
		var got time.Duration
		if got, err = time.ParseDuration(string(v)); err != nil {
			err = fmt.Errorf("duration %q: %w", v, err)
		}
		return got
	}
	c.RequestTimeout = d(s.RequestTimeout, 0)
	c.DrainTimeout = d(s.DrainTimeout, 30*time.Second)
	c.IdleTimeout = d(s.IdleTimeout, 0)
	if r := s.Retries; r != nil {
		c.Retries = &proxy.Retries{Attempts: int(r.Attempts), PerTryTimeout: d(r.PerTryTimeout, 0), BudgetPercent: int(r.BudgetPercent)}
		for _, f := range r.RetryOn {
			c.Retries.RetryOn = append(c.Retries.RetryOn, proxy.Failure(f))
		}
		if len(r.RetryOn) == 0 {
			c.Retries.RetryOn = []proxy.Failure{proxy.ConnectFailure, proxy.Reset, proxy.RefusedStream, proxy.Unavailable}
		}
	}
	if o := s.OutlierDetection; o != nil {
		c.Outlier = &proxy.Outlier{ConsecutiveFailures: int(o.ConsecutiveFailures), BaseEjection: d(o.BaseEjectionTime, 30*time.Second),
			MaxEjectionPercent: int(o.MaxEjectionPercent)}
	}
	return c, err
}

// Programmed lists the L7Policies programmed for svc: those with a listener for each of
// their ports, every one open.
func Programmed(svc *corev1.Service, won map[string]*lbv1.L7Policy, want map[loadbalancer.ProxyKey]proxy.Config, open map[loadbalancer.ProxyKey]netip.AddrPort) []lbv1.ProgrammedPolicy {
	ok := map[*lbv1.L7Policy]bool{}
	for _, port := range svc.Spec.Ports {
		p := won[port.Name]
		if p == nil {
			continue
		}
		if _, seen := ok[p]; !seen {
			ok[p] = true
		}
		wanted := 0
		for k := range want {
			if k.Port == loadbalancer.PortName(port) {
				wanted++
				if _, opened := open[k]; !opened {
					ok[p] = false
				}
			}
		}
		if wanted == 0 {
			ok[p] = false // refused (not TCP, a bad duration) or no node address: not in force
		}
	}
	var out []lbv1.ProgrammedPolicy
	for p, in := range ok {
		if in {
			out = append(out, lbv1.ProgrammedPolicy{Kind: "L7Policy", Namespace: p.Namespace, Name: p.Name, Generation: p.Generation})
		}
	}
	return out
}
