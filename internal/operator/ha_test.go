package operator_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/operator"
)

// What CEL cannot check at admission the operator reports on the pool, and the pool serves
// nothing.
func TestInvalidPoolIsReportedAndServesNothing(t *testing.T) {
	startOperator(t, operator.Options{})
	f := newFixture(t)
	p := f.pool("reversed", nil, "2001:db8:9::9-2001:db8:9::1")
	waitPool(t, p.Name, func(p *lbv1.LBPool) error {
		c := meta.FindStatusCondition(p.Status.Conditions, lbv1.ConditionReady)
		if c == nil || c.Status != metav1.ConditionFalse || c.Reason != lbv1.ReasonPoolInvalid || !strings.Contains(c.Message, "start must not be greater than stop") {
			return fmt.Errorf("ready condition %+v", c)
		}
		return nil
	})
	f.waitEvent("default", p.Name, lbv1.ReasonPoolInvalid, "start must not be greater than stop")
	f.service("v6", func(s *corev1.Service) { s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv6Protocol} })
	f.waitCondition("v6", metav1.ConditionFalse, "NoMatchingPool")
}

// Two replicas with leader election: one allocates; when it stops, the other takes over at
// once (the leader releases its Lease) and keeps every address.
func TestLeaderElectionHandsOverWithoutMovingAddresses(t *testing.T) {
	ns := newFixture(t).ns
	ha := operator.Options{LeaderElect: true, LeaderNamespace: ns,
		LeaseDuration: 3 * time.Second, RenewDeadline: 2 * time.Second, LeaderRetryPeriod: 200 * time.Millisecond}
	stopFirst := startOperator(t, ha)
	f := &fixture{t: t, ns: ns}
	f.pool("p", nil, "192.0.2.200/29")
	f.service("a", nil)
	ipA := f.waitAllocated("a", 1)[0]

	startOperator(t, ha) // the standby
	stopFirst()
	start := time.Now()
	f.service("b", nil)
	ipB := f.waitAllocated("b", 1)[0]
	t.Logf("the standby allocated %v after the leader stopped", time.Since(start).Round(time.Millisecond))
	if ipB == ipA {
		t.Fatalf("the new leader handed out %s twice", ipA)
	}
	f.waitIPs("a", ipA)
}
