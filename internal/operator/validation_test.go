package operator_test

import (
	"context"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/test/harness/testenv"
)

// The API server itself rejects bad objects, with messages that say what to fix.
func TestAdmissionRejectsBadObjects(t *testing.T) {
	pool := func(blocks ...lbv1.IPBlock) *lbv1.LBPool {
		return &lbv1.LBPool{ObjectMeta: metav1.ObjectMeta{GenerateName: "bad-"}, Spec: lbv1.LBPoolSpec{Blocks: blocks}}
	}
	withSpec := func(p *lbv1.LBPool, mutate func(*lbv1.LBPoolSpec)) *lbv1.LBPool {
		mutate(&p.Spec)
		return p
	}
	ok := lbv1.IPBlock{CIDR: "192.0.2.0/24"}
	ns := newFixture(t).ns
	for _, tc := range []struct {
		name string
		obj  client.Object
		want string
	}{
		{"v4 cidr not a cidr", pool(lbv1.IPBlock{CIDR: "192.0.2.0/33"}), "cidr must be a network in prefix notation"},
		{"v6 cidr not a cidr", pool(lbv1.IPBlock{CIDR: "2001:db8::/129"}), "cidr must be a network in prefix notation"},
		{"v4 host bits", pool(lbv1.IPBlock{CIDR: "192.0.2.1/24"}), "cidr has host bits set: write the network address"},
		{"v6 host bits", pool(lbv1.IPBlock{CIDR: "2001:db8::1/64"}), "cidr has host bits set: write the network address"},
		{"v4 start after stop", pool(lbv1.IPBlock{Start: "192.0.2.10", Stop: "192.0.2.9"}), "start must not be greater than stop"},
		{"v4 start not an address", pool(lbv1.IPBlock{Start: "192.0.2", Stop: "192.0.2.9"}), "start must be an IP address"},
		{"mixed families", pool(lbv1.IPBlock{Start: "192.0.2.1", Stop: "2001:db8::1"}), "start and stop must be of the same IP family"},
		{"cidr and range", pool(lbv1.IPBlock{CIDR: "192.0.2.0/24", Start: "192.0.2.1", Stop: "192.0.2.2"}), "a block is either a cidr or a start/stop range"},
		{"half range", pool(lbv1.IPBlock{Start: "192.0.2.1"}), "a range needs both start and stop"},
		{"empty block", pool(lbv1.IPBlock{}), "a block is either a cidr or a start/stop range"},
		{"no blocks", pool([]lbv1.IPBlock{}...), "a pool needs at least one block"},
		{"blocks missing", &lbv1.LBPool{ObjectMeta: metav1.ObjectMeta{GenerateName: "bad-"}}, "spec.blocks: Required value"},
		{"bad selector operator", withSpec(pool(ok), func(s *lbv1.LBPoolSpec) {
			s.ServiceSelector = &lbv1.LabelSelector{MatchExpressions: []lbv1.LabelSelectorRequirement{{Key: "tier", Operator: "Near", Values: []string{"x"}}}}
		}), `supported values: "In", "NotIn", "Exists", "DoesNotExist"`},
		{"In without values", withSpec(pool(ok), func(s *lbv1.LBPoolSpec) {
			s.NamespaceSelector = &lbv1.LabelSelector{MatchExpressions: []lbv1.LabelSelectorRequirement{{Key: "tier", Operator: "In"}}}
		}), "In and NotIn need values; Exists and DoesNotExist take none"},
		{"bad expression key", withSpec(pool(ok), func(s *lbv1.LBPoolSpec) {
			s.ServiceSelector = &lbv1.LabelSelector{MatchExpressions: []lbv1.LabelSelectorRequirement{{Key: "not a key", Operator: "Exists"}}}
		}), "key must be a label key"},
		{"bad label value", withSpec(pool(ok), func(s *lbv1.LBPoolSpec) {
			s.ServiceSelector = &lbv1.LabelSelector{MatchLabels: map[string]lbv1.LabelValue{"tier": "has space"}}
		}), "label values are up to 63 characters"},
		{"priority out of range", withSpec(pool(ok), func(s *lbv1.LBPoolSpec) { s.Priority = -1 }), "spec.priority"},
		{"policy without targets", &lbv1.ServicePolicy{ObjectMeta: metav1.ObjectMeta{GenerateName: "bad-", Namespace: ns}}, "a policy needs targetRefs, a selector, or both"},
		{"policy bad algorithm", &lbv1.ServicePolicy{ObjectMeta: metav1.ObjectMeta{GenerateName: "bad-", Namespace: ns}, Spec: lbv1.ServicePolicySpec{
			TargetRefs: []lbv1.ServiceTargetReference{{Name: "web"}}, LoadBalancing: &lbv1.LoadBalancing{Algorithm: "Fastest"},
		}}, `supported values: "Random", "Maglev"`},
		{"maglev size without maglev", &lbv1.ServicePolicy{ObjectMeta: metav1.ObjectMeta{GenerateName: "bad-", Namespace: ns}, Spec: lbv1.ServicePolicySpec{
			TargetRefs: []lbv1.ServiceTargetReference{{Name: "web"}}, LoadBalancing: &lbv1.LoadBalancing{Algorithm: "Random", MaglevTableSize: 16381},
		}}, "maglevTableSize applies only to the Maglev algorithm"},
		{"policy bad source range", &lbv1.ServicePolicy{ObjectMeta: metav1.ObjectMeta{GenerateName: "bad-", Namespace: ns}, Spec: lbv1.ServicePolicySpec{
			TargetRefs: []lbv1.ServiceTargetReference{{Name: "web"}}, SourceRanges: []string{"10.0.0.0/8", "everywhere"},
		}}, "sourceRanges must be networks in prefix notation"},
		{"policy target kind", &lbv1.ServicePolicy{ObjectMeta: metav1.ObjectMeta{GenerateName: "bad-", Namespace: ns}, Spec: lbv1.ServicePolicySpec{
			TargetRefs: []lbv1.ServiceTargetReference{{Kind: "Pod", Name: "web"}},
		}}, `supported values: "Service"`},
		{"l7 bad duration", &lbv1.L7Policy{ObjectMeta: metav1.ObjectMeta{GenerateName: "bad-", Namespace: ns}, Spec: lbv1.L7PolicySpec{
			TargetRefs: []lbv1.L7TargetReference{{ServiceTargetReference: lbv1.ServiceTargetReference{Name: "greeter"}}}, Protocol: "GRPC", RequestTimeout: "ten seconds",
		}}, "must be a duration such as 500ms, 10s or 1m30s"},
		{"l7 idle timeout too short", &lbv1.L7Policy{ObjectMeta: metav1.ObjectMeta{GenerateName: "bad-", Namespace: ns}, Spec: lbv1.L7PolicySpec{
			TargetRefs: []lbv1.L7TargetReference{{ServiceTargetReference: lbv1.ServiceTargetReference{Name: "greeter"}}}, Protocol: "GRPC", IdleTimeout: "0s",
		}}, "idleTimeout must be at least 1s"},
		{"l7 bad protocol", &lbv1.L7Policy{ObjectMeta: metav1.ObjectMeta{GenerateName: "bad-", Namespace: ns}, Spec: lbv1.L7PolicySpec{
			TargetRefs: []lbv1.L7TargetReference{{ServiceTargetReference: lbv1.ServiceTargetReference{Name: "greeter"}}}, Protocol: "SPDY",
		}}, `supported values: "GRPC", "HTTP2", "HTTP1"`},
		{"l7 bad retry condition", &lbv1.L7Policy{ObjectMeta: metav1.ObjectMeta{GenerateName: "bad-", Namespace: ns}, Spec: lbv1.L7PolicySpec{
			TargetRefs: []lbv1.L7TargetReference{{ServiceTargetReference: lbv1.ServiceTargetReference{Name: "greeter"}}}, Protocol: "GRPC",
			Retries: &lbv1.Retries{RetryOn: []string{"Always"}},
		}}, `supported values: "ConnectFailure", "Reset", "RefusedStream", "Unavailable"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := env.Client.Create(context.Background(), tc.obj)
			if err == nil {
				_ = env.Client.Delete(context.Background(), tc.obj)
				t.Fatalf("the API server accepted it; want a rejection containing %q", tc.want)
			}
			if !isInvalid(err) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("rejection = %v\nwant one containing %q", err, tc.want)
			}
		})
	}
}

func TestAdmissionAcceptsGoodPools(t *testing.T) {
	for _, blocks := range [][]lbv1.IPBlock{
		{{CIDR: "192.0.2.0/24"}, {CIDR: "2001:db8::/64"}},
		{{Start: "192.0.2.10", Stop: "192.0.2.10"}},
		{{Start: "192.0.2.10", Stop: "192.0.3.9"}},
		{{Start: "2001:db8::ffff", Stop: "2001:db8::1:0"}},
		{{Start: "0.0.0.0", Stop: "255.255.255.255"}},
		{{Start: "::", Stop: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}},
	} {
		p := &lbv1.LBPool{ObjectMeta: metav1.ObjectMeta{GenerateName: "good-"}, Spec: lbv1.LBPoolSpec{
			Blocks: blocks, Disabled: true, // disabled: these must not serve the other tests
			ServiceSelector: &lbv1.LabelSelector{MatchExpressions: []lbv1.LabelSelectorRequirement{{Key: "example.com/tier", Operator: "Exists"}}},
		}}
		if err := env.Client.Create(context.Background(), p); err != nil {
			t.Errorf("blocks %+v rejected: %v", blocks, err)
			continue
		}
		_ = env.Client.Delete(context.Background(), p)
	}
}

// Every sample a user may copy is accepted by the API server as it is.
func TestSamplesAreAccepted(t *testing.T) {
	samples, err := testenv.Samples()
	if err != nil {
		t.Fatal(err)
	}
	for _, obj := range samples {
		if err := env.Client.Create(context.Background(), obj, client.DryRunAll); err != nil {
			t.Errorf("%s %s rejected: %v", obj.GetObjectKind().GroupVersionKind().Kind, obj.GetName(), err)
		}
	}
}
