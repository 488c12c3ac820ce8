// Package lbtest holds a loadbalancer.Programmer for tests that need no kernel: it writes
// down what it is told instead of programming maps.
package lbtest

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/portico-dev/portico/internal/loadbalancer"
)

// Recorder writes down each call and keeps what it was told last of each address (any
// scope). FailNext makes the next Update fail, as a full map would. Room, when set, is how
// many addresses it holds, as maps of that size: Apply keeps the first that fit and names
// the rest in a loadbalancer.NotProgrammed; an Update of one more address fails.
type Recorder struct {
	FailNext bool
	Room     int
	mu       sync.Mutex
	calls    []string
	last     map[netip.AddrPort]loadbalancer.Frontend
}

// Apply records every frontend at once.
func (r *Recorder) Apply(fs []loadbalancer.Frontend) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var names []string
	var failed []loadbalancer.Frontend
	r.last = map[netip.AddrPort]loadbalancer.Frontend{}
	for _, f := range fs {
		if r.full(f) {
			failed = append(failed, f)
			continue
		}
		names = append(names, describe(f))
		r.last[f.Address] = f
	}
	slices.Sort(names)
	r.calls = append(r.calls, "apply "+strings.Join(names, " "))
	if len(failed) > 0 {
		return &loadbalancer.NotProgrammed{Failed: failed, Err: errFull}
	}
	return nil
}

var errFull = fmt.Errorf("map full: %w", loadbalancer.ErrFull)

// full says whether f is one address more than there is room for.
func (r *Recorder) full(f loadbalancer.Frontend) bool {
	_, held := r.last[f.Address]
	return r.Room > 0 && !held && len(r.last) >= r.Room
}

// Update records one frontend, or fails once after FailNext.
func (r *Recorder) Update(f loadbalancer.Frontend) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.FailNext || r.full(f) {
		r.FailNext = false
		return errFull
	}
	r.calls = append(r.calls, "update "+describe(f))
	if r.last == nil {
		r.last = map[netip.AddrPort]loadbalancer.Frontend{}
	}
	r.last[f.Address] = f
	return nil
}

// Delete records a removal.
func (r *Recorder) Delete(addr netip.AddrPort, _ loadbalancer.Protocol, _ loadbalancer.Scope) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, fmt.Sprintf("delete %s", addr))
	delete(r.last, addr)
	return nil
}

// Take returns the calls since the last Take, sorted (a Syncer's order among slots is
// free): "apply A->B ...", "update A->B,C", "delete A".
func (r *Recorder) Take() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := slices.Clone(r.calls)
	r.calls = nil
	slices.Sort(c)
	return strings.Join(c, "; ")
}

// Frontend returns what the recorder was last told of an address.
func (r *Recorder) Frontend(addr netip.AddrPort) (loadbalancer.Frontend, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f, ok := r.last[addr]
	return f, ok
}

func describe(f loadbalancer.Frontend) string {
	var bs []string
	for _, b := range f.Backends {
		bs = append(bs, b.Address.String())
	}
	return fmt.Sprintf("%s->%s", f.Address, strings.Join(bs, ","))
}
