package e2e

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/test/nstest"
)

// l7 checks per-request balancing: curl in a pod on node-1 sends 30 HTTP/1.1 requests over
// one keep-alive connection to a ClusterIP Service of the three web pods. Connection
// balancing sends them all to one pod; with an L7Policy the node's proxy spreads them, round
// robin: 10 each. Without the policy again, one pod answers all.
func (c *cluster) l7(t *testing.T) {
	svc := c.service(t, "l7", nil)
	c.endpoints(t, "l7", c.web...)
	for f, fam := range families {
		t.Run(fam, func(t *testing.T) {
			vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIPs[f]), 80)
			c.curlSpread(t, f, vip, "one pod answers every request of a connection", func(got map[string]int) bool {
				return len(got) == 1 && got[firstKey(got)] == 30
			})
			pol := &lbv1.L7Policy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "l7-" + fam}, Spec: lbv1.L7PolicySpec{
				TargetRefs: []lbv1.L7TargetReference{{ServiceTargetReference: lbv1.ServiceTargetReference{Name: "l7"}, SectionName: "web"}},
				Protocol:   "HTTP1", Algorithm: "RoundRobin"}}
			if err := c.c.Create(context.Background(), pol); err != nil {
				t.Fatal(err)
			}
			c.curlSpread(t, f, vip, "every pod answers 10 of the 30 requests", func(got map[string]int) bool {
				return len(got) == 3 && got[c.web[0].Name] == 10 && got[c.web[1].Name] == 10 && got[c.web[2].Name] == 10
			})
			if err := c.c.Delete(context.Background(), pol); err != nil {
				t.Fatal(err)
			}
			c.curlSpread(t, f, vip, "one pod again, the policy gone", func(got map[string]int) bool {
				return len(got) == 1 && got[firstKey(got)] == 30
			})
		})
	}
	_ = c.c.Delete(context.Background(), &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "l7"}})
}

// curlSpread runs curl in the probe pod (node-1's cgroup) with 30 URLs, which it fetches over
// one keep-alive connection, until the answers per pod satisfy ok.
func (c *cluster) curlSpread(t *testing.T, f int, to netip.AddrPort, what string, ok func(map[string]int) bool) {
	t.Helper()
	urls := make([]string, 30)
	for i := range urls {
		urls[i] = "http://" + to.String() + "/"
	}
	var got map[string]int
	eventually(t, what, func() error {
		cmd, cg := nstest.CommandIn(t, c.probe.NS, c.net.Nodes[0].Cgroup, "curl", append([]string{"-s", "-m", "5"}, urls...)...)
		out, err := cmd.Output()
		cg.Close()
		got = map[string]int{}
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if p, perr := answeredBy(line, f, c.web...); perr == nil {
				got[p.Name]++
			} else {
				got["? "+line]++
			}
		}
		if err != nil || !ok(got) {
			return fmt.Errorf("curl: %v, answers %v", err, got)
		}
		return nil
	})
}

func firstKey(m map[string]int) string {
	for k := range maps.Keys(m) {
		return k
	}
	return ""
}
