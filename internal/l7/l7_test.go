package l7

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/utils/ptr"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/l7/proxy"
	"github.com/portico-dev/portico/internal/loadbalancer"
)

// An L7Policy becomes the proxy's listener for each family the Service and the node have,
// on the node's address, with the port's ready endpoints; a bad duration is a problem, not a
// listener; a UDP port is refused.
func TestL7Listeners(t *testing.T) {
	svc := &corev1.Service{Spec: corev1.ServiceSpec{IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol},
		Ports: []corev1.ServicePort{{Port: 80}, {Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}}}}
	slice := &discoveryv1.EndpointSlice{AddressType: discoveryv1.AddressTypeIPv4, Ports: []discoveryv1.EndpointPort{{Name: ptr.To(""), Port: ptr.To(int32(8080))}},
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.244.1.5"}}, {Addresses: []string{"10.244.2.5"}, Conditions: discoveryv1.EndpointConditions{
			Ready: ptr.To(false), Serving: ptr.To(true), Terminating: ptr.To(true)}}}}
	node := loadbalancer.Node{Name: "n1", Addresses: []netip.Addr{netip.MustParseAddr("192.0.2.241")}} // no IPv6 address
	pol := &lbv1.L7Policy{Spec: lbv1.L7PolicySpec{Protocol: "GRPC", Algorithm: "LeastRequest", RequestTimeout: "1m30s", DrainTimeout: "10s", IdleTimeout: "1h",
		Retries: &lbv1.Retries{Attempts: 2, BudgetPercent: 20}}}
	pol.Name = "p"
	got, problems := Want(node, svc, []*discoveryv1.EndpointSlice{slice}, map[string]*lbv1.L7Policy{"": pol, "dns": pol})
	cfg, ok := got[loadbalancer.ProxyKey{Port: "80", IPv4: true}]
	switch {
	case len(got) != 1 || !ok:
		t.Fatalf("listeners %v; want one, the IPv4 one of port 80", got)
	case cfg.Listen.Addr() != node.Addresses[0] || cfg.Protocol != proxy.GRPC || cfg.Algorithm != proxy.LeastRequest:
		t.Errorf("listener %+v", cfg)
	case !slices.Equal(cfg.Backends, []netip.AddrPort{netip.MustParseAddrPort("10.244.1.5:8080")}):
		t.Errorf("backends %v; want the ready endpoint only (a terminating one drains)", cfg.Backends)
	case cfg.RequestTimeout != 90*time.Second || cfg.DrainTimeout != 10*time.Second || cfg.IdleTimeout != time.Hour || len(cfg.Retries.RetryOn) != 4:
		t.Errorf("timeouts %v %v %v, retries %+v (every safe failure by default)", cfg.RequestTimeout, cfg.DrainTimeout, cfg.IdleTimeout, cfg.Retries)
	case len(problems) != 1:
		t.Errorf("problems %v; want the UDP port's", problems)
	}
	pol.Spec.RequestTimeout = "soon"
	if got, problems := Want(node, svc, nil, map[string]*lbv1.L7Policy{"": pol}); len(got) != 0 || len(problems) != 1 {
		t.Errorf("a bad duration: listeners %v, problems %v", got, problems)
	}
}
