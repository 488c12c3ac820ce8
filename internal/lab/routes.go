package lab

import (
	"context"
	"fmt"
	"hash/fnv"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
)

// routes keeps, in the client namespace, a route through one node to every LoadBalancer
// address, until ctx ends: the lab's stand-in for ARP/NDP announcement. Each address goes
// through the node its hash picks, so it stays put while the nodes do.
func (c *Cluster) routes(ctx context.Context) {
	factory := informers.NewSharedInformerFactory(c.cs, 0)
	services := factory.Core().V1().Services().Informer()
	changed := make(chan struct{}, 1)
	poke := func(any) {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	if _, err := services.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: poke, UpdateFunc: func(_, obj any) { poke(obj) }, DeleteFunc: poke,
	}); err != nil {
		c.errs <- fmt.Errorf("watch Services: %w", err)
		return
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	routed := map[netip.Addr]bool{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
		want := map[netip.Addr]bool{}
		for _, obj := range services.GetStore().List() {
			for _, a := range LoadBalancerIPs(obj.(*corev1.Service)) {
				want[a] = true
				if routed[a] {
					continue
				}
				if c.RouteVia(a, c.Announcer(a)) == nil {
					routed[a] = true
				} else {
					time.AfterFunc(time.Second, func() { poke(nil) }) // try again
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
