package allocator

import (
	"fmt"
	"net/netip"
	"testing"
)

// BenchmarkAssign allocates one address and releases it again, with 10,000 addresses in use.
// The firstFreeScan rows are the baseline measured in the same run: a search from the start
// of the pool for the first free address, which is what a simple allocator does.
func BenchmarkAssign(b *testing.B) {
	for _, tc := range []struct {
		name   string
		block  string
		family Family
	}{{"v4-slash16", "10.0.0.0/16", IPv4}, {"v6-slash64", "2001:db8::/64", IPv6}} {
		b.Run("portico/"+tc.name, func(b *testing.B) {
			a := New()
			a.SetPools([]Pool{mkPool(b, "p", tc.block)})
			for i := range 10000 {
				if _, err := a.Assign(svc(fmt.Sprintf("ns/held%d", i), tc.family)); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				key := fmt.Sprintf("ns/new%d", i)
				if _, err := a.Assign(svc(key, tc.family)); err != nil {
					b.Fatal(err)
				}
				a.Release(key)
			}
		})
		b.Run("firstFreeScan/"+tc.name, func(b *testing.B) {
			first := netip.MustParsePrefix(tc.block).Addr()
			taken := map[netip.Addr]string{}
			ip := first
			for i := range 10000 {
				taken[ip] = fmt.Sprintf("ns/held%d", i)
				ip = ip.Next()
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				ip := first
				for _, used := taken[ip]; used; _, used = taken[ip] {
					ip = ip.Next()
				}
				taken[ip] = fmt.Sprintf("ns/new%d", i)
				delete(taken, ip)
			}
		})
	}
}
