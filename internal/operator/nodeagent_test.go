package operator_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/controller/nodeagent"
	"github.com/portico-dev/portico/internal/operator"
	"github.com/portico-dev/portico/test/harness/wait"
)

// A NodeAgent says what its agent last did; once the agent's Lease lapses (or it never had
// one), the operator marks it lost and drops its announcements, which its peers took over.
// A live agent's report is left alone, and an agent that comes back is believed again.
func TestLostAgentsAreMarked(t *testing.T) {
	f := newFixture(t) // its namespace holds the agents' Leases
	startOperator(t, operator.Options{AgentNamespace: f.ns, AgentGrace: 2 * time.Second})
	ctx := context.Background()
	// report writes a NodeAgent as an agent does (server-side apply, forced): Ready,
	// announcing one address, hearing one peer.
	report := func(node string) {
		t.Helper()
		writeNodeAgent(t, node, lbv1.NodeAgentStatus{
			Conditions:    []metav1.Condition{{Type: lbv1.ConditionReady, Status: metav1.ConditionTrue, Reason: "Synced", LastTransitionTime: metav1.Now()}},
			Announcements: []lbv1.AnnouncedAddress{{Address: "192.0.2.1", Service: "default/web", Interfaces: []string{"eth0"}}},
			LivePeers:     []string{"node-2"},
		})
	}
	// renew applies node's Lease as renewed now, lasting d.
	renew := func(node string, d time.Duration) {
		t.Helper()
		l := &coordinationv1.Lease{TypeMeta: metav1.TypeMeta{APIVersion: "coordination.k8s.io/v1", Kind: "Lease"},
			ObjectMeta: metav1.ObjectMeta{Namespace: f.ns, Name: lbv1.AgentLeasePrefix + node},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(node), LeaseDurationSeconds: ptr.To(int32(d / time.Second)),
				RenewTime: &metav1.MicroTime{Time: time.Now()}}}
		if err := env.Client.Patch(ctx, l, client.Apply, client.FieldOwner("test"), client.ForceOwnership); err != nil {
			t.Fatal(err)
		}
	}
	// state is node's Ready condition and how many addresses and peers it lists.
	state := func(node string) (metav1.ConditionStatus, string, int) {
		t.Helper()
		var na lbv1.NodeAgent
		if err := env.Client.Get(ctx, client.ObjectKey{Name: node}, &na); err != nil {
			t.Fatal(err)
		}
		c := meta.FindStatusCondition(na.Status.Conditions, lbv1.ConditionReady)
		n := len(na.Status.Announcements) + len(na.Status.LivePeers)
		if c == nil {
			return "", "", n
		}
		return c.Status, c.Reason, n
	}
	lost := func(node string) {
		t.Helper()
		wait.For(t, "", func() error {
			if s, r, n := state(node); s != metav1.ConditionUnknown || r != nodeagent.ReasonLost || n != 0 {
				return fmt.Errorf("%s: Ready=%s (%s), %d announcements and peers", node, s, r, n)
			}
			return nil
		})
	}
	live := func(node string, d time.Duration) {
		t.Helper()
		for t0 := time.Now(); time.Since(t0) < d; time.Sleep(200 * time.Millisecond) {
			if s, r, n := state(node); s != metav1.ConditionTrue || n != 2 {
				t.Fatalf("%s of a live agent changed: Ready=%s (%s), %d announcements and peers", node, s, r, n)
			}
		}
	}

	dies, stays, never := f.ns+"-dies", f.ns+"-stays", f.ns+"-never"
	renew(dies, 2*time.Second)
	report(dies)
	renew(stays, 30*time.Second)
	report(stays)
	report(never)
	live(dies, time.Second)
	lost(dies) // its Lease lapsed after 2 s
	lost(never)
	live(stays, time.Second)

	var events corev1.EventList
	if err := env.Client.List(ctx, &events, client.MatchingFields{"involvedObject.name": dies}); err != nil {
		t.Fatal(err)
	}
	if len(events.Items) == 0 || events.Items[0].Reason != nodeagent.ReasonLost || events.Items[0].Type != corev1.EventTypeWarning {
		t.Errorf("no %s Warning Event for %s: %+v", nodeagent.ReasonLost, dies, events.Items)
	}

	// The agent comes back: it renews, then reports; the report stands.
	renew(dies, 30*time.Second)
	report(dies)
	live(dies, 3*time.Second)
}
