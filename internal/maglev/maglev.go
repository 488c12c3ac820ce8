// Package maglev builds Maglev consistent-hashing lookup tables (Eisenbud et al., NSDI 2016):
// a table of prime size M whose entries name backends, so that a flow's hash picks
// table[hash % M]. Every backend gets an almost equal share of entries (in proportion to its
// weight), and when one backend goes, few entries that named other backends change.
//
// A table depends only on the backends' names and weights, the table size and the seed: every
// node that builds it for the same backends gets the same table, whatever order it lists them
// in, so every node sends one flow to the same backend.
package maglev

import (
	"cmp"
	"errors"
	"fmt"
	"slices"

	"github.com/cespare/xxhash/v2"
)

// DefaultTableSize is the table size used when none is given: a prime that keeps every
// backend's share within about 1% for up to 100 backends.
const DefaultTableSize = 16381

// MaxTableSize bounds the table, and so the memory of one Service's table in the datapath.
const MaxTableSize = 131071

// Config chooses the table size and the hash seed.
type Config struct {
	// TableSize is M, a prime; 0 means DefaultTableSize. It should be well above 100 times the
	// number of backends for an even spread.
	TableSize uint64
	// Seed varies the hashes, so that clusters do not share one mapping. Every node of a
	// cluster must use the same seed.
	Seed uint64
}

// Maglev builds tables for one configuration.
// It is safe for concurrent use.
type Maglev struct {
	m          uint64
	offsetSeed uint64
	skipSeed   uint64
}

// New validates a configuration.
func New(cfg Config) (*Maglev, error) {
	m := cfg.TableSize
	if m == 0 {
		m = DefaultTableSize
	}
	if m > MaxTableSize || !isPrime(m) {
		return nil, fmt.Errorf("maglev table size %d: must be a prime no larger than %d", m, MaxTableSize)
	}
	// Two seeds derived from one, so that offset and skip are independent hashes.
	return &Maglev{m: m, offsetSeed: cfg.Seed, skipSeed: cfg.Seed ^ 0x9e3779b97f4a7c15}, nil
}

// Backend is one backend: a name unique among the backends (its address and port, say) and
// a weight. Weight 0 keeps the backend out of the table.
type Backend struct {
	Name   string
	Weight uint32
}

// Table returns the lookup table: M indexes into backends. It returns nil when no backend
// has a weight, and an error for duplicate names.
func (g *Maglev) Table(backends []Backend) ([]int, error) {
	type state struct {
		index     int // into backends
		weight    uint64
		target    uint64 // the round weight the backend must reach before its next turn
		pos, skip uint64 // its permutation: pos, pos+skip, pos+2*skip, ... (mod M)
		name      string
	}
	var live []*state
	var maxWeight uint64
	for i, b := range backends {
		if b.Weight == 0 {
			continue
		}
		live = append(live, &state{index: i, weight: uint64(b.Weight), name: b.Name})
		maxWeight = max(maxWeight, uint64(b.Weight))
	}
	if len(live) == 0 {
		return nil, nil
	}
	// Turns go in name order, so the table does not depend on the caller's order.
	slices.SortFunc(live, func(a, b *state) int { return cmp.Compare(a.name, b.name) })
	for i := 1; i < len(live); i++ {
		if live[i].name == live[i-1].name {
			return nil, errors.New("maglev: two backends named " + live[i].name)
		}
	}
	for _, s := range live {
		s.pos = g.hash(g.offsetSeed, s.name) % g.m
		s.skip = g.hash(g.skipSeed, s.name)%(g.m-1) + 1
		s.target = maxWeight
	}

	table := make([]int, g.m)
	for i := range table {
		table[i] = -1
	}
	filled := uint64(0)
	// In round r a backend takes a turn when r*weight has reached its target; a backend of the
	// largest weight takes one every round, one of a third of it every third round.
	for round := uint64(1); filled < g.m; round++ {
		for _, s := range live {
			if round*s.weight < s.target {
				continue
			}
			s.target += maxWeight
			for table[s.pos] >= 0 {
				s.pos = (s.pos + s.skip) % g.m
			}
			table[s.pos] = s.index
			s.pos = (s.pos + s.skip) % g.m
			if filled++; filled == g.m {
				break
			}
		}
	}
	return table, nil
}

func (g *Maglev) hash(seed uint64, name string) uint64 {
	d := xxhash.NewWithSeed(seed)
	_, _ = d.WriteString(name)
	return d.Sum64()
}

func isPrime(n uint64) bool {
	if n < 2 {
		return false
	}
	for d := uint64(2); d*d <= n; d++ {
		if n%d == 0 {
			return false
		}
	}
	return true
}
