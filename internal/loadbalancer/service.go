// The rules for reading a Service: what a node's datapath should hold for one Service, its
// frontends (ClusterIPs, NodePorts on the node's addresses, externalIPs, load balancer
// addresses; per port, family and scope) and their backends from the Service's
// EndpointSlices, following kube-proxy's rules, topology hints included.

package loadbalancer

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// ProxyNameLabel lets a Service choose another proxy (kube-proxy's and Cilium's label).
const ProxyNameLabel = "service.kubernetes.io/service-proxy-name"

// defaultAffinity is sessionAffinity ClientIP's timeout when the Service sets none.
const defaultAffinity = 10800 * time.Second

// Node is the node the frontends are for.
type Node struct {
	Name string
	// Zone is the Node's topology.kubernetes.io/zone label: the zone topology hints name.
	Zone string
	// Addresses carry the NodePorts.
	Addresses []netip.Addr
}

// NodeOf reads a Node's name, zone and the addresses NodePorts listen on (internal and
// external ones).
func NodeOf(obj *corev1.Node) Node {
	n := Node{Name: obj.Name, Zone: obj.Labels[corev1.LabelTopologyZone]}
	for _, a := range obj.Status.Addresses {
		if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil {
			n.Addresses = append(n.Addresses, ip)
		}
	}
	return n
}

// Settings are what policies add to a Service.
type Settings struct {
	// Proxied sends a port's traffic of one family to the node's L7 proxy (an L7Policy)
	// instead of the endpoints, from every frontend of the port.
	Proxied   map[ProxyKey]netip.AddrPort
	Balancing Balancing
	// SourceRanges, when not nil, replace the Service's loadBalancerSourceRanges.
	SourceRanges []netip.Prefix
	// Affinity, when not nil, replaces the Service's session affinity (0: none).
	Affinity *time.Duration
}

// ProxyKey names a Service port (by PortName) in one family.
type ProxyKey struct {
	Port string
	IPv4 bool
}

// Serves says whether a proxy named proxyName ("" for the default proxy) handles svc.
func Serves(svc *corev1.Service, proxyName string) bool {
	if svc.Spec.Type == corev1.ServiceTypeExternalName || svc.Spec.ClusterIP == corev1.ClusterIPNone || svc.Spec.ClusterIP == "" {
		return false
	}
	return svc.Labels[ProxyNameLabel] == proxyName
}

// Frontends returns the frontends svc asks for on node, with backends from its
// EndpointSlices, sorted by address, protocol and scope. Problems lists what was left out
// and why (an address of a family the Service does not have, a protocol the datapath does
// not carry), for an Event.
func Frontends(node Node, svc *corev1.Service, endpointSlices []*discoveryv1.EndpointSlice, settings Settings) (frontends []Frontend, problems []string) {
	families := map[bool]bool{} // is4 -> the Service has that family
	var clusterIPs []netip.Addr
	for _, s := range clusterIPStrings(svc) {
		a, err := netip.ParseAddr(s)
		if err != nil {
			problems = append(problems, fmt.Sprintf("clusterIP %q is not an IP address", s))
			continue
		}
		clusterIPs = append(clusterIPs, a)
		families[a.Is4()] = true
	}
	external := ofFamilies(parse(svc.Spec.ExternalIPs, "externalIP", &problems), "externalIP", families, &problems)
	var lbIPs []netip.Addr
	if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
		lbIPs = ofFamilies(IngressIPs(svc), "load balancer address", families, &problems)
	}

	ranges := settings.SourceRanges
	if ranges == nil {
		for _, r := range svc.Spec.LoadBalancerSourceRanges {
			p, err := netip.ParsePrefix(r)
			if err != nil {
				problems = append(problems, fmt.Sprintf("loadBalancerSourceRange %q is not a CIDR", r))
				continue
			}
			ranges = append(ranges, p.Masked())
		}
	}
	affinity := time.Duration(0)
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		affinity = defaultAffinity
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			affinity = time.Duration(*c.ClientIP.TimeoutSeconds) * time.Second
		}
	}
	if settings.Affinity != nil {
		affinity = *settings.Affinity
	}
	externalLocal := svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
	internalLocal := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal

	// Frontends per port: one per ClusterIP, two per node address (NodePort), two per
	// externalIP and LoadBalancer address. Counted first: the slice is kept, one per Service.
	perPort := len(clusterIPs) + 2*len(external) + 2*len(lbIPs)
	if svc.Spec.Type != corev1.ServiceTypeClusterIP {
		perPort += 2 * len(node.Addresses)
	}
	frontends = make([]Frontend, 0, perPort*len(svc.Spec.Ports))
	for _, port := range svc.Spec.Ports {
		var proto Protocol
		switch port.Protocol {
		case corev1.ProtocolTCP, "":
			proto = TCP
		case corev1.ProtocolUDP:
			proto = UDP
		default:
			problems = append(problems, fmt.Sprintf("port %s: protocol %s is not supported", PortName(port), port.Protocol))
			continue
		}
		for _, is4 := range []bool{true, false} {
			if !families[is4] {
				continue
			}
			// A proxied port's one backend is the node's L7 listener (the proxy has the
			// endpoints).
			var eps Endpoints
			if listener, ok := settings.Proxied[ProxyKey{PortName(port), is4}]; ok {
				eps.All = []Backend{{Address: listener, Local: true}}
				eps.Cluster = eps.All
			} else {
				eps = PortEndpoints(node, svc, endpointSlices, is4, port)
			}
			// Traffic policy Local takes this node's endpoints whatever the hints say;
			// Cluster takes those the hints leave this node (all of them without hints).
			local, cluster := onlyLocal(eps.All), eps.Cluster
			add := func(a netip.Addr, p int32, scope Scope, bs []Backend, sourceRanges []netip.Prefix) {
				frontends = append(frontends, Frontend{
					Address: netip.AddrPortFrom(a, uint16(p)), Protocol: proto, Scope: scope,
					Backends: bs, Balancing: settings.Balancing, Affinity: affinity, SourceRanges: sourceRanges,
				})
			}
			externalBackends := pick(externalLocal, local, cluster)
			for _, a := range clusterIPs {
				if a.Is4() == is4 {
					add(a, port.Port, Internal, pick(internalLocal, local, cluster), nil)
				}
			}
			if port.NodePort != 0 && svc.Spec.Type != corev1.ServiceTypeClusterIP {
				for _, a := range node.Addresses {
					if a.Is4() == is4 {
						add(a, port.NodePort, External, externalBackends, nil)
						// Clients on the node reach the Cluster policy's backends whatever
						// the external policy, as kube-proxy lets them.
						add(a, port.NodePort, Internal, cluster, nil)
					}
				}
			}
			for _, a := range external {
				if a.Is4() == is4 {
					add(a, port.Port, External, externalBackends, nil)
					add(a, port.Port, Internal, cluster, nil)
				}
			}
			for _, a := range lbIPs {
				if a.Is4() == is4 {
					add(a, port.Port, External, externalBackends, familyRanges(ranges, is4))
					add(a, port.Port, Internal, cluster, nil)
				}
			}
		}
	}
	slices.SortFunc(frontends, func(a, b Frontend) int {
		return cmp.Or(a.Address.Compare(b.Address), cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Scope, b.Scope))
	})
	return frontends, problems
}

func clusterIPStrings(svc *corev1.Service) []string {
	if len(svc.Spec.ClusterIPs) > 0 {
		return svc.Spec.ClusterIPs
	}
	return []string{svc.Spec.ClusterIP}
}

// IngressIPs returns the addresses of a Service's status.loadBalancer.ingress that are the
// nodes' to take traffic for (and Portico's to hold), in order, IPv4-mapped ones unmapped.
// An ingress with ipMode Proxy is left out: that load balancer forwards the traffic itself.
// Every reader of a Service's load balancer addresses (operator, agents, announcer, CLI)
// goes through here. It does not look at the Service's type: status outlives a type change.
func IngressIPs(svc *corev1.Service) []netip.Addr {
	var out []netip.Addr
	for _, in := range svc.Status.LoadBalancer.Ingress {
		if in.IPMode != nil && *in.IPMode == corev1.LoadBalancerIPModeProxy {
			continue
		}
		if a, err := netip.ParseAddr(in.IP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// parse parses IPs, IPv4-mapped ones unmapped, leaving out (with a problem) what is not one.
func parse(in []string, what string, problems *[]string) []netip.Addr {
	var out []netip.Addr
	for _, s := range in {
		a, err := netip.ParseAddr(s)
		if err != nil {
			*problems = append(*problems, fmt.Sprintf("%s %q is not an IP address", what, s))
			continue
		}
		out = append(out, a.Unmap())
	}
	return out
}

// ofFamilies leaves out (with a problem) the addresses of a family the Service lacks: there
// are no backends of that family to send them to.
func ofFamilies(in []netip.Addr, what string, families map[bool]bool, problems *[]string) []netip.Addr {
	var out []netip.Addr
	for _, a := range in {
		if !families[a.Is4()] {
			*problems = append(*problems, fmt.Sprintf("%s %s is of a family the Service does not have", what, a))
			continue
		}
		out = append(out, a)
	}
	return out
}

// familyRanges returns the ranges of one family. When ranges are set but none is of this
// family, nobody of this family is admitted: the unspecified address stands for "no
// client", since no packet comes from it. (kube-proxy admits everyone then.)
func familyRanges(ranges []netip.Prefix, is4 bool) []netip.Prefix {
	if len(ranges) == 0 {
		return nil
	}
	var out []netip.Prefix
	for _, r := range ranges {
		if r.Addr().Is4() == is4 {
			out = append(out, r)
		}
	}
	if len(out) == 0 {
		nobody := netip.IPv6Unspecified()
		if is4 {
			nobody = netip.IPv4Unspecified()
		}
		out = append(out, netip.PrefixFrom(nobody, nobody.BitLen()))
	}
	return out
}

func pick(onlyLocal bool, local, all []Backend) []Backend {
	if onlyLocal {
		return local
	}
	return all
}

func onlyLocal(bs []Backend) []Backend {
	var out []Backend
	for _, b := range bs {
		if b.Local {
			out = append(out, b)
		}
	}
	return out
}

// PortName is how a Service port is named: its name, or its number when it has none.
func PortName(p corev1.ServicePort) string {
	if p.Name != "" {
		return p.Name
	}
	return fmt.Sprint(p.Port)
}

// Topology says which topology hints narrow a port's Cluster endpoints on a node, with
// kube-proxy's names.
type Topology string

const (
	// AnyTopology: every endpoint (no hints, or they do not apply to this node).
	AnyTopology Topology = ""
	// SameNode: the endpoints hinted for this node (trafficDistribution PreferSameNode).
	SameNode Topology = corev1.ServiceTrafficDistributionPreferSameNode
	// SameZone: the endpoints hinted for this node's zone (trafficDistribution
	// PreferSameZone or PreferClose, or the topology-mode Auto annotation).
	SameZone Topology = corev1.ServiceTrafficDistributionPreferSameZone
)

// Endpoints are a Service port's endpoints of one family as one node uses them.
type Endpoints struct {
	// All holds the ready endpoints and the serving terminating ones (marked Terminating).
	// An address in several slices counts once, ready winning.
	All []Backend
	// Cluster is what traffic under a Cluster traffic policy goes to: All, or when
	// Topology is set, the ready endpoints hinted for this node or its zone.
	Cluster  []Backend
	Topology Topology
}

// PortEndpoints returns a port's endpoints of one family on node, applying the
// EndpointSlices' hints as kube-proxy does: when every ready endpoint has a node hint and
// one names this node, the Cluster endpoints are those hinted for it; else when every ready
// endpoint has a zone hint and one names the node's zone, those hinted for the zone; else
// all of them. The EndpointSlice controller writes the hints (trafficDistribution, the
// topology-mode annotation); the Service's fields are not read here.
func PortEndpoints(node Node, svc *corev1.Service, endpointSlices []*discoveryv1.EndpointSlice, is4 bool, port corev1.ServicePort) Endpoints {
	want := discoveryv1.AddressTypeIPv6
	if is4 {
		want = discoveryv1.AddressTypeIPv4
	}
	proto := cmp.Or(port.Protocol, corev1.ProtocolTCP)
	type endpoint struct {
		Backend
		hints *discoveryv1.EndpointHints
	}
	found := map[netip.AddrPort]endpoint{}
	for _, es := range endpointSlices {
		if es.AddressType != want {
			continue
		}
		var target int32
		for _, p := range es.Ports {
			if p.Port != nil && derefOr(p.Name, "") == port.Name && derefOr(p.Protocol, corev1.ProtocolTCP) == proto {
				target = *p.Port
				break
			}
		}
		if target == 0 {
			continue
		}
		for _, ep := range es.Endpoints {
			if len(ep.Addresses) == 0 {
				continue
			}
			// Consumers use the first address; the others are the same endpoint.
			a, err := netip.ParseAddr(ep.Addresses[0])
			if err != nil || a.Is4() != is4 {
				continue
			}
			ready := isReady(svc, ep)
			serving := derefOr(ep.Conditions.Serving, ready)
			terminating := derefOr(ep.Conditions.Terminating, false)
			if !ready && !(serving && terminating) {
				continue
			}
			b := Backend{Address: netip.AddrPortFrom(a, uint16(target)), Local: derefOr(ep.NodeName, "") == node.Name, Terminating: !ready}
			if old, ok := found[b.Address]; ok && !old.Terminating {
				continue
			}
			found[b.Address] = endpoint{b, ep.Hints}
		}
	}
	eps := make([]endpoint, 0, len(found))
	for _, e := range found {
		eps = append(eps, e)
	}
	slices.SortFunc(eps, func(a, b endpoint) int { return a.Address.Compare(b.Address) })

	forNode := func(e endpoint) bool {
		return e.hints != nil && slices.ContainsFunc(e.hints.ForNodes, func(n discoveryv1.ForNode) bool { return n.Name == node.Name })
	}
	forZone := func(e endpoint) bool {
		return e.hints != nil && slices.ContainsFunc(e.hints.ForZones, func(z discoveryv1.ForZone) bool { return z.Name == node.Zone })
	}
	out := Endpoints{All: make([]Backend, 0, len(eps))}
	allNodeHints, allZoneHints, anyReady, anyForNode, anyForZone := true, true, false, false, false
	for _, e := range eps {
		out.All = append(out.All, e.Backend)
		if e.Terminating {
			continue
		}
		anyReady = true
		allNodeHints = allNodeHints && e.hints != nil && len(e.hints.ForNodes) > 0
		allZoneHints = allZoneHints && e.hints != nil && len(e.hints.ForZones) > 0
		anyForNode = anyForNode || forNode(e)
		anyForZone = anyForZone || forZone(e)
	}
	var hinted func(endpoint) bool
	switch {
	case anyReady && allNodeHints && anyForNode:
		out.Topology, hinted = SameNode, forNode
	case anyReady && allZoneHints && anyForZone && node.Zone != "":
		out.Topology, hinted = SameZone, forZone
	default:
		out.Cluster = out.All
		return out
	}
	// A hinted endpoint is ready, so the terminating ones (used only when none is) go.
	for _, e := range eps {
		if !e.Terminating && hinted(e) {
			out.Cluster = append(out.Cluster, e.Backend)
		}
	}
	return out
}

// isReady says whether an endpoint counts as ready: as it says (unset means ready), or
// always with publishNotReadyAddresses.
func isReady(svc *corev1.Service, ep discoveryv1.Endpoint) bool {
	return derefOr(ep.Conditions.Ready, true) || svc.Spec.PublishNotReadyAddresses
}

func derefOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

// Local counts a Service's ready endpoints on a node, per IP family: what its
// healthCheckNodePort reports to a probe of that family (kube-proxy runs one health server
// per family, so a dual-stack pod counts once in each).
type Local struct{ IPv4, IPv6 int }

// LocalReady counts the Service's ready endpoints on node (distinct addresses).
func LocalReady(node string, svc *corev1.Service, endpointSlices []*discoveryv1.EndpointSlice) Local {
	seen := map[string]bool{}
	var n Local
	for _, es := range endpointSlices {
		for _, ep := range es.Endpoints {
			if !isReady(svc, ep) || len(ep.Addresses) == 0 || derefOr(ep.NodeName, "") != node || seen[ep.Addresses[0]] {
				continue
			}
			seen[ep.Addresses[0]] = true
			switch es.AddressType {
			case discoveryv1.AddressTypeIPv4:
				n.IPv4++
			case discoveryv1.AddressTypeIPv6:
				n.IPv6++
			}
		}
	}
	return n
}
