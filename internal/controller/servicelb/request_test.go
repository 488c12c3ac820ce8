package servicelb

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/allocator"
)

func TestParseIPs(t *testing.T) {
	for _, tc := range []struct {
		in, want, err string
	}{
		{in: "192.0.2.1", want: "192.0.2.1"},
		{in: "2001:db8::1", want: "2001:db8::1"},
		{in: " 192.0.2.1 , 2001:db8::1 ", want: "192.0.2.1,2001:db8::1"},
		{in: "192.0.2.1,192.0.2.2", err: "two IPv4 addresses"},
		{in: "2001:db8::1,2001:db8::2", err: "two IPv6 addresses"},
		{in: "192.0.2.300", err: "not an IPv4 or IPv6 address"},
		{in: "fe80::1%eth0", err: "not an IPv4 or IPv6 address"},
		{in: "::ffff:192.0.2.1", err: "not an IPv4 or IPv6 address"},
		{in: "192.0.2.1,", err: "empty entry"},
		{in: "", err: "empty entry"},
	} {
		got, err := ParseIPs(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseIPs(%q) error = %v, want %q", tc.in, err, tc.err)
			}
			continue
		}
		var s []string
		for _, ip := range got {
			s = append(s, ip.String())
		}
		if err != nil || strings.Join(s, ",") != tc.want {
			t.Errorf("ParseIPs(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

func TestSharingKeysAreNamespacedUnlessClusterWide(t *testing.T) {
	a, _ := SharingKey("ns1", "web")
	b, _ := SharingKey("ns2", "web")
	c, _ := SharingKey("ns1", "cluster/web")
	d, _ := SharingKey("ns2", "cluster/web")
	if a == b || c != d || a == c {
		t.Fatalf("keys: %q %q %q %q", a, b, c, d)
	}
	if _, err := SharingKey("ns", "not a key!"); err == nil {
		t.Fatal("want an error for a malformed key")
	}
}

func TestRequestFromService(t *testing.T) {
	local := corev1.ServiceExternalTrafficPolicyLocal
	prefer := corev1.IPFamilyPolicyPreferDualStack
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web", Labels: map[string]string{"tier": "web"}, Annotations: map[string]string{
			lbv1.AnnotationIPs: "2001:db8::5", lbv1.AnnotationPool: "edge", lbv1.AnnotationSharingKey: "k",
		}},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeLoadBalancer, LoadBalancerIP: "192.0.2.9",
			IPFamilies: []corev1.IPFamily{corev1.IPv6Protocol, corev1.IPv4Protocol}, IPFamilyPolicy: &prefer,
			Ports:                 []corev1.ServicePort{{Port: 80}, {Port: 53, Protocol: corev1.ProtocolUDP}},
			ExternalTrafficPolicy: local, Selector: map[string]string{"app": "web"},
		},
	}
	req, err := Request(svc, map[string]string{"team": "a"})
	if err != nil {
		t.Fatal(err)
	}
	want := allocator.Service{Key: "ns/web", Families: []allocator.Family{allocator.IPv6, allocator.IPv4}, PreferFamilies: true,
		RequestedIPs: []netip.Addr{netip.MustParseAddr("2001:db8::5")}, Pool: "edge"}
	if req.Key != want.Key || !slices.Equal(req.Families, want.Families) || req.PreferFamilies != want.PreferFamilies ||
		!slices.Equal(req.RequestedIPs, want.RequestedIPs) || req.Pool != want.Pool {
		t.Fatalf("request = %+v, want %+v (the annotation wins over spec.loadBalancerIP)", req, want)
	}
	if !req.Sharing.Local || req.Sharing.Backends != "app=web" || len(req.Sharing.Ports) != 2 || req.Sharing.Ports[0] != (allocator.Port{Protocol: "TCP", Port: 80}) {
		t.Fatalf("sharing = %+v", req.Sharing)
	}
	svc.Annotations[lbv1.AnnotationPool] = "Not_A_Pool"
	if _, err := Request(svc, nil); err == nil || !strings.Contains(err.Error(), lbv1.AnnotationPool) {
		t.Fatalf("want an error naming %s, got %v", lbv1.AnnotationPool, err)
	}
}

// FuzzRequest feeds arbitrary annotation values: parsing never panics, and whatever it
// accepts is well-formed (at most one address per family, no zones).
func FuzzRequest(f *testing.F) {
	for _, s := range []string{"192.0.2.1", "192.0.2.1,2001:db8::1", "", ",", "cluster/k", "a b", "::ffff:1.2.3.4", "fe80::1%lo"} {
		f.Add(s, s, s)
	}
	f.Fuzz(func(t *testing.T, ips, pool, key string) {
		svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "s", Annotations: map[string]string{
			lbv1.AnnotationIPs: ips, lbv1.AnnotationPool: pool, lbv1.AnnotationSharingKey: key,
		}}}
		req, err := Request(svc, nil)
		seen := map[bool]bool{}
		for _, ip := range req.RequestedIPs {
			if !ip.IsValid() || ip.Zone() != "" || ip.Is4In6() || seen[ip.Is4()] {
				t.Fatalf("accepted bad addresses %v from %q", req.RequestedIPs, ips)
			}
			seen[ip.Is4()] = true
		}
		if err == nil && (req.Pool != pool || req.Sharing.Key == "") {
			t.Fatalf("no error but pool %q / key %q dropped: %+v", pool, key, req)
		}
	})
}
