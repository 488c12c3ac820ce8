package allocator

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"k8s.io/apimachinery/pkg/labels"
)

// world is the test's own model of pools and Services, used to check the allocator from the
// outside after every step.
type world struct {
	t        *testing.T
	rng      *rand.Rand
	a        *Allocator
	pools    []Pool
	services map[string]Service
	order    []string // creation order, which a restart replays
	next     int
}

// Small blocks, some overlapping in family, so pools run out and Services compete.
var propertyBlocks = [][]string{
	{"192.0.2.0/29"}, {"192.0.2.8/30", "2001:db8::/126"}, {"2001:db8::10/125"},
	{"198.51.100.0/30"}, {"2001:db8:1::-2001:db8:1::5"}, {"198.51.100.250-198.51.101.3"},
}

func (w *world) randomPools() []Pool {
	var out []Pool
	for i, b := range propertyBlocks {
		if w.rng.IntN(4) == 0 {
			continue // left out, as if deleted or disabled
		}
		p := Pool{Name: fmt.Sprintf("p%d", i), Addresses: set(w.t, b...), AutoAssign: w.rng.IntN(4) != 0,
			AvoidBuggyIPs: w.rng.IntN(3) == 0, Priority: int32(w.rng.IntN(3))}
		if w.rng.IntN(3) == 0 {
			p.ServiceSelector = labels.SelectorFromSet(labels.Set{"tier": []string{"web", "db"}[w.rng.IntN(2)]})
		}
		if w.rng.IntN(4) == 0 {
			p.NamespaceSelector = labels.SelectorFromSet(labels.Set{"team": "a"})
		}
		out = append(out, p)
	}
	return out
}

func (w *world) randomService() Service {
	w.next++
	ns := []string{"a", "b"}[w.rng.IntN(2)]
	s := Service{
		Key:             fmt.Sprintf("%s/s%d", ns, w.next),
		Labels:          labels.Set{"tier": []string{"web", "db"}[w.rng.IntN(2)]},
		NamespaceLabels: labels.Set{"team": ns},
	}
	switch w.rng.IntN(4) {
	case 0:
		s.Families = []Family{IPv6}
	case 1:
		s.Families = []Family{IPv4, IPv6}
		s.PreferFamilies = w.rng.IntN(2) == 0
	default:
		s.Families = []Family{IPv4}
	}
	if w.rng.IntN(3) == 0 {
		s.Sharing.Key = ns + "/" + []string{"x", "y"}[w.rng.IntN(2)]
		s.Sharing.Local = w.rng.IntN(3) == 0
		s.Sharing.Backends = []string{"app=1", "app=2"}[w.rng.IntN(2)]
		for range 1 + w.rng.IntN(2) {
			s.Sharing.Ports = append(s.Sharing.Ports, Port{"TCP", int32(80 + w.rng.IntN(4))})
		}
	}
	switch w.rng.IntN(8) {
	case 0:
		s.Pool = fmt.Sprintf("p%d", w.rng.IntN(len(propertyBlocks)))
	case 1:
		s.RequestedIPs = ips([]string{"192.0.2.3", "192.0.2.9", "2001:db8::2", "198.51.100.255", "203.0.113.1"}[w.rng.IntN(5)])
	}
	return s
}

// reconcileAll does what the controller does after any change: assign every Service, in a
// stable order.
func (w *world) reconcileAll() {
	for _, k := range w.order {
		_, _ = w.a.Assign(w.services[k])
	}
}

func (w *world) restart() {
	before := map[string][]netip.Addr{}
	for _, k := range w.order {
		before[k] = w.a.Assigned(k).IPs
	}
	w.a = New()
	w.a.SetPools(w.pools)
	for _, k := range w.order {
		w.a.Claim(w.services[k], before[k])
	}
	for _, k := range w.order {
		if got := w.a.Assigned(k).IPs; !sameSet(got, before[k]) {
			w.t.Fatalf("restart changed %s: %v -> %v", k, before[k], got)
		}
	}
}

func sameSet(x, y []netip.Addr) bool {
	x, y = slices.Clone(x), slices.Clone(y)
	slices.SortFunc(x, netip.Addr.Compare)
	slices.SortFunc(y, netip.Addr.Compare)
	return slices.Equal(x, y)
}

// check asserts the allocator's invariants against the test's own model.
func (w *world) check(step int, what string) {
	holders := map[netip.Addr][]Service{}
	for _, k := range w.order {
		s := w.services[k]
		for _, ip := range w.a.Assigned(k).IPs {
			holders[ip] = append(holders[ip], s)
			var in *Pool
			for i := range w.pools {
				p := &w.pools[i]
				if p.Addresses.Contains(ip) && !(p.AvoidBuggyIPs && isBuggy(ip)) {
					in = p
					break
				}
			}
			switch {
			case in == nil:
				w.t.Fatalf("step %d (%s): %s holds %s, which is in no enabled pool", step, what, k, ip)
			case s.Pool != "" && in.Name != s.Pool:
				w.t.Fatalf("step %d (%s): %s asked for pool %s but holds %s of %s", step, what, k, s.Pool, ip, in.Name)
			case in.ServiceSelector != nil && !in.ServiceSelector.Matches(s.Labels),
				in.NamespaceSelector != nil && !in.NamespaceSelector.Matches(s.NamespaceLabels):
				w.t.Fatalf("step %d (%s): %s holds %s of pool %s, which does not select it", step, what, k, ip, in.Name)
			case len(s.RequestedIPs) > 0 && !slices.Contains(s.RequestedIPs, ip):
				w.t.Fatalf("step %d (%s): %s requested %v but holds %s", step, what, k, s.RequestedIPs, ip)
			case !slices.Contains(s.Families, FamilyOf(ip)):
				w.t.Fatalf("step %d (%s): %s wants %v but holds %s", step, what, k, s.Families, ip)
			}
		}
	}
	for ip, hs := range holders {
		for i := range hs {
			for j := i + 1; j < len(hs); j++ {
				if err := canShare(hs[i].Sharing, hs[j].Sharing); err != nil {
					w.t.Fatalf("step %d (%s): %s and %s both hold %s but may not share: %v", step, what, hs[i].Key, hs[j].Key, ip, err)
				}
			}
		}
	}
}

func TestRandomStepsKeepInvariants(t *testing.T) {
	steps := 2500
	if testing.Short() {
		steps = 500
	}
	for seed := uint64(1); seed <= 4; seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			runSteps(t, rand.New(rand.NewPCG(seed, 42)), steps)
		})
	}
}

// FuzzSteps drives the same steps from fuzz input instead of a seeded generator.
func FuzzSteps(f *testing.F) {
	f.Add([]byte("\x01\x02\x03\x04\x05\x06\x07\x08"))
	f.Add([]byte("portico allocator fuzz seed with several words in it"))
	f.Fuzz(func(t *testing.T, data []byte) {
		runSteps(t, rand.New(&byteSource{data: data}), 200)
	})
}

// byteSource is a rand.Source that reads its numbers from fuzz input and, once that runs
// out, goes on with a splitmix64 sequence (all zeros would stall rand's rejection sampling).
type byteSource struct {
	data []byte
	off  int
	mix  uint64
}

func (b *byteSource) Uint64() uint64 {
	if b.off+8 <= len(b.data) {
		v := binary.LittleEndian.Uint64(b.data[b.off:])
		b.off += 8
		b.mix ^= v
		return v
	}
	b.mix += 0x9e3779b97f4a7c15
	z := b.mix
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

func runSteps(t *testing.T, rng *rand.Rand, steps int) {
	w := &world{t: t, rng: rng, a: New(), services: map[string]Service{}}
	w.pools = w.randomPools()
	w.a.SetPools(w.pools)
	for step := range steps {
		var what string
		switch r := w.rng.IntN(20); {
		case r < 9:
			s := w.randomService()
			w.services[s.Key] = s
			w.order = append(w.order, s.Key)
			_, _ = w.a.Assign(s)
			what = "create " + s.Key
		case r < 12 && len(w.order) > 0:
			// An edit of the Service: new labels, families, requests, sharing.
			k := w.order[w.rng.IntN(len(w.order))]
			s := w.randomService()
			s.Key, s.NamespaceLabels = k, w.services[k].NamespaceLabels
			w.services[k] = s
			_, _ = w.a.Assign(s)
			what = "update " + k
		case r < 15 && len(w.order) > 0:
			i := w.rng.IntN(len(w.order))
			k := w.order[i]
			w.order = slices.Delete(w.order, i, i+1)
			delete(w.services, k)
			w.a.Release(k)
			what = "delete " + k
		case r < 18:
			w.pools = w.randomPools()
			w.a.SetPools(w.pools)
			w.reconcileAll()
			what = "edit pools"
		default:
			w.restart()
			what = "restart"
		}
		w.check(step, what)
	}
}
