package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/controller/nodeagent"
	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/test/harness/wait"
)

// l2 checks announcement as a router on the segment sees it: arping and ndisc6 get the
// announcing node's MAC, the kernel's own resolution carries TCP to the Service, nobody
// answers for a free address of the pool, and killing the announcing agent moves the router's
// neighbour entry to another node, through which connections work again, and the operator
// marks the dead agent's NodeAgent lost.
func (c *cluster) l2(t *testing.T) {
	svc := c.service(t, "l2", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeLoadBalancer })
	c.endpoints(t, "l2", c.web...)
	addrs := c.addresses(t, svc)
	for _, a := range addrs {
		// No static route (an earlier row's, for a reused address): the client resolves it.
		_ = ip(c.net.Client, "route", "del", netip.PrefixFrom(a, a.BitLen()).String())
	}
	// Every agent hears the other two: their signed heartbeats arrive and are taken.
	for i := range c.net.Nodes {
		c.hears(t, i, others(len(c.net.Nodes), i)...)
	}
	macs := c.macs(t)
	announcer := make([]int, len(families))
	for f, fam := range families {
		t.Run(fam, func(t *testing.T) {
			announcer[f] = c.announcer(t, addrs[f])
			if got := c.net.Resolve(addrs[f], 2); len(got) == 0 || !allEqual(got, macs[announcer[f]]) {
				t.Fatalf("%s answered by %v; want only node-%d's %s", addrs[f], got, announcer[f]+1, macs[announcer[f]])
			}
			everyPodAnswers(t, f, c.fromClient(netip.AddrPortFrom(addrs[f], 80)), c.web...)
			if got := c.neighbour(t, addrs[f]); got != macs[announcer[f]] {
				t.Fatalf("the client's kernel resolved %s to %q; want node-%d's %s", addrs[f], got, announcer[f]+1, macs[announcer[f]])
			}
			// A pool address no Service holds (the pool hands out from its start).
			free := map[int]string{0: "192.0.2.62", 1: "2001:db8::1fe"}[f]
			if got := c.net.Resolve(netip.MustParseAddr(free), 2); len(got) != 0 {
				t.Fatalf("%s, held by no Service, answered by %v", free, got)
			}
		})
	}
	for f, fam := range families {
		t.Run(fam+"/announcing agent killed", func(t *testing.T) {
			dead := announcer[f]
			if err := c.lab.Agents[dead].Kill(); err != nil {
				t.Fatal(err)
			}
			took := time.Now()
			wait.For(t, "the client's entry for "+addrs[f].String()+" to move", func() error {
				if got := c.neighbour(t, addrs[f]); got == macs[dead] || got == "" {
					return fmt.Errorf("still %q", got)
				}
				return nil
			})
			t.Logf("the client's neighbour entry moved %v after the kill", time.Since(took).Round(time.Millisecond))
			c.lost(t, dead)
			now := c.announcer(t, addrs[f])
			c.hears(t, now, others(len(c.net.Nodes), now, dead)...)
			if got := c.neighbour(t, addrs[f]); got != macs[now] {
				t.Fatalf("the client's entry for %s is %q; want node-%d's %s, which announces it now", addrs[f], got, now+1, macs[now])
			}
			everyPodAnswers(t, f, c.fromClient(netip.AddrPortFrom(addrs[f], 80)), c.web...)
			if got := c.net.Resolve(addrs[f], 2); !allEqual(got, macs[now]) {
				t.Fatalf("%s answered by %v after the take-over; want only node-%d's %s", addrs[f], got, now+1, macs[now])
			}
			// Back: it wins its address back after its warm-up.
			if err := c.lab.StartAgent(dead); err != nil {
				t.Fatal(err)
			}
			wait.For(t, "node-"+fmt.Sprint(dead+1)+" to take "+addrs[f].String()+" back", func() error {
				if got := c.neighbour(t, addrs[f]); got != macs[dead] {
					return fmt.Errorf("the client's entry is %q", got)
				}
				return nil
			})
			everyPodAnswers(t, f, c.fromClient(netip.AddrPortFrom(addrs[f], 80)), c.web...)
		})
	}
}

// addresses waits for a LoadBalancer Service's addresses, IPv4 then IPv6.
func (c *cluster) addresses(t *testing.T, svc *corev1.Service) []netip.Addr {
	t.Helper()
	addrs := make([]netip.Addr, len(families))
	wait.For(t, "addresses for "+svc.Name, func() error {
		if err := c.c.Get(context.Background(), client.ObjectKeyFromObject(svc), svc); err != nil {
			return err
		}
		for _, a := range loadbalancer.IngressIPs(svc) {
			addrs[map[bool]int{true: 0, false: 1}[a.Is4()]] = a
		}
		if !addrs[0].IsValid() || !addrs[1].IsValid() {
			return fmt.Errorf("status %+v", svc.Status.LoadBalancer)
		}
		return nil
	})
	return addrs
}

// announcer waits until exactly one node reports announcing a, and returns it.
func (c *cluster) announcer(t *testing.T, a netip.Addr) int {
	t.Helper()
	found := -1
	wait.For(t, "a node to announce "+a.String(), func() error {
		found = -1
		for i, n := range c.net.Nodes {
			var agent lbv1.NodeAgent
			if err := c.c.Get(context.Background(), client.ObjectKey{Name: n.Name}, &agent); err != nil {
				return err
			}
			for _, ann := range agent.Status.Announcements {
				if ann.Address != a.String() {
					continue
				}
				if found >= 0 {
					return fmt.Errorf("node-%d and %s both report it", found+1, n.Name)
				}
				found = i
			}
		}
		if found < 0 {
			return fmt.Errorf("nobody reports it")
		}
		return nil
	})
	return found
}

// hears waits until node i's NodeAgent lists exactly nodes want as its live peers.
func (c *cluster) hears(t *testing.T, i int, want ...int) {
	t.Helper()
	var names []string
	for _, j := range want {
		names = append(names, c.net.Nodes[j].Name)
	}
	slices.Sort(names)
	wait.For(t, fmt.Sprintf("%s to hear %v", c.net.Nodes[i].Name, names), func() error {
		var agent lbv1.NodeAgent
		if err := c.c.Get(context.Background(), client.ObjectKey{Name: c.net.Nodes[i].Name}, &agent); err != nil {
			return err
		}
		if !slices.Equal(agent.Status.LivePeers, names) {
			return fmt.Errorf("it hears %v", agent.Status.LivePeers)
		}
		return nil
	})
}

// others are the nodes 0..n-1 but those given.
func others(n int, but ...int) []int {
	var out []int
	for i := range n {
		if !slices.Contains(but, i) {
			out = append(out, i)
		}
	}
	return out
}

// lost waits until the operator marks node i's NodeAgent lost (its agent's Lease lapsed):
// Ready=Unknown, announcing nothing.
func (c *cluster) lost(t *testing.T, i int) {
	t.Helper()
	wait.For(t, c.net.Nodes[i].Name+"'s NodeAgent to be marked lost", func() error {
		var agent lbv1.NodeAgent
		if err := c.c.Get(context.Background(), client.ObjectKey{Name: c.net.Nodes[i].Name}, &agent); err != nil {
			return err
		}
		ready := meta.FindStatusCondition(agent.Status.Conditions, lbv1.ConditionReady)
		if ready == nil || ready.Status != metav1.ConditionUnknown || ready.Reason != nodeagent.ReasonLost || len(agent.Status.Announcements) > 0 {
			return fmt.Errorf("Ready %+v, announcing %v", ready, agent.Status.Announcements)
		}
		return nil
	})
}

// macs are the nodes' MAC addresses on the segment.
func (c *cluster) macs(t *testing.T) []string {
	t.Helper()
	out := make([]string, len(c.net.Nodes))
	for i, n := range c.net.Nodes {
		var err error
		if out[i], err = n.MAC(); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// neighbour is the client kernel's neighbour entry for a: its MAC, "" when none.
func (c *cluster) neighbour(t *testing.T, a netip.Addr) string {
	t.Helper()
	mac, err := c.net.Neighbour(a)
	if err != nil {
		t.Fatal(err)
	}
	return mac
}

func allEqual(got []string, want string) bool {
	for _, g := range got {
		if g != want {
			return false
		}
	}
	return true
}
