package e2e

import (
	"fmt"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"

	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/wait"
)

// topology: the EndpointSlice controller hints endpoints for trafficDistribution, and every
// agent keeps Cluster traffic where the hints say, through the socket layer (the probe pod on
// node-1) and the packet layer (a NodePort, the load balancer address), falling back to the
// next ring when the near endpoints go. node-1 and node-2 are in zone-a, node-3 in zone-b.
func (c *cluster) topology(t *testing.T) {
	svc := c.service(t, "near", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		s.Spec.TrafficDistribution = ptr.To(corev1.ServiceTrafficDistributionPreferSameZone)
	})
	c.endpoints(t, "near", c.web...)
	lbIPs := c.ingress(t, svc, 2) // the client reaches the load balancer address through node-3
	nodePort := uint16(svc.Spec.Ports[0].NodePort)
	zoneA, zoneB := c.web[:2], c.web[2:]
	for f, fam := range families {
		t.Run(fam+"/PreferSameZone", func(t *testing.T) {
			onlyFrom(t, f, "ClusterIP from node-1", c.fromProbe(t, clusterAddr(svc, f, 80)), zoneA...)
			onlyFrom(t, f, "NodePort of node-2", c.fromClient(netip.AddrPortFrom(c.net.Nodes[1].IPs[f], nodePort)), zoneA...)
			onlyFrom(t, f, "NodePort of node-3", c.fromClient(netip.AddrPortFrom(c.net.Nodes[2].IPs[f], nodePort)), zoneB...)
			onlyFrom(t, f, "load balancer address through node-3", c.fromClient(netip.AddrPortFrom(lbIPs[f], 80)), zoneB...)
		})
	}
	// zone-b loses its endpoint: node-3 sends everything to zone-a, and zone-a stays home.
	c.endpoints(t, "near", zoneA...)
	for f, fam := range families {
		t.Run(fam+"/PreferSameZone, none left in zone-b", func(t *testing.T) {
			onlyFrom(t, f, "load balancer address through node-3", c.fromClient(netip.AddrPortFrom(lbIPs[f], 80)), zoneA...)
			onlyFrom(t, f, "ClusterIP from node-1", c.fromProbe(t, clusterAddr(svc, f, 80)), zoneA...)
		})
	}

	c.endpoints(t, "near", c.web...)
	c.update(t, svc, func(s *corev1.Service) {
		s.Spec.TrafficDistribution = ptr.To(corev1.ServiceTrafficDistributionPreferSameNode)
	})
	for f, fam := range families {
		t.Run(fam+"/PreferSameNode", func(t *testing.T) {
			onlyFrom(t, f, "ClusterIP from node-1", c.fromProbe(t, clusterAddr(svc, f, 80)), c.web[0])
			for i := range c.net.Nodes {
				to := netip.AddrPortFrom(c.net.Nodes[i].IPs[f], nodePort)
				onlyFrom(t, f, "NodePort of "+c.net.Nodes[i].Name, c.fromClient(to), c.web[i])
			}
		})
	}
	// node-1 loses its endpoint: its traffic stays in zone-a (node-2), then, with zone-a
	// empty, goes to zone-b.
	c.endpoints(t, "near", c.web[1], c.web[2])
	for f, fam := range families {
		t.Run(fam+"/PreferSameNode, none left on node-1", func(t *testing.T) {
			onlyFrom(t, f, "ClusterIP from node-1", c.fromProbe(t, clusterAddr(svc, f, 80)), c.web[1])
			onlyFrom(t, f, "NodePort of node-1", c.fromClient(netip.AddrPortFrom(c.net.Nodes[0].IPs[f], nodePort)), c.web[1])
		})
	}
	c.endpoints(t, "near", c.web[2])
	for f, fam := range families {
		t.Run(fam+"/PreferSameNode, none left in zone-a", func(t *testing.T) {
			onlyFrom(t, f, "ClusterIP from node-1", c.fromProbe(t, clusterAddr(svc, f, 80)), c.web[2])
		})
	}
}

// onlyFrom waits until 20 answers in a row to dial come from pods alone, each of them
// answering (an old spread over more pods gives that by chance once in a million rounds).
func onlyFrom(t *testing.T, f int, what string, dial func() (string, error), pods ...*lab.Pod) {
	t.Helper()
	wait.For(t, what+": answers from "+names(pods)+" alone", func() error {
		seen := map[*lab.Pod]bool{}
		for range 20 {
			answer, err := dial()
			if err != nil {
				return err
			}
			p, err := answeredBy(answer, f, pods...)
			if err != nil {
				return err
			}
			seen[p] = true
		}
		if len(seen) < len(pods) {
			return fmt.Errorf("%d of %d pods answered 20 connections", len(seen), len(pods))
		}
		return nil
	})
}

// clusterAddr is the Service's cluster IP of family f, on port.
func clusterAddr(svc *corev1.Service, f int, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIPs[f]), port)
}
