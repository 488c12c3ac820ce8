package operator_test

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/portico-dev/portico/internal/allocator"
	"github.com/portico-dev/portico/internal/operator"
	"github.com/portico-dev/portico/test/harness/wait"
)

// The operator's metrics follow what it does: a pool's allocated and available addresses
// per family, the Services waiting for an address, allocation times; a deleted pool's series
// go with it.
func TestOperatorMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	startOperator(t, operator.Options{Registry: reg})
	f := newFixture(t)
	p := f.pool("p", nil, "192.0.2.0/31", "2001:db8:7::/127")
	// value is one sample of a metric family in reg, by labels ("" when there is none).
	value := func(name string, labels map[string]string) string {
		families, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range families {
			if mf.GetName() != name {
				continue
			}
		samples:
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if want, ok := labels[l.GetName()]; ok && want != l.GetValue() {
						continue samples
					}
				}
				switch {
				case m.Gauge != nil:
					return fmt.Sprint(m.Gauge.GetValue())
				case m.Histogram != nil:
					return fmt.Sprint(m.Histogram.GetSampleCount() > 0)
				}
			}
		}
		return ""
	}
	want := func(name string, labels map[string]string, v string) {
		t.Helper()
		wait.For(t, "", func() error {
			if got := value(name, labels); got != v {
				return fmt.Errorf("%s%v = %q; want %q", name, labels, got, v)
			}
			return nil
		})
	}
	addrs := func(family, state string) map[string]string {
		return map[string]string{"pool": p.Name, "family": family, "state": state}
	}
	want("portico_pool_addresses", addrs("ipv4", "available"), "2")
	want("portico_pool_addresses", addrs("ipv6", "available"), "2")
	// The gauge counts the whole cluster's Services, and earlier tests leave some waiting:
	// count from where it settles.
	var base float64
	for stable := 0; stable < 10; time.Sleep(100 * time.Millisecond) {
		v, _ := strconv.ParseFloat(value("portico_services_waiting", nil), 64)
		if v == base {
			stable++
		} else {
			base, stable = v, 0
		}
	}
	waiting := func(n float64) string { return fmt.Sprint(base + n) }
	for _, name := range []string{"a", "b", "c"} {
		f.service(name, func(s *corev1.Service) { s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv4Protocol} })
	}
	want("portico_pool_addresses", addrs("ipv4", "allocated"), "2")
	want("portico_pool_addresses", addrs("ipv4", "available"), "0")
	want("portico_services_waiting", nil, waiting(1)) // two addresses, three Services
	want("portico_allocation_duration_seconds", nil, "true")
	f.waitCondition("c", metav1.ConditionFalse, string(allocator.ReasonPoolExhausted))

	if err := env.Client.Delete(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	want("portico_pool_addresses", addrs("ipv4", "allocated"), "")
	want("portico_services_waiting", nil, waiting(3))
}
