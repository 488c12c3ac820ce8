package servicelb

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/allocator"
)

// clusterSharingPrefix marks a sharing key that crosses namespaces.
const clusterSharingPrefix = "cluster/"

// Class says which LoadBalancer Services are Portico's.
type Class struct {
	// Name is the spec.loadBalancerClass served.
	Name string
	// ClaimClassless makes Portico serve Services without a loadBalancerClass too.
	ClaimClassless bool
}

// Serves reports whether Portico allocates for a Service.
func (c Class) Serves(svc *corev1.Service) bool {
	if svc.Spec.Type != corev1.ServiceTypeLoadBalancer {
		return false
	}
	if svc.Spec.LoadBalancerClass == nil {
		return c.ClaimClassless
	}
	return *svc.Spec.LoadBalancerClass == c.Name
}

// Request turns a Service into an allocation request. When an annotation cannot be read the
// request leaves that part out and the error says what is wrong; the caller then keeps what
// the Service holds rather than acting on a half-read wish.
func Request(svc *corev1.Service, nsLabels map[string]string) (allocator.Service, error) {
	req := allocator.Service{
		Key:             svc.Namespace + "/" + svc.Name,
		Labels:          labels.Set(svc.Labels),
		NamespaceLabels: labels.Set(nsLabels),
		PreferFamilies:  svc.Spec.IPFamilyPolicy != nil && *svc.Spec.IPFamilyPolicy == corev1.IPFamilyPolicyPreferDualStack,
	}
	for _, f := range svc.Spec.IPFamilies {
		if f == corev1.IPv6Protocol {
			req.Families = append(req.Families, allocator.IPv6)
		} else {
			req.Families = append(req.Families, allocator.IPv4)
		}
	}
	if len(req.Families) == 0 {
		req.Families = []allocator.Family{allocator.IPv4}
	}

	var errs []error
	if raw, ok := svc.Annotations[lbv1.AnnotationIPs]; ok {
		ips, err := ParseIPs(raw)
		if err != nil {
			errs = append(errs, fmt.Errorf("annotation %s: %w", lbv1.AnnotationIPs, err))
		}
		req.RequestedIPs = ips
	} else if svc.Spec.LoadBalancerIP != "" {
		ips, err := ParseIPs(svc.Spec.LoadBalancerIP)
		if err != nil {
			errs = append(errs, fmt.Errorf("spec.loadBalancerIP: %w", err))
		}
		req.RequestedIPs = ips
	}
	if name, ok := svc.Annotations[lbv1.AnnotationPool]; ok {
		if msgs := validation.IsDNS1123Subdomain(name); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("annotation %s: %q is not a pool name: %s", lbv1.AnnotationPool, name, strings.Join(msgs, "; ")))
		} else {
			req.Pool = name
		}
	}
	if key, ok := svc.Annotations[lbv1.AnnotationSharingKey]; ok {
		scoped, err := SharingKey(svc.Namespace, key)
		if err != nil {
			errs = append(errs, fmt.Errorf("annotation %s: %w", lbv1.AnnotationSharingKey, err))
		}
		req.Sharing.Key = scoped
	}
	for _, p := range svc.Spec.Ports {
		proto := string(p.Protocol)
		if proto == "" {
			proto = string(corev1.ProtocolTCP)
		}
		req.Sharing.Ports = append(req.Sharing.Ports, allocator.Port{Protocol: proto, Port: p.Port})
	}
	req.Sharing.Local = svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
	req.Sharing.Backends = labels.SelectorFromSet(svc.Spec.Selector).String()
	return req, errors.Join(errs...)
}

// ParseIPs reads "addr" or "addr,addr" with at most one address per family.
func ParseIPs(raw string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, part := range strings.Split(raw, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			return nil, fmt.Errorf("%q has an empty entry; write one address or two separated by a comma", raw)
		}
		ip, err := netip.ParseAddr(part)
		if err != nil || ip.Zone() != "" || ip.Is4In6() {
			return nil, fmt.Errorf("%q is not an IPv4 or IPv6 address", part)
		}
		for _, seen := range out {
			if seen.Is4() == ip.Is4() {
				return nil, fmt.Errorf("%q has two %s addresses; a Service gets at most one per family", raw, allocator.FamilyOf(ip))
			}
		}
		out = append(out, ip)
	}
	return out, nil
}

// SharingKey scopes a sharing key: to the namespace, or to the cluster for "cluster/<key>".
func SharingKey(namespace, key string) (string, error) {
	name, cluster := strings.CutPrefix(key, clusterSharingPrefix)
	if msgs := validation.IsQualifiedName(name); len(msgs) > 0 {
		return "", fmt.Errorf("%q is not a sharing key (a label-like name, optionally after %q): %s", key, clusterSharingPrefix, strings.Join(msgs, "; "))
	}
	if cluster {
		return clusterSharingPrefix + name, nil
	}
	return "namespace/" + namespace + "/" + name, nil
}
