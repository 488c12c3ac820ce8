package maglev

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

func backends(n int) []Backend {
	out := make([]Backend, n)
	for i := range out {
		out[i] = Backend{Name: fmt.Sprintf("10.0.%d.%d:8080", i/250, i%250+1), Weight: 1}
	}
	return out
}

func names(t testing.TB, table []int, bs []Backend) []string {
	t.Helper()
	out := make([]string, len(table))
	for i, idx := range table {
		out[i] = bs[idx].Name
	}
	return out
}

func mustTable(t testing.TB, cfg Config, bs []Backend) []int {
	t.Helper()
	g, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	table, err := g.Table(bs)
	if err != nil {
		t.Fatal(err)
	}
	return table
}

// The table is a contract between nodes, and between versions during an upgrade: every node
// must pick the same backend for a flow. A change here is a breaking change.
func TestGoldenTable(t *testing.T) {
	bs := []Backend{{Name: "a", Weight: 1}, {Name: "b", Weight: 1}, {Name: "c", Weight: 2}}
	got := strings.Join(names(t, mustTable(t, Config{TableSize: 13, Seed: 42}, bs), bs), "")
	const want = "ccabbbacccacc"
	if got != want {
		t.Fatalf("table = %s, want %s", got, want)
	}
}

// disruption removes one backend at a time (every ninth of 100) and returns the worst share of
// the table that moved beyond the minimum, which is the removed backend's own entries.
func disruption(t *testing.T, m, seed uint64) float64 {
	bs := backends(100)
	before := mustTable(t, Config{TableSize: m, Seed: seed}, bs)
	worst := 0
	for gone := 0; gone < len(bs); gone += 9 {
		rest := slices.Delete(slices.Clone(bs), gone, gone+1)
		after := names(t, mustTable(t, Config{TableSize: m, Seed: seed}, rest), rest)
		moved := 0
		for i, idx := range before {
			if idx != gone && bs[idx].Name != after[i] {
				moved++
			}
		}
		worst = max(worst, moved)
	}
	return float64(worst) / float64(m)
}

// The paper's bound: removing one of 100 backends moves at most 1% of the other entries. The
// classic algorithm meets it from about 300 entries per backend; every seed is checked, so
// the bound does not rest on a lucky one. The default size (about 160 per backend) moves
// 1.3-1.5%, logged beside plain hash-mod-N.
func TestRemovingOneOfHundredBackendsMovesFewOtherEntries(t *testing.T) {
	for seed := uint64(1); seed <= 8; seed++ {
		if d := disruption(t, 32749, seed); d > 0.01 {
			t.Errorf("table 32749, seed %d: removing one of 100 backends moved %.2f%% of other entries, want <= 1%%", seed, 100*d)
		}
	}
	bs := backends(100)
	modMoved := 0
	for h := range DefaultTableSize {
		if bs[h%100].Name != bs[h%99].Name {
			modMoved++
		}
	}
	t.Logf("removing 1 of 100 backends, entries moved beyond the minimum: maglev %d entries %.2f%%, maglev 32749 %.2f%%, hash mod N %.1f%%",
		DefaultTableSize, 100*disruption(t, DefaultTableSize, 1), 100*disruption(t, 32749, 1), 100*float64(modMoved)/DefaultTableSize)
}

func TestEqualWeightsSpreadEvenly(t *testing.T) {
	for _, n := range []int{1, 3, 100, 1000} {
		bs := backends(n)
		counts := make([]int, n)
		for _, idx := range mustTable(t, Config{}, bs) {
			counts[idx]++
		}
		if lo, hi := slices.Min(counts), slices.Max(counts); hi-lo > 1 {
			t.Errorf("%d backends: entries per backend from %d to %d, want a spread of at most 1", n, lo, hi)
		}
	}
}

func TestWeights(t *testing.T) {
	bs := []Backend{{Name: "light", Weight: 1}, {Name: "heavy", Weight: 3}, {Name: "off", Weight: 0}}
	counts := map[string]int{}
	for _, name := range names(t, mustTable(t, Config{}, bs), bs) {
		counts[name]++
	}
	ratio := float64(counts["heavy"]) / float64(counts["light"])
	if ratio < 2.9 || ratio > 3.1 || counts["off"] != 0 {
		t.Fatalf("counts %v: heavy/light = %.2f, want 3, and none for weight 0", counts, ratio)
	}
}

func TestTableIgnoresBackendOrder(t *testing.T) {
	bs := backends(37)
	want := names(t, mustTable(t, Config{TableSize: 4093}, bs), bs)
	shuffled := slices.Clone(bs)
	rand.New(rand.NewPCG(1, 2)).Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
	if got := names(t, mustTable(t, Config{TableSize: 4093}, shuffled), shuffled); !slices.Equal(got, want) {
		t.Fatal("the table depends on the order of the backends")
	}
}

func TestSeedChangesTheTable(t *testing.T) {
	bs := backends(10)
	a := names(t, mustTable(t, Config{Seed: 1}, bs), bs)
	b := names(t, mustTable(t, Config{Seed: 2}, bs), bs)
	if slices.Equal(a, b) {
		t.Fatal("two seeds built the same table")
	}
}

func TestBadInput(t *testing.T) {
	for _, size := range []uint64{1, 4, 16384, 65537 * 3, 262139} {
		if _, err := New(Config{TableSize: size}); err == nil {
			t.Errorf("table size %d accepted", size)
		}
	}
	g, _ := New(Config{TableSize: 251})
	if _, err := g.Table([]Backend{{Name: "x", Weight: 1}, {Name: "x", Weight: 2}}); err == nil {
		t.Error("duplicate backend names accepted")
	}
	if table, err := g.Table([]Backend{{Name: "x"}}); table != nil || err != nil {
		t.Errorf("no weighted backend: table %v, err %v; want nil, nil", table, err)
	}
}

func BenchmarkTable(b *testing.B) {
	for _, tc := range []struct {
		size uint64
		n    int
	}{{DefaultTableSize, 100}, {DefaultTableSize, 1000}, {65521, 100}} {
		b.Run(fmt.Sprintf("%dx%d", tc.size, tc.n), func(b *testing.B) {
			g, _ := New(Config{TableSize: tc.size})
			bs := backends(tc.n)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := g.Table(bs); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
