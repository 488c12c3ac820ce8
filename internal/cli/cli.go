// Package cli is porticoctl: what Portico did and why, read from the API server only (pools,
// Services, EndpointSlices, Nodes, policies and the agents' NodeAgents), and, run on a node,
// the removal of what a stopped agent left there (uninstall.go). cmd/porticoctl holds the
// flags.
package cli

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"text/tabwriter"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/announce"
	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/internal/policy"
	"github.com/portico-dev/portico/internal/poolconfig"
)

// CLI runs porticoctl's commands against a cluster.
type CLI struct {
	Client client.Client
	Out    io.Writer
}

func (c *CLI) table(header string, rows [][]string) error {
	w := tabwriter.NewWriter(c.Out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, header)
	for _, r := range rows {
		fmt.Fprintln(w, strings.Join(r, "\t"))
	}
	return w.Flush()
}

// Pools prints each pool's state and usage per family.
func (c *CLI) Pools(ctx context.Context) error {
	var pools lbv1.LBPoolList
	if err := c.Client.List(ctx, &pools); err != nil {
		return fmt.Errorf("list LBPools: %w", err)
	}
	var rows [][]string
	for _, p := range pools.Items {
		count := func(a *lbv1.AddressCounts) string {
			if a == nil {
				return "-"
			}
			return fmt.Sprintf("%d/%s", a.Allocated, a.Available)
		}
		rows = append(rows, []string{p.Name, condition(p.Status.Conditions, lbv1.ConditionReady), count(p.Status.IPv4), count(p.Status.IPv6),
			condition(p.Status.Conditions, lbv1.ConditionConflict), p.Status.Blocks})
	}
	return c.table("POOL\tREADY\tIPV4 USED/FREE\tIPV6 USED/FREE\tCONFLICT\tBLOCKS", rows)
}

// condition is "Status (Reason)", or "-" when the condition is not there.
func condition(conds []metav1.Condition, t string) string {
	c := meta.FindStatusCondition(conds, t)
	if c == nil {
		return "-"
	}
	return fmt.Sprintf("%s (%s)", c.Status, c.Reason)
}

// Nodes prints each node's agent: readiness, what it programmed, what it announces.
func (c *CLI) Nodes(ctx context.Context) error {
	var agents lbv1.NodeAgentList
	if err := c.Client.List(ctx, &agents); err != nil {
		return fmt.Errorf("list NodeAgents: %w", err)
	}
	var rows [][]string
	for _, a := range agents.Items {
		var pols, anns []string
		for _, p := range a.Status.Policies {
			pols = append(pols, fmt.Sprintf("%s %s/%s@%d", p.Kind, p.Namespace, p.Name, p.Generation))
		}
		for _, an := range a.Status.Announcements {
			anns = append(anns, an.Address)
		}
		rows = append(rows, []string{a.Name, condition(a.Status.Conditions, lbv1.ConditionReady), a.Status.Version,
			fmt.Sprint(a.Status.Services), fmt.Sprint(a.Status.Frontends), orNone(pols), orNone(anns), orNone(a.Status.LivePeers)})
	}
	return c.table("NODE\tAGENT READY\tVERSION\tSERVICES\tFRONTENDS\tPOLICIES\tANNOUNCING\tHEARS", rows)
}

// Announcements prints, for every LoadBalancer address Portico handed out, the node that
// announces it, or that none does.
func (c *CLI) Announcements(ctx context.Context) error {
	st, err := c.state(ctx)
	if err != nil {
		return err
	}
	var rows [][]string
	for _, svc := range st.services {
		for _, ip := range loadbalancer.IngressIPs(svc) {
			node, ifaces := st.announcer(ip)
			rows = append(rows, []string{ip.String(), svc.Namespace + "/" + svc.Name, st.pool(ip), cmp.Or(node, "none"), orNone(ifaces)})
		}
	}
	return c.table("ADDRESS\tSERVICE\tPOOL\tNODE\tINTERFACES", rows)
}

// state is what the commands read.
type state struct {
	pools    *poolconfig.Config
	services []*corev1.Service
	slices   map[types.NamespacedName][]*discoveryv1.EndpointSlice
	nodes    []*corev1.Node
	agents   []lbv1.NodeAgent
}

func (c *CLI) state(ctx context.Context) (*state, error) {
	var pools lbv1.LBPoolList
	var svcs corev1.ServiceList
	var eps discoveryv1.EndpointSliceList
	var nodes corev1.NodeList
	var agents lbv1.NodeAgentList
	for _, l := range []client.ObjectList{&pools, &svcs, &eps, &nodes, &agents} {
		if err := c.Client.List(ctx, l); err != nil {
			return nil, fmt.Errorf("list: %w", err)
		}
	}
	st := &state{pools: poolconfig.Parse(pools.Items), slices: map[types.NamespacedName][]*discoveryv1.EndpointSlice{}, agents: agents.Items}
	for i := range svcs.Items {
		st.services = append(st.services, &svcs.Items[i])
	}
	for i := range eps.Items {
		es := &eps.Items[i]
		name := types.NamespacedName{Namespace: es.Namespace, Name: es.Labels[discoveryv1.LabelServiceName]}
		st.slices[name] = append(st.slices[name], es)
	}
	for i := range nodes.Items {
		st.nodes = append(st.nodes, &nodes.Items[i])
	}
	return st, nil
}

// announcer is the node whose agent reports announcing ip, and on which interfaces.
func (st *state) announcer(ip netip.Addr) (string, []string) {
	for _, a := range st.agents {
		for _, an := range a.Status.Announcements {
			if an.Address == ip.String() {
				return a.Name, an.Interfaces
			}
		}
	}
	return "", nil
}

// pool names the pool an address belongs to ("-": none).
func (st *state) pool(ip netip.Addr) string {
	for _, name := range slices.Sorted(maps.Keys(st.pools.States)) {
		if s := st.pools.States[name]; s.Addresses != nil && s.Addresses.Contains(ip) {
			return name
		}
	}
	return "-"
}

// Explain tells what Portico did with one Service and why: its addresses and where they come
// from, where each is announced (or why nowhere), its endpoints, the policies that apply, and
// the Warning Events about it.
func (c *CLI) Explain(ctx context.Context, namespace, name string) error {
	st, err := c.state(ctx)
	if err != nil {
		return err
	}
	i := slices.IndexFunc(st.services, func(s *corev1.Service) bool { return s.Namespace == namespace && s.Name == name })
	if i < 0 {
		return fmt.Errorf("no Service %s/%s", namespace, name)
	}
	svc := st.services[i]
	w := c.Out
	fmt.Fprintf(w, "Service %s/%s: type %s, externalTrafficPolicy %s", namespace, name, svc.Spec.Type, cmp.Or(string(svc.Spec.ExternalTrafficPolicy), "Cluster"))
	if svc.Spec.LoadBalancerClass != nil {
		fmt.Fprintf(w, ", loadBalancerClass %s", *svc.Spec.LoadBalancerClass)
	}
	fmt.Fprintln(w)

	// Addresses.
	alloc := meta.FindStatusCondition(svc.Status.Conditions, lbv1.ServiceConditionIPAllocated)
	ips := loadbalancer.IngressIPs(svc)
	switch {
	case svc.Spec.Type != corev1.ServiceTypeLoadBalancer:
		fmt.Fprintln(w, "Addresses: none from Portico's pools (not a LoadBalancer Service); the agents serve its cluster IPs and node ports")
	case alloc == nil && len(ips) == 0:
		fmt.Fprintln(w, "Addresses: none, and Portico wrote no IPAllocated condition: the operator does not serve it (another loadBalancerClass, or class-less Services are not claimed: --claim-classless-services) or has not seen it yet")
	case alloc != nil && alloc.Status != "True":
		fmt.Fprintf(w, "Addresses: %s: IPAllocated=%s (%s): %s\n", orNone(strs(ips)), alloc.Status, alloc.Reason, alloc.Message)
	default:
		var parts []string
		for _, ip := range ips {
			parts = append(parts, fmt.Sprintf("%s from pool %s", ip, st.pool(ip)))
		}
		fmt.Fprintf(w, "Addresses: %s\n", strings.Join(parts, ", "))
	}

	// Announcement.
	if len(ips) > 0 {
		eligible := map[netip.Addr]announce.Address{}
		for _, a := range announce.Addresses(announce.Inputs{Pools: st.pools, Services: []*corev1.Service{svc}, Slices: st.slices, Nodes: st.nodes}) {
			eligible[a.IP] = a
		}
		for _, ip := range ips {
			node, ifaces := st.announcer(ip)
			a, ok := eligible[ip]
			switch {
			case node != "":
				fmt.Fprintf(w, "  %s is announced (ARP/NDP) by %s on %s; eligible: %s\n", ip, node, strings.Join(ifaces, ","), orNone(a.Eligible))
			case !ok:
				fmt.Fprintf(w, "  %s is not announced: its pool (%s) has L2 announcement off, is disabled or invalid, or the address is in no pool\n", ip, st.pool(ip))
			case len(a.Eligible) == 0:
				fmt.Fprintf(w, "  %s is not announced: no node is eligible (the pool's node selector, the exclude-from-external-load-balancers label%s)\n",
					ip, map[bool]string{true: ", and with externalTrafficPolicy Local a ready endpoint on the node", false: ""}[svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal])
			default:
				fmt.Fprintf(w, "  %s is not announced yet: eligible nodes %s, none reports it (agents down or starting?)\n", ip, strings.Join(a.Eligible, ", "))
			}
		}
	}

	// Endpoints.
	ready, terminating := map[string]int{}, 0
	for _, es := range st.slices[types.NamespacedName{Namespace: namespace, Name: name}] {
		for _, ep := range es.Endpoints {
			switch {
			case ep.Conditions.Ready == nil || *ep.Conditions.Ready:
				ready[cmp.Or(derefOr(ep.NodeName), "?")] += len(ep.Addresses)
			case ep.Conditions.Terminating != nil && *ep.Conditions.Terminating:
				terminating += len(ep.Addresses)
			}
		}
	}
	var per []string
	total := 0
	for _, n := range slices.Sorted(maps.Keys(ready)) {
		per = append(per, fmt.Sprintf("%s: %d", n, ready[n]))
		total += ready[n]
	}
	fmt.Fprintf(w, "Endpoints: %d ready (%s), %d terminating\n", total, orNone(per), terminating)
	if total == 0 && svc.Spec.Selector != nil {
		fmt.Fprintln(w, "  no ready endpoint: connections are refused (check the selector and the pods' readiness)")
	}
	if svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal {
		fmt.Fprintf(w, "  externalTrafficPolicy Local: external traffic goes only to nodes with a ready endpoint (%s), client addresses kept\n", orNone(slices.Sorted(maps.Keys(ready))))
	}

	st.topology(w, svc)

	// Policies: the operator writes which Services each one applies to.
	if err := c.policies(ctx, w, svc); err != nil {
		return err
	}

	// Warnings.
	var events corev1.EventList
	if err := c.Client.List(ctx, &events, client.InNamespace(namespace)); err != nil {
		return fmt.Errorf("list Events: %w", err)
	}
	slices.SortFunc(events.Items, func(a, b corev1.Event) int { return a.LastTimestamp.Compare(b.LastTimestamp.Time) })
	for _, e := range events.Items {
		if e.InvolvedObject.Kind == "Service" && e.InvolvedObject.Name == name && e.Type == corev1.EventTypeWarning {
			fmt.Fprintf(w, "Warning %s: %s\n", e.Reason, e.Message)
		}
	}
	return nil
}

// topology prints, for a Service whose EndpointSlices carry topology hints (or that asks for
// them), which endpoints each node sends its Cluster traffic to, decided as the agents decide
// (loadbalancer.PortEndpoints), for the first port in each family.
func (st *state) topology(w io.Writer, svc *corev1.Service) {
	es := st.slices[types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}]
	hinted := slices.ContainsFunc(es, func(s *discoveryv1.EndpointSlice) bool {
		return slices.ContainsFunc(s.Endpoints, func(e discoveryv1.Endpoint) bool { return e.Hints != nil })
	})
	asked := derefOr(svc.Spec.TrafficDistribution)
	if mode := svc.Annotations[corev1.AnnotationTopologyMode]; mode != "" {
		asked = strings.TrimSpace(asked + " topology-mode " + mode)
	}
	if (!hinted && asked == "") || len(svc.Spec.Ports) == 0 {
		return
	}
	fmt.Fprintf(w, "Topology: %s; the EndpointSlices carry %s; Cluster traffic from each node goes to:\n", cmp.Or(asked, "not asked for"),
		map[bool]string{true: "hints", false: "no hints yet (every endpoint)"}[hinted])
	port := svc.Spec.Ports[0]
	for _, n := range st.nodes {
		node := loadbalancer.NodeOf(n)
		for _, fam := range svc.Spec.IPFamilies {
			eps := loadbalancer.PortEndpoints(node, svc, es, fam == corev1.IPv4Protocol, port)
			var to []string
			for _, b := range eps.Cluster {
				to = append(to, b.Address.Addr().String())
			}
			choice := "every endpoint (no hint applies to this node)"
			if eps.Topology != loadbalancer.AnyTopology {
				choice = fmt.Sprintf("%s, %d of %d endpoints", eps.Topology, len(eps.Cluster), len(eps.All))
			}
			fmt.Fprintf(w, "  %s (zone %s) %s: %s: %s\n", node.Name, cmp.Or(node.Zone, "none"), fam, choice, orNone(to))
		}
	}
}

// policies prints the ServicePolicies and L7Policies that apply to svc, decided as the
// agents and the operator decide (internal/policy), with what their status says of their
// programming.
func (c *CLI) policies(ctx context.Context, w io.Writer, svc *corev1.Service) error {
	var sps lbv1.ServicePolicyList
	var l7s lbv1.L7PolicyList
	if err := c.Client.List(ctx, &sps, client.InNamespace(svc.Namespace)); err != nil {
		return fmt.Errorf("list ServicePolicies: %w", err)
	}
	if err := c.Client.List(ctx, &l7s, client.InNamespace(svc.Namespace)); err != nil {
		return fmt.Errorf("list L7Policies: %w", err)
	}
	target := policy.Service{Name: svc.Name, Labels: labels.Set(svc.Labels)}
	for _, p := range svc.Spec.Ports {
		target.Ports = append(target.Ports, p.Name)
	}
	var lines []string
	add := func(kind string, attach []policy.Policy, statuses map[string]lbv1.PolicyStatus, perPort bool) {
		results := policy.Resolve(attach, []policy.Service{target}, perPort)
		for _, p := range attach {
			res := results[p.Name]
			if res == nil {
				continue
			}
			for _, t := range res.Attached { // L7Policies apply per port: "web/grpc"
				line := fmt.Sprintf("%s %s (%s)", kind, p.Name, t)
				if prog := meta.FindStatusCondition(statuses[p.Name].Conditions, lbv1.ConditionProgrammed); prog != nil {
					line += ": " + prog.Message
				}
				lines = append(lines, line)
			}
		}
	}
	var attach []policy.Policy
	statuses := map[string]lbv1.PolicyStatus{}
	for i, p := range sps.Items {
		if a, err := policy.FromServicePolicy(&sps.Items[i]); err == nil { // a rejected one applies to nothing
			attach = append(attach, a)
			statuses[p.Name] = p.Status
		}
	}
	add("ServicePolicy", attach, statuses, false)
	attach, statuses = nil, map[string]lbv1.PolicyStatus{}
	for i, p := range l7s.Items {
		attach = append(attach, policy.FromL7Policy(&l7s.Items[i]))
		statuses[p.Name] = p.Status
	}
	add("L7Policy", attach, statuses, true)
	if len(lines) == 0 {
		fmt.Fprintln(w, "Policies: none")
	} else {
		fmt.Fprintln(w, "Policies:")
	}
	for _, l := range lines {
		fmt.Fprintln(w, "  "+l)
	}
	return nil
}

func strs(ips []netip.Addr) []string {
	out := make([]string, len(ips))
	for i, ip := range ips {
		out[i] = ip.String()
	}
	return out
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}

func derefOr(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
