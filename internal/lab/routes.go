package lab

import (
	"context"
	"hash/fnv"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// routes keeps, in the client namespace, a route through one node to every LoadBalancer
// address, until ctx ends: the lab's stand-in for ARP/NDP announcement. Each address goes
// through the node its hash picks, so it stays put while the nodes do.
func (c *Cluster) routes(ctx context.Context) {
	routed := map[netip.Addr]bool{}
	for {
		svcs, err := c.cs.CoreV1().Services("").List(ctx, metav1.ListOptions{})
		if err == nil {
			want := map[netip.Addr]bool{}
			for _, s := range svcs.Items {
				for _, a := range LoadBalancerIPs(&s) {
					want[a] = true
					if !routed[a] && c.RouteVia(a, c.Announcer(a)) == nil {
						routed[a] = true
					}
				}
			}
			for a := range routed {
				if !want[a] {
					_ = ip(c.Client, "route", "del", netip.PrefixFrom(a, a.BitLen()).String())
					delete(routed, a)
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// Announcer is the node the client reaches LoadBalancer address a through.
func (c *Cluster) Announcer(a netip.Addr) *Node {
	h := fnv.New32a()
	h.Write(a.AsSlice())
	return c.Nodes[int(h.Sum32()%uint32(len(c.Nodes)))]
}

// LoadBalancerIPs are a LoadBalancer Service's addresses.
func LoadBalancerIPs(s *corev1.Service) []netip.Addr {
	var out []netip.Addr
	for _, in := range s.Status.LoadBalancer.Ingress {
		if a, err := netip.ParseAddr(in.IP); err == nil {
			out = append(out, a)
		}
	}
	return out
}
