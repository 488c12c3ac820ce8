package loadbalancer

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/utils/ptr"
)

var update = flag.Bool("update", false, "rewrite the .golden files from what the code computes")

// TestGolden reads each testdata/*.yaml (a Node, Services and EndpointSlices) and compares
// the frontends computed for every Service with the .golden file beside it.
func TestGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no test cases: %v", err)
	}
	for _, file := range files {
		t.Run(strings.TrimSuffix(filepath.Base(file), ".yaml"), func(t *testing.T) {
			node, services, slices := load(t, file)
			var out strings.Builder
			for _, svc := range services {
				fmt.Fprintf(&out, "# %s/%s\n", svc.Namespace, svc.Name)
				if !Serves(svc, "") {
					out.WriteString("not served\n")
					continue
				}
				fs, problems := Frontends(node, svc, slices[svc.Namespace+"/"+svc.Name], Settings{})
				out.WriteString(format(fs))
				for _, p := range problems {
					fmt.Fprintf(&out, "! %s\n", p)
				}
			}
			golden := strings.TrimSuffix(file, ".yaml") + ".golden"
			if *update {
				if err := os.WriteFile(golden, []byte(out.String()), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to write it)", err)
			}
			if got := out.String(); got != string(want) {
				t.Errorf("%s differs (run with -update to accept):\n--- got\n%s--- want\n%s", golden, got, want)
			}
		})
	}
}

// load decodes a multi-document YAML file: one Node, then Services and EndpointSlices.
func load(t *testing.T, file string) (Node, []*corev1.Service, map[string][]*discoveryv1.EndpointSlice) {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var node Node
	var services []*corev1.Service
	endpointSlices := map[string][]*discoveryv1.EndpointSlice{}
	for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(data), -1) {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode([]byte(doc), nil, nil)
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		switch o := obj.(type) {
		case *corev1.Node:
			node.Name, node.Zone = o.Name, o.Labels[corev1.LabelTopologyZone]
			for _, a := range o.Status.Addresses {
				node.Addresses = append(node.Addresses, netip.MustParseAddr(a.Address))
			}
		case *corev1.Service:
			if o.Namespace == "" {
				o.Namespace = "default"
			}
			services = append(services, o)
		case *discoveryv1.EndpointSlice:
			if o.Namespace == "" {
				o.Namespace = "default"
			}
			key := o.Namespace + "/" + o.Labels[discoveryv1.LabelServiceName]
			endpointSlices[key] = append(endpointSlices[key], o)
		default:
			t.Fatalf("%s: unexpected %T", file, obj)
		}
	}
	return node, services, endpointSlices
}

// format prints frontends one per line, backends indented below.
func format(fs []Frontend) string {
	var b strings.Builder
	for _, f := range fs {
		proto := map[Protocol]string{TCP: "TCP", UDP: "UDP"}[f.Protocol]
		scope := map[Scope]string{External: "external", Internal: "internal"}[f.Scope]
		fmt.Fprintf(&b, "%s %s %s", f.Address, proto, scope)
		if f.Balancing == Maglev {
			b.WriteString(" maglev")
		}
		if f.Affinity > 0 {
			fmt.Fprintf(&b, " affinity=%s", f.Affinity)
		}
		if len(f.SourceRanges) > 0 {
			fmt.Fprintf(&b, " ranges=%v", f.SourceRanges)
		}
		if len(f.Backends) == 0 {
			b.WriteString(" (no backends: reject)")
		}
		b.WriteString("\n")
		for _, be := range f.Backends {
			fmt.Fprintf(&b, "  %s", be.Address)
			if be.Local {
				b.WriteString(" local")
			}
			if be.Terminating {
				b.WriteString(" terminating")
			}
			b.WriteString("\n")
		}
	}
	return b.String()
}

func TestSettingsOverrideTheService(t *testing.T) {
	svc := &corev1.Service{Spec: corev1.ServiceSpec{
		Type: corev1.ServiceTypeLoadBalancer, ClusterIP: "10.96.0.1", ClusterIPs: []string{"10.96.0.1"},
		Ports:                    []corev1.ServicePort{{Port: 80, NodePort: 30080}},
		SessionAffinity:          corev1.ServiceAffinityClientIP,
		LoadBalancerSourceRanges: []string{"192.0.2.0/24"},
	}, Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{{IP: "203.0.113.1"}}}}}
	none := time.Duration(0)
	ranges := []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}
	fs, problems := Frontends(Node{Name: "n1"}, svc, nil, Settings{Balancing: Maglev, Affinity: &none, SourceRanges: ranges})
	if len(problems) > 0 {
		t.Fatal(problems)
	}
	for _, f := range fs {
		if f.Balancing != Maglev || f.Affinity != 0 {
			t.Errorf("%s: balancing %d affinity %s, want Maglev without affinity", f.Address, f.Balancing, f.Affinity)
		}
		var want []netip.Prefix // only the load balancer address, from outside
		if f.Address.Addr() == netip.MustParseAddr("203.0.113.1") && f.Scope == External {
			want = ranges
		}
		if !slices.Equal(f.SourceRanges, want) {
			t.Errorf("%s scope %d: ranges %v, want %v", f.Address, f.Scope, f.SourceRanges, want)
		}
	}
	if len(fs) != 3 {
		t.Errorf("got %d frontends, want the ClusterIP and both scopes of the load balancer address", len(fs))
	}
}

// A port with an L7Policy sends every one of its frontends of the family to the node's proxy;
// the other ports and families keep their endpoints.
func TestProxiedPortsGoToTheProxy(t *testing.T) {
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default"}, Spec: corev1.ServiceSpec{
		Type: corev1.ServiceTypeNodePort, ClusterIPs: []string{"10.96.0.1", "fd00::1"},
		Ports: []corev1.ServicePort{{Name: "grpc", Port: 50051, NodePort: 30051}, {Name: "metrics", Port: 9090, NodePort: 30090}},
	}}
	slice := &discoveryv1.EndpointSlice{AddressType: discoveryv1.AddressTypeIPv4,
		Ports:     []discoveryv1.EndpointPort{{Name: ptr.To("grpc"), Port: ptr.To(int32(50051))}, {Name: ptr.To("metrics"), Port: ptr.To(int32(9090))}},
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.244.2.7"}}}}
	listener := netip.MustParseAddrPort("192.0.2.241:14000")
	node := Node{Name: "n1", Addresses: []netip.Addr{netip.MustParseAddr("192.0.2.241")}}
	fs, _ := Frontends(node, svc, []*discoveryv1.EndpointSlice{slice}, Settings{Proxied: map[ProxyKey]netip.AddrPort{{Port: "grpc", IPv4: true}: listener}})
	proxied := 0
	for _, f := range fs {
		toProxy := len(f.Backends) == 1 && f.Backends[0].Address == listener && f.Backends[0].Local
		switch wantProxy := f.Address.Addr().Is4() && (f.Address.Port() == 50051 || f.Address.Port() == 30051); {
		case wantProxy && !toProxy:
			t.Errorf("%s scope %d: backends %v, want the proxy", f.Address, f.Scope, f.Backends)
		case !wantProxy && toProxy:
			t.Errorf("%s scope %d goes to the proxy", f.Address, f.Scope)
		case toProxy:
			proxied++
		}
	}
	if proxied != 3 { // the IPv4 cluster IP, and the node port in both scopes
		t.Errorf("%d frontends go to the proxy, want 3", proxied)
	}
}

// IngressIPs is every reader's view of a Service's load balancer addresses: an ingress with
// ipMode Proxy is the load balancer's own, a hostname is no address, a mapped IPv4 address
// is the IPv4 one.
func TestIngressIPs(t *testing.T) {
	proxy, vip := corev1.LoadBalancerIPModeProxy, corev1.LoadBalancerIPModeVIP
	for _, tc := range []struct {
		name    string
		ingress []corev1.LoadBalancerIngress
		want    []string
	}{
		{"IPv4 and IPv6, in order", []corev1.LoadBalancerIngress{{IP: "2001:db8::10"}, {IP: "192.0.2.10", IPMode: &vip}}, []string{"2001:db8::10", "192.0.2.10"}},
		{"ipMode Proxy left out", []corev1.LoadBalancerIngress{{IP: "192.0.2.10", IPMode: &proxy}, {IP: "2001:db8::10", IPMode: &proxy}, {IP: "192.0.2.11"}}, []string{"192.0.2.11"}},
		{"hostname only", []corev1.LoadBalancerIngress{{Hostname: "lb.example"}}, nil},
		{"IPv4-mapped", []corev1.LoadBalancerIngress{{IP: "::ffff:192.0.2.10"}}, []string{"192.0.2.10"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			svc := &corev1.Service{Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: tc.ingress}}}
			var got []string
			for _, a := range IngressIPs(svc) {
				got = append(got, a.String())
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("IngressIPs = %v, want %v", got, tc.want)
			}
		})
	}
}
