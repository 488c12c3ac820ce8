package operator_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/operator"
	"github.com/portico-dev/portico/test/harness/wait"
)

func TestServiceGetsAnAddressAndReleasesItOnDelete(t *testing.T) {
	startOperator(t, operator.Options{})
	for _, tc := range []struct {
		name, block, want string
		family            corev1.IPFamily
	}{
		{"v4", "192.0.2.0/30", "192.0.2.0", corev1.IPv4Protocol},
		{"v6", "2001:db8:1::/126", "2001:db8:1::", corev1.IPv6Protocol},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			p := f.pool("p", nil, tc.block)
			f.service("web", func(s *corev1.Service) { s.Spec.IPFamilies = []corev1.IPFamily{tc.family} })
			f.waitIPs("web", tc.want)
			c := f.waitCondition("web", metav1.ConditionTrue, lbv1.ReasonAllocated)
			if !strings.Contains(c.Message, tc.want+" from pool "+p.Name) {
				t.Errorf("condition message %q does not say which address from which pool", c.Message)
			}
			f.waitEvent(f.ns, "web", "IPAllocated", tc.want)
			waitPoolCount(t, p.Name, tc.family, 1)

			f.remove("web")
			waitPoolCount(t, p.Name, tc.family, 0)
		})
	}
}

// toClusterIP turns a LoadBalancer Service into a ClusterIP one (its node port goes too).
func toClusterIP(s *corev1.Service) {
	s.Spec.Type = corev1.ServiceTypeClusterIP
	s.Spec.Ports[0].NodePort = 0
}

func TestTypeChangeAwayFromLoadBalancerReleasesTheAddress(t *testing.T) {
	startOperator(t, operator.Options{})
	f := newFixture(t)
	f.pool("p", nil, "192.0.2.8/31")
	f.service("web", nil)
	ip := f.waitAllocated("web", 1)[0]
	f.update("web", toClusterIP)
	wait.For(t, "", func() error {
		s := f.get("web")
		if len(s.Status.LoadBalancer.Ingress) > 0 || meta.FindStatusCondition(s.Status.Conditions, lbv1.ServiceConditionIPAllocated) != nil {
			return fmt.Errorf("status still has %v / %v", ingress(s), s.Status.Conditions)
		}
		return nil
	})
	// The address is free again: a Service may now request it.
	f.service("other", func(s *corev1.Service) { s.Annotations = map[string]string{lbv1.AnnotationIPs: ip} })
	f.waitIPs("other", ip)
}

func TestRequestedAddresses(t *testing.T) {
	startOperator(t, operator.Options{})
	f := newFixture(t)
	f.pool("p", nil, "192.0.2.16/28", "2001:db8:2::/120")
	f.service("by-annotation", func(s *corev1.Service) {
		s.Annotations = map[string]string{lbv1.AnnotationIPs: "192.0.2.20"}
	})
	f.service("by-spec", func(s *corev1.Service) { s.Spec.LoadBalancerIP = "192.0.2.21" })
	f.service("dual", func(s *corev1.Service) {
		s.Annotations = map[string]string{lbv1.AnnotationIPs: "2001:db8:2::7, 192.0.2.22"}
		s.Spec.IPFamilyPolicy = ptr.To(corev1.IPFamilyPolicyRequireDualStack)
		s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol}
	})
	f.waitIPs("by-annotation", "192.0.2.20")
	f.waitIPs("by-spec", "192.0.2.21")
	f.waitIPs("dual", "192.0.2.22", "2001:db8:2::7")

	f.service("taken", func(s *corev1.Service) { s.Annotations = map[string]string{lbv1.AnnotationIPs: "192.0.2.20"} })
	c := f.waitCondition("taken", metav1.ConditionFalse, "RequestedIPTaken")
	if !strings.Contains(c.Message, f.ns+"/by-annotation") {
		t.Errorf("message %q does not name the holder", c.Message)
	}
	f.waitEvent(f.ns, "taken", "RequestedIPTaken", "192.0.2.20")

	f.service("outside", func(s *corev1.Service) { s.Annotations = map[string]string{lbv1.AnnotationIPs: "203.0.113.5"} })
	f.waitCondition("outside", metav1.ConditionFalse, "RequestedIPOutsidePools")
	if got := ingress(f.get("outside")); len(got) != 0 {
		t.Fatalf("a Service asking for an address outside every pool got %v", got)
	}
}

func TestMalformedAnnotationKeepsTheAddress(t *testing.T) {
	startOperator(t, operator.Options{})
	f := newFixture(t)
	f.pool("p", nil, "192.0.2.32/29")
	f.service("web", nil)
	ip := f.waitAllocated("web", 1)[0]
	f.update("web", func(s *corev1.Service) { s.Annotations = map[string]string{lbv1.AnnotationIPs: "192.0.2.300"} })
	c := f.waitCondition("web", metav1.ConditionFalse, lbv1.ReasonInvalidAnnotation)
	if !strings.Contains(c.Message, "192.0.2.300") || !strings.Contains(c.Message, ip) {
		t.Errorf("message %q should name the bad value and the address kept", c.Message)
	}
	f.waitIPs("web", ip)
	f.waitEvent(f.ns, "web", lbv1.ReasonInvalidAnnotation, "192.0.2.300")
}

func TestSharingByKey(t *testing.T) {
	startOperator(t, operator.Options{})
	f := newFixture(t)
	f.pool("p", nil, "192.0.2.40/29")
	shared := func(port int32) func(*corev1.Service) {
		return func(s *corev1.Service) {
			s.Annotations = map[string]string{lbv1.AnnotationSharingKey: "edge"}
			s.Spec.Ports[0].Port = port
		}
	}
	f.service("http", shared(80))
	ip := f.waitAllocated("http", 1)[0]
	f.service("https", shared(443))
	f.waitIPs("https", ip)
	f.service("clash", shared(443))
	if got := f.waitAllocated("clash", 1)[0]; got == ip {
		t.Fatalf("a Service with a colliding port shares %s", ip)
	}
	// Requesting the shared address with a colliding port is a clear conflict.
	f.service("insist", func(s *corev1.Service) {
		shared(80)(s)
		s.Annotations[lbv1.AnnotationIPs] = ip
	})
	f.waitCondition("insist", metav1.ConditionFalse, "SharingConflict")
}

func TestPoolExhaustionThenFreeing(t *testing.T) {
	startOperator(t, operator.Options{})
	f := newFixture(t)
	p := f.pool("p", nil, "2001:db8:3::-2001:db8:3::1")
	v6 := func(s *corev1.Service) { s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv6Protocol} }
	f.service("a", v6)
	f.service("b", v6)
	freedByTypeChange := f.waitAllocated("a", 1)[0]
	freed := f.waitAllocated("b", 1)[0]
	f.service("c", v6)
	f.waitCondition("c", metav1.ConditionFalse, "PoolExhausted")
	f.waitEvent(f.ns, "c", "PoolExhausted", p.Name)
	waitPool(t, p.Name, func(p *lbv1.LBPool) error {
		if p.Status.IPv6 == nil || p.Status.IPv6.Allocated != 2 || p.Status.IPv6.Available != "0" {
			return fmt.Errorf("ipv6 counts %+v, want 2 allocated, 0 available", p.Status.IPv6)
		}
		return nil
	})
	// A deletion frees an address, and the waiting Service gets it without any other event.
	f.remove("b")
	f.waitIPs("c", freed)
	f.waitCondition("c", metav1.ConditionTrue, lbv1.ReasonAllocated)

	// So does a type change away from LoadBalancer.
	f.service("d", v6)
	f.waitCondition("d", metav1.ConditionFalse, "PoolExhausted")
	f.update("a", toClusterIP)
	f.waitIPs("d", freedByTypeChange)
}

func TestDualStack(t *testing.T) {
	startOperator(t, operator.Options{})
	f := newFixture(t)
	f.pool("v4", nil, "192.0.2.48/30")
	f.pool("v6", nil, "2001:db8:4::/126")
	f.service("require", func(s *corev1.Service) {
		s.Spec.IPFamilyPolicy = ptr.To(corev1.IPFamilyPolicyRequireDualStack)
		s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv6Protocol, corev1.IPv4Protocol}
	})
	f.waitIPs("require", "2001:db8:4::", "192.0.2.48")

	// PreferDualStack in a namespace whose only pool is IPv4 gets IPv4 and no complaint.
	g := newFixture(t)
	g.pool("v4", nil, "192.0.2.52/30")
	g.service("prefer", func(s *corev1.Service) {
		s.Spec.IPFamilyPolicy = ptr.To(corev1.IPFamilyPolicyPreferDualStack)
	})
	g.waitIPs("prefer", "192.0.2.52")
	g.waitCondition("prefer", metav1.ConditionTrue, lbv1.ReasonAllocated)
}

func TestLoadBalancerClass(t *testing.T) {
	startOperator(t, operator.Options{}) // serves class-less Services too
	f := newFixture(t)
	f.pool("p", nil, "192.0.2.56/30")
	f.service("ours", func(s *corev1.Service) { s.Spec.LoadBalancerClass = ptr.To(lbv1.LoadBalancerClass) })
	f.service("theirs", func(s *corev1.Service) { s.Spec.LoadBalancerClass = ptr.To("example.com/other") })
	f.service("classless", nil)
	f.waitAllocated("ours", 1)
	f.waitAllocated("classless", 1)
	never(t, time.Second, func() error {
		if s := f.get("theirs"); len(s.Status.LoadBalancer.Ingress) > 0 || len(s.Status.Conditions) > 0 {
			return fmt.Errorf("Portico wrote the status of another class's Service: %+v", s.Status)
		}
		return nil
	})
}

func TestPoolEditsMoveOnlyAffectedServicesAndOverlapsConflict(t *testing.T) {
	startOperator(t, operator.Options{})
	f := newFixture(t)
	a := f.pool("a", nil, "192.0.2.64/30")
	b := f.pool("b", nil, "192.0.2.72/30")
	f.service("on-a", func(s *corev1.Service) { s.Annotations = map[string]string{lbv1.AnnotationPool: a.Name} })
	f.service("on-b", func(s *corev1.Service) { s.Annotations = map[string]string{lbv1.AnnotationPool: b.Name} })
	f.waitIPs("on-a", "192.0.2.64")
	f.waitIPs("on-b", "192.0.2.72")

	// Shrink pool a past its first address: on-a moves, on-b does not.
	wait.For(t, "", func() error {
		var p lbv1.LBPool
		if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(a), &p); err != nil {
			return err
		}
		p.Spec.Blocks = []lbv1.IPBlock{{Start: "192.0.2.66", Stop: "192.0.2.67"}}
		return env.Client.Update(context.Background(), &p)
	})
	f.waitIPs("on-a", "192.0.2.66")
	f.waitEvent(f.ns, "on-a", "IPReleased", "192.0.2.64")
	never(t, 500*time.Millisecond, func() error {
		if got := ingress(f.get("on-b")); !slices.Equal(got, []string{"192.0.2.72"}) {
			return fmt.Errorf("on-b moved to %v", got)
		}
		return nil
	})

	// A newer pool overlapping b gets a Conflict condition and only its own addresses.
	c := f.pool("c", nil, "192.0.2.72/29")
	waitPool(t, c.Name, func(p *lbv1.LBPool) error {
		cond := meta.FindStatusCondition(p.Status.Conditions, lbv1.ConditionConflict)
		if cond == nil || cond.Status != metav1.ConditionTrue || !strings.Contains(cond.Message, b.Name) || cond.ObservedGeneration != p.Generation {
			return fmt.Errorf("conflict condition %+v", cond)
		}
		if p.Status.IPv4 == nil || p.Status.IPv4.Available != "4" {
			return fmt.Errorf("ipv4 counts %+v, want 4 available (the half b does not hold)", p.Status.IPv4)
		}
		return nil
	})
	f.waitEvent("default", c.Name, lbv1.ReasonPoolOverlaps, b.Name)
}

func TestRestartKeepsEveryAddress(t *testing.T) {
	stop := startOperator(t, operator.Options{})
	f := newFixture(t)
	f.pool("p", nil, "192.0.2.80-192.0.2.85", "2001:db8:5::/125")
	before := map[string][]string{}
	for i := range 6 {
		name := fmt.Sprintf("s%d", i)
		f.service(name, func(s *corev1.Service) {
			if i%2 == 1 {
				s.Spec.IPFamilyPolicy = ptr.To(corev1.IPFamilyPolicyRequireDualStack)
				s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol}
			}
		})
	}
	for i := range 6 {
		name := fmt.Sprintf("s%d", i)
		before[name] = f.waitAllocated(name, 1+i%2)
	}
	stop()
	// Delete a Service while no operator runs, then create new ones: the new operator must
	// restore every address before it hands out the one free address.
	f.remove("s3")
	startOperator(t, operator.Options{})
	f.service("new1", nil)
	got1 := f.waitAllocated("new1", 1)[0]
	f.service("new2", nil)
	f.waitCondition("new2", metav1.ConditionFalse, "PoolExhausted")
	if got1 != before["s3"][0] {
		t.Errorf("new1 got %s, want the freed %s", got1, before["s3"][0])
	}
	for name, ips := range before {
		if name == "s3" {
			continue
		}
		if got := ingress(f.get(name)); !slices.Equal(got, ips) {
			t.Errorf("restart moved %s: %v -> %v", name, ips, got)
		}
	}
}

func waitPool(t *testing.T, name string, check func(*lbv1.LBPool) error) {
	t.Helper()
	wait.For(t, "", func() error {
		var p lbv1.LBPool
		if err := env.Client.Get(context.Background(), client.ObjectKey{Name: name}, &p); err != nil {
			return err
		}
		return check(&p)
	})
}

func waitPoolCount(t *testing.T, name string, family corev1.IPFamily, n int64) {
	t.Helper()
	waitPool(t, name, func(p *lbv1.LBPool) error {
		c := p.Status.IPv4
		if family == corev1.IPv6Protocol {
			c = p.Status.IPv6
		}
		if c == nil || c.Allocated != n {
			return fmt.Errorf("pool %s %s counts %+v, want %d allocated", name, family, c, n)
		}
		if r := meta.FindStatusCondition(p.Status.Conditions, lbv1.ConditionReady); r == nil || r.Status != metav1.ConditionTrue {
			return fmt.Errorf("pool %s not Ready: %+v", name, r)
		}
		return nil
	})
}
