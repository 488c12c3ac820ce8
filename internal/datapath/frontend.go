package datapath

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/internal/maglev"
)

// Flags of a frontend and of a backend, as bpf/lib/lb.h defines them.
const (
	svcMaglev       = 0x1
	svcAffinity     = 0x2
	svcSourceRanges = 0x4
	backendLocal    = 0x1
)

// tables keeps the maps equal to the desired frontends. It mirrors what it wrote, so that an
// update writes only what changed, and rebuilds that mirror from pinned maps after a restart.
type tables struct {
	// Backends are numbered (one numbering for both families); a number is reused once its
	// backend is gone. numbered holds each number's backend (index 0 is never used): a
	// dense slice, as the numbers are, costs a fraction of maps at 100,000 backends.
	ids      map[backendRef]uint32
	numbered []numbered
	free     []uint32
	// Frontend numbers are never reused, so that affinity entries of a deleted frontend
	// cannot apply to a new one.
	lastFrontend uint32
	applied4     *mirror[sockLBSvc4Key]
	applied6     *mirror[sockLBSvc6Key]
	ranges       map[uint32][]netip.Prefix // source ranges written, by frontend number
	maglevOf     map[uint32]string         // whose Maglev table each frontend's table was built from
	// pend4 and pend6 collect the writes of an Apply into empty maps (nil otherwise).
	pend4 *pending[sockLBSvc4Key, sockLBBackend4]
	pend6 *pending[sockLBSvc6Key, sockLBBackend6]
	// fault, when set (by tests), is asked before each service and backend map write and
	// fails it with what it returns.
	fault func() error
}

// pending holds the writes of an Apply into empty maps, made at the end in a few batches
// (BPF_MAP_UPDATE_BATCH) instead of a syscall per entry: backends, then slots, then the
// frontend entries, so that no frontend is visible before its backends.
type pending[K comparable, B any] struct {
	beKeys             []uint32
	beVals             []B
	slotKeys, headKeys []K
	slotVals, headVals []sockLBSvcValue
}

// backendRef is a backend's address, port and protocol, without pointers (netip.Addr has
// one): the garbage collector does not scan a map of hundreds of thousands of them.
type backendRef struct {
	addr  [16]byte // IPv4 as IPv4-mapped
	port  uint16
	proto loadbalancer.Protocol
	is4   bool
}

func refOf(a netip.AddrPort, proto loadbalancer.Protocol) backendRef {
	return backendRef{a.Addr().As16(), a.Port(), proto, a.Addr().Is4()}
}

// address is the backend's address and port.
func (r backendRef) address() netip.AddrPort {
	a := netip.AddrFrom16(r.addr)
	if r.is4 {
		a = a.Unmap()
	}
	return netip.AddrPortFrom(a, r.port)
}

// numbered is what a backend number stands for.
type numbered struct {
	ref     backendRef
	inUse   bool
	written bool  // the backends map holds it, with flags
	flags   uint8 // as written
	refs    int32 // how many slots in the mirror name it; put and del keep it so
}

func newTables() tables {
	return tables{ids: map[backendRef]uint32{}, numbered: make([]numbered, 1), applied4: newMirror(ipv4.slot, ipv4.withSlot),
		applied6: newMirror(ipv6.slot, ipv6.withSlot), ranges: map[uint32][]netip.Prefix{}, maglevOf: map[uint32]string{}}
}

// adopt rebuilds the mirror and the numbering from adopted maps.
func (d *Datapath) adopt() error {
	if err := errors.Join(readMirror(d.sock.PorticoSvc4, d.applied4), readMirror(d.sock.PorticoSvc6, d.applied6)); err != nil {
		return fmt.Errorf("read adopted service maps: %w", err)
	}
	var id uint32
	var b4 sockLBBackend4
	it4 := d.sock.PorticoBe4.Iterate()
	for it4.Next(&id, &b4) {
		d.adoptID(id, refOf(netip.AddrPortFrom(netip.AddrFrom4(bytes4(b4.Address)), unport(b4.Port)), loadbalancer.Protocol(b4.Proto)), b4.Flags)
	}
	var b6 sockLBBackend6
	it6 := d.sock.PorticoBe6.Iterate()
	for it6.Next(&id, &b6) {
		d.adoptID(id, refOf(netip.AddrPortFrom(netip.AddrFrom16(bytes16(b6.Address)), unport(b6.Port)), loadbalancer.Protocol(b6.Proto)), b6.Flags)
	}
	var r4 sockLBSrcrange4Key
	var r6 sockLBSrcrange6Key
	var allow uint8
	itr4, itr6 := d.sock.PorticoSrcrange4.Iterate(), d.sock.PorticoSrcrange6.Iterate()
	for itr4.Next(&r4, &allow) {
		d.ranges[r4.Id] = append(d.ranges[r4.Id], netip.PrefixFrom(netip.AddrFrom4(bytes4(r4.Address)), int(r4.Prefixlen)-32))
	}
	for itr6.Next(&r6, &allow) {
		d.ranges[r6.Id] = append(d.ranges[r6.Id], netip.PrefixFrom(netip.AddrFrom16(bytes16(r6.Address)), int(r6.Prefixlen)-32))
	}
	if err := errors.Join(it4.Err(), it6.Err(), itr4.Err(), itr6.Err()); err != nil {
		return fmt.Errorf("read adopted backends and source ranges: %w", err)
	}
	adoptSlots(d, d.applied4)
	adoptSlots(d, d.applied6)
	for i := 1; i < len(d.numbered); i++ {
		if !d.numbered[i].inUse {
			d.free = append(d.free, uint32(i))
		}
	}
	return nil
}

func adoptSlots[K comparable](d *Datapath, applied *mirror[K]) {
	for _, f := range applied.frontends {
		if f.hasHead {
			d.lastFrontend = max(d.lastFrontend, f.head.Id)
		}
		for _, id := range f.slots {
			if id != 0 {
				d.count(id, 1)
			}
		}
	}
}

func readMirror[K comparable](m *ebpf.Map, into *mirror[K]) error {
	var k K
	var v sockLBSvcValue
	it := m.Iterate()
	for it.Next(&k, &v) {
		into.set(k, v)
	}
	return it.Err()
}

func (d *Datapath) adoptID(id uint32, ref backendRef, flags uint8) {
	if id == 0 {
		return
	}
	for int(id) >= len(d.numbered) {
		d.numbered = append(d.numbered, numbered{})
	}
	d.ids[ref] = id
	d.numbered[id] = numbered{ref: ref, inUse: true, written: true, flags: flags}
}

// family describes one IP family's maps and how its keys and entries are laid out.
type family[K comparable, B any, R any] struct {
	svc, be, srcrange *ebpf.Map
	applied           *mirror[K]
	pend              *pending[K, B]
	fault             func() error
	is                func(netip.Addr) bool
	key               func(f netip.AddrPort, proto loadbalancer.Protocol, scope loadbalancer.Scope, slot uint16) K
	slot              func(K) uint16
	withSlot          func(K, uint16) K
	backend           func(b netip.AddrPort, proto loadbalancer.Protocol, flags uint8) B
	rangeKey          func(id uint32, p netip.Prefix) R
}

var (
	ipv4 = family[sockLBSvc4Key, sockLBBackend4, sockLBSrcrange4Key]{
		is: netip.Addr.Is4,
		key: func(f netip.AddrPort, proto loadbalancer.Protocol, scope loadbalancer.Scope, slot uint16) sockLBSvc4Key {
			return sockLBSvc4Key{Address: addr4(f.Addr()), Port: port(f.Port()), Proto: uint8(proto), Scope: uint8(scope), Slot: slot}
		},
		slot:     func(k sockLBSvc4Key) uint16 { return k.Slot },
		withSlot: func(k sockLBSvc4Key, slot uint16) sockLBSvc4Key { k.Slot = slot; return k },
		backend: func(b netip.AddrPort, proto loadbalancer.Protocol, flags uint8) sockLBBackend4 {
			return sockLBBackend4{Address: addr4(b.Addr()), Port: port(b.Port()), Proto: uint8(proto), Flags: flags}
		},
		rangeKey: func(id uint32, p netip.Prefix) sockLBSrcrange4Key {
			return sockLBSrcrange4Key{Prefixlen: uint32(32 + p.Bits()), Id: id, Address: addr4(p.Masked().Addr())}
		},
	}
	ipv6 = family[sockLBSvc6Key, sockLBBackend6, sockLBSrcrange6Key]{
		is: func(a netip.Addr) bool { return a.Is6() && !a.Is4In6() },
		key: func(f netip.AddrPort, proto loadbalancer.Protocol, scope loadbalancer.Scope, slot uint16) sockLBSvc6Key {
			return sockLBSvc6Key{Address: addr6(f.Addr()), Port: port(f.Port()), Proto: uint8(proto), Scope: uint8(scope), Slot: slot}
		},
		slot:     func(k sockLBSvc6Key) uint16 { return k.Slot },
		withSlot: func(k sockLBSvc6Key, slot uint16) sockLBSvc6Key { k.Slot = slot; return k },
		backend: func(b netip.AddrPort, proto loadbalancer.Protocol, flags uint8) sockLBBackend6 {
			return sockLBBackend6{Address: addr6(b.Addr()), Port: port(b.Port()), Proto: uint8(proto), Flags: flags}
		},
		rangeKey: func(id uint32, p netip.Prefix) sockLBSrcrange6Key {
			return sockLBSrcrange6Key{Prefixlen: uint32(32 + p.Bits()), Id: id, Address: addr6(p.Masked().Addr())}
		},
	}
)

func (d *Datapath) v4() family[sockLBSvc4Key, sockLBBackend4, sockLBSrcrange4Key] {
	fam := ipv4
	fam.svc, fam.be, fam.srcrange, fam.applied, fam.pend, fam.fault = d.sock.PorticoSvc4, d.sock.PorticoBe4, d.sock.PorticoSrcrange4, d.applied4, d.pend4, d.fault
	return fam
}

func (d *Datapath) v6() family[sockLBSvc6Key, sockLBBackend6, sockLBSrcrange6Key] {
	fam := ipv6
	fam.svc, fam.be, fam.srcrange, fam.applied, fam.pend, fam.fault = d.sock.PorticoSvc6, d.sock.PorticoBe6, d.sock.PorticoSrcrange6, d.applied6, d.pend6, d.fault
	return fam
}

// Apply makes the maps hold exactly these frontends (a full resync): it deletes the
// frontends it does not list, then writes each one. Into empty maps (a first start) it
// writes in batches. What does not fit (a full map) is left out in the order given, so that
// the frontends listed first win on every node and every restart: Apply then returns a
// *loadbalancer.NotProgrammed naming them, with every other frontend in place.
func (d *Datapath) Apply(frontends []loadbalancer.Frontend) error {
	for _, f := range frontends {
		if err := validate(f); err != nil {
			return err
		}
	}
	err := d.apply(frontends)
	var notAll *loadbalancer.NotProgrammed
	if (err == nil || errors.As(err, &notAll)) && len(d.rebuilt) > 0 {
		err = errors.Join(err, d.settle())
	}
	return err
}

func (d *Datapath) apply(frontends []loadbalancer.Frontend) error {
	keep := frontends
	if d.applied4.entries == 0 && d.applied6.entries == 0 {
		written, err := d.applyIntoEmpty(frontends)
		if written || err != nil {
			return err
		}
		// A batch failed, most likely for room. Its entries may fill a map with slots of
		// frontends whose entry never came: they all go, and the frontends are written one
		// at a time, as many as fit.
		keep = nil
	}
	// Frontends no longer listed go first, and backends no slot names: they make room.
	if err := errors.Join(deleteUnlisted(d, d.v4(), keep), deleteUnlisted(d, d.v6(), keep),
		sweep(d, d.v4()), sweep(d, d.v6())); err != nil {
		return err
	}
	var failed []loadbalancer.Frontend
	var first error
	for _, f := range frontends {
		if err := d.Update(f); err != nil {
			failed = append(failed, f)
			first = cmp.Or(first, err)
		}
	}
	if len(failed) > 0 {
		return &loadbalancer.NotProgrammed{Failed: failed, Err: first}
	}
	return nil
}

// applyIntoEmpty is Apply into empty maps: the entries are collected, then written in a few
// batches. When a write fails it reads the mirror back from the maps, which may hold part
// of it, and says nothing was written; err is only a failure to read them.
func (d *Datapath) applyIntoEmpty(frontends []loadbalancer.Frontend) (written bool, err error) {
	d.pend4, d.pend6 = &pending[sockLBSvc4Key, sockLBBackend4]{}, &pending[sockLBSvc6Key, sockLBBackend6]{}
	for _, f := range frontends {
		if err = d.Update(f); err != nil {
			break
		}
	}
	if err == nil {
		err = errors.Join(flush(d.v4()), flush(d.v6()))
	}
	d.pend4, d.pend6 = nil, nil
	if err == nil {
		return true, nil
	}
	fault := d.fault
	d.tables = newTables()
	d.fault = fault
	if err := d.adopt(); err != nil {
		return false, fmt.Errorf("read back the maps after a failed first write: %w", err)
	}
	return false, nil
}

// sweep removes the family's backends that no slot names: what a failed batch left.
func sweep[K comparable, B any, R any](d *Datapath, fam family[K, B, R]) error {
	var ids []uint32
	for id, n := range d.numbered {
		if n.inUse && n.refs == 0 && fam.is(n.ref.address().Addr()) {
			ids = append(ids, uint32(id))
		}
	}
	return release(d, fam, ids)
}

// flush writes a family's pending entries, backends first and frontend entries last.
func flush[K comparable, B any, R any](fam family[K, B, R]) error {
	p := fam.pend
	for _, w := range []struct {
		m          *ebpf.Map
		keys, vals any
		n          int
	}{{fam.be, p.beKeys, p.beVals, len(p.beKeys)}, {fam.svc, p.slotKeys, p.slotVals, len(p.slotKeys)}, {fam.svc, p.headKeys, p.headVals, len(p.headKeys)}} {
		if w.n == 0 {
			continue
		}
		if _, err := w.m.BatchUpdate(w.keys, w.vals, nil); err != nil {
			return fmt.Errorf("batch of %d entries: %w", w.n, err)
		}
	}
	return nil
}

// Update adds a frontend or changes it, in an order that never lets a reader see it without
// backends: new backends, slots, Maglev table and source ranges first, then the frontend
// entry with its count (one atomic update), then what is no longer used. It touches only this
// frontend's entries, whatever the number of others.
func (d *Datapath) Update(f loadbalancer.Frontend) error {
	if err := validate(f); err != nil {
		return err
	}
	if f.Address.Addr().Is4() {
		return update(d, d.v4(), f)
	}
	return update(d, d.v6(), f)
}

// Delete removes a frontend's entry in one scope; flows already on a backend stay there.
func (d *Datapath) Delete(addr netip.AddrPort, proto loadbalancer.Protocol, scope loadbalancer.Scope) error {
	if addr.Addr().Is4() {
		fam := d.v4()
		return deleteFrontend(d, fam, fam.key(addr, proto, scope, 0))
	}
	fam := d.v6()
	return deleteFrontend(d, fam, fam.key(addr, proto, scope, 0))
}

func validate(f loadbalancer.Frontend) error {
	if f.Address.Addr().Is4In6() || f.Address.Addr().Zone() != "" {
		return fmt.Errorf("frontend %s: IPv4-mapped and zoned addresses are not frontends", f.Address)
	}
	if f.Protocol != loadbalancer.TCP && f.Protocol != loadbalancer.UDP {
		return fmt.Errorf("frontend %s: protocol %d, want TCP (6) or UDP (17)", f.Address, f.Protocol)
	}
	if f.Scope != loadbalancer.External && f.Scope != loadbalancer.Internal {
		return fmt.Errorf("frontend %s: unknown scope %d", f.Address, f.Scope)
	}
	if len(f.Backends) > math.MaxUint16 {
		return fmt.Errorf("frontend %s: %d backends, at most %d", f.Address, len(f.Backends), math.MaxUint16)
	}
	if f.Affinity < 0 || f.Affinity > math.MaxUint32*time.Second {
		return fmt.Errorf("frontend %s: affinity timeout %s out of range", f.Address, f.Affinity)
	}
	seen := make(map[netip.AddrPort]bool, len(f.Backends))
	for _, b := range f.Backends {
		if b.Address.Addr().Is4() != f.Address.Addr().Is4() {
			return fmt.Errorf("frontend %s: backend %s is of the other IP family", f.Address, b.Address)
		}
		if seen[b.Address] {
			return fmt.Errorf("frontend %s: backend %s listed twice", f.Address, b.Address)
		}
		seen[b.Address] = true
	}
	for _, p := range f.SourceRanges {
		if !p.IsValid() || p.Addr().Is4() != f.Address.Addr().Is4() {
			return fmt.Errorf("frontend %s: source range %s is not a prefix of its IP family", f.Address, p)
		}
	}
	return nil
}

// arrange orders the backends as the slots hold them: those to pick from first (the ready
// ones, or the terminating ones when none is ready), then the terminating ones kept for
// their flows.
func arrange(backends []loadbalancer.Backend) (slots []loadbalancer.Backend, count int) {
	for _, b := range backends {
		if !b.Terminating {
			slots = append(slots, b)
		}
	}
	count = len(slots)
	for _, b := range backends {
		if b.Terminating {
			slots = append(slots, b)
		}
	}
	if count == 0 {
		count = len(slots)
	}
	return slots, count
}

func update[K comparable, B any, R any](d *Datapath, fam family[K, B, R], f loadbalancer.Frontend) error {
	head := fam.key(f.Address, f.Protocol, f.Scope, 0)
	old := slotBackends(fam, head)
	slots, count := arrange(f.Backends)
	ids := make([]uint32, 0, len(slots))
	err := writeFrontend(d, fam, f, head, slots, count, &ids)
	// Whether or not every write went through, the backends no slot names any more go: the
	// old ones replaced, and new ones a failed write left unnamed.
	return errors.Join(err, release(d, fam, append(old, ids...)))
}

// writeFrontend writes a frontend's backends and slots, its Maglev table and source ranges,
// then its entry, then removes what it no longer uses; ids collects the backend numbers it
// took. On a failed write it stops: the mirror says what the maps hold.
func writeFrontend[K comparable, B any, R any](d *Datapath, fam family[K, B, R], f loadbalancer.Frontend, head K, slots []loadbalancer.Backend, count int, ids *[]uint32) error {
	prev, exists := fam.applied.get(head)
	id := prev.Id
	if !exists {
		d.lastFrontend++
		id = d.lastFrontend
	}
	for i, b := range slots {
		n := d.id(refOf(b.Address, f.Protocol))
		*ids = append(*ids, n)
		var flags uint8
		if b.Local {
			flags |= backendLocal
		}
		if nb := &d.numbered[n]; !nb.written || nb.flags != flags {
			if err := putBackend(fam, n, fam.backend(b.Address, f.Protocol, flags)); err != nil {
				return fmt.Errorf("write backend %s: %w", b.Address, err)
			}
			nb.written, nb.flags = true, flags
		}
		if err := put(d, fam, fam.key(f.Address, f.Protocol, f.Scope, uint16(i+1)), sockLBSvcValue{BackendId: n}); err != nil {
			return fmt.Errorf("write slot %d of %s: %w", i+1, f.Address, err)
		}
	}
	value := sockLBSvcValue{Count: uint16(count), Id: id, AffinityTimeout: uint32(f.Affinity / time.Second)}
	if f.Balancing == loadbalancer.Maglev && count > 0 {
		if err := d.writeMaglev(id, slots[:count], (*ids)[:count]); err != nil {
			return fmt.Errorf("write the Maglev table of %s: %w", f.Address, err)
		}
		value.Flags |= svcMaglev
	}
	if f.Affinity > 0 {
		value.Flags |= svcAffinity
		value.AffinityTimeout = max(value.AffinityTimeout, 1)
	}
	if len(f.SourceRanges) > 0 {
		for _, p := range f.SourceRanges {
			if !slices.Contains(d.ranges[id], p.Masked()) {
				if err := fam.srcrange.Put(fam.rangeKey(id, p), uint8(1)); err != nil {
					return fmt.Errorf("write source range %s of %s: %w", p, f.Address, err)
				}
				d.ranges[id] = append(d.ranges[id], p.Masked())
			}
		}
		value.Flags |= svcSourceRanges
	}
	if err := put(d, fam, head, value); err != nil {
		return fmt.Errorf("write frontend %s: %w", f.Address, err)
	}
	// Slots beyond the new ones go from the last, so that a failure leaves no gap.
	last := uint16(len(slots))
	for _, ok := fam.applied.get(fam.withSlot(head, last+1)); ok; _, ok = fam.applied.get(fam.withSlot(head, last+1)) {
		last++
	}
	for i := last; i > uint16(len(slots)); i-- {
		if err := del(d, fam, fam.withSlot(head, i)); err != nil {
			return err
		}
	}
	if prev.Flags&svcMaglev != 0 && value.Flags&svcMaglev == 0 {
		if err := d.deleteMaglev(id); err != nil {
			return err
		}
	}
	return deleteRanges(d, fam, id, f.SourceRanges)
}

// writeMaglev writes a frontend's Maglev table unless it was built from the same backends.
func (d *Datapath) writeMaglev(id uint32, backends []loadbalancer.Backend, ids []uint32) error {
	in := make([]maglev.Backend, len(backends))
	names := make([]string, len(backends))
	for i, b := range backends {
		in[i] = maglev.Backend{Name: b.Address.String(), Weight: 1}
		names[i] = in[i].Name
	}
	slices.Sort(names)
	whose := strings.Join(names, ",")
	if d.maglevOf[id] == whose {
		return nil
	}
	table, err := d.maglev.Table(in)
	if err != nil {
		return err
	}
	buf := make([]byte, 0, 4*len(table))
	for _, i := range table {
		buf = binary.NativeEndian.AppendUint32(buf, ids[i])
	}
	if err := d.sock.PorticoMaglev.Put(id, buf); err != nil {
		return err
	}
	d.maglevOf[id] = whose
	return nil
}

func (d *Datapath) deleteMaglev(id uint32) error {
	if err := d.sock.PorticoMaglev.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete Maglev table: %w", err)
	}
	delete(d.maglevOf, id)
	return nil
}

// deleteRanges removes the source ranges of frontend id that keep does not list.
func deleteRanges[K comparable, B any, R any](d *Datapath, fam family[K, B, R], id uint32, keep []netip.Prefix) error {
	var left []netip.Prefix
	for _, p := range d.ranges[id] {
		if slices.ContainsFunc(keep, func(k netip.Prefix) bool { return k.Masked() == p }) {
			left = append(left, p)
			continue
		}
		if err := fam.srcrange.Delete(fam.rangeKey(id, p)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete source range %s: %w", p, err)
		}
	}
	if len(left) == 0 {
		delete(d.ranges, id)
	} else {
		d.ranges[id] = left
	}
	return nil
}

// deleteFrontend removes the frontend entry first, so that no reader follows it to a slot
// that is gone, then its slots from the last (what a failed delete leaves is slots 1 to k,
// which a retry finds), its table, ranges and the backends nothing else uses.
func deleteFrontend[K comparable, B any, R any](d *Datapath, fam family[K, B, R], head K) error {
	prev, ok := fam.applied.get(head)
	old := slotBackends(fam, head)
	var err error
	if ok {
		err = del(d, fam, head)
	}
	for i := len(old); i >= 1 && err == nil; i-- {
		err = del(d, fam, fam.withSlot(head, uint16(i)))
	}
	if err == nil && ok {
		err = errors.Join(d.deleteMaglev(prev.Id), deleteRanges(d, fam, prev.Id, nil))
	}
	return errors.Join(err, release(d, fam, old))
}

func deleteUnlisted[K comparable, B any, R any](d *Datapath, fam family[K, B, R], frontends []loadbalancer.Frontend) error {
	listed := make(map[K]bool, len(frontends))
	for _, f := range frontends {
		if fam.is(f.Address.Addr()) {
			listed[fam.key(f.Address, f.Protocol, f.Scope, 0)] = true
		}
	}
	// A slot whose frontend entry is gone (a delete that failed halfway) goes too.
	unlisted := map[K]bool{}
	for head := range fam.applied.frontends {
		if !listed[head] {
			unlisted[head] = true
		}
	}
	for k := range unlisted {
		if err := deleteFrontend(d, fam, k); err != nil {
			return err
		}
	}
	return nil
}

// slotBackends lists the backend numbers a frontend's slots name now, kept ones included.
func slotBackends[K comparable, B any, R any](fam family[K, B, R], head K) []uint32 {
	var out []uint32
	for i := uint16(1); ; i++ {
		slot, ok := fam.applied.get(fam.withSlot(head, i))
		if !ok {
			return out
		}
		out = append(out, slot.BackendId)
	}
}

// release removes those of the backends that no slot names (written or not) and frees their
// numbers. A backend whose entry cannot be deleted keeps its number, and goes at a later
// release.
func release[K comparable, B any, R any](d *Datapath, fam family[K, B, R], ids []uint32) error {
	var errs []error
	for _, id := range ids {
		if int(id) >= len(d.numbered) {
			continue // adopted maps named a number no backend had
		}
		n := &d.numbered[id]
		if !n.inUse || n.refs > 0 {
			continue
		}
		if n.written {
			if err := fam.be.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("delete backend %s: %w", n.ref.address(), err))
				continue
			}
		}
		d.forget(id)
	}
	return errors.Join(errs...)
}

// put writes a service entry unless the map already holds that value; for a slot, it moves
// the reference from the backend the slot named to the one it names now.
func put[K comparable, B any, R any](d *Datapath, fam family[K, B, R], k K, v sockLBSvcValue) error {
	old, had := fam.applied.get(k)
	if had && old == v {
		return nil
	}
	if err := fam.injected(); err != nil {
		return err
	}
	switch {
	case fam.pend != nil && fam.slot(k) == 0:
		fam.pend.headKeys, fam.pend.headVals = append(fam.pend.headKeys, k), append(fam.pend.headVals, v)
	case fam.pend != nil:
		fam.pend.slotKeys, fam.pend.slotVals = append(fam.pend.slotKeys, k), append(fam.pend.slotVals, v)
	default:
		if err := fam.svc.Put(k, v); err != nil {
			return full(err)
		}
	}
	fam.applied.set(k, v)
	if fam.slot(k) > 0 {
		if had {
			d.count(old.BackendId, -1)
		}
		d.count(v.BackendId, 1)
	}
	return nil
}

// count adds delta to the references of a backend a slot names (adopted maps may name a
// number no backend has).
func (d *Datapath) count(id uint32, delta int32) {
	if int(id) < len(d.numbered) {
		d.numbered[id].refs += delta
	}
}

// putBackend writes a backend entry.
func putBackend[K comparable, B any, R any](fam family[K, B, R], id uint32, b B) error {
	if err := fam.injected(); err != nil {
		return err
	}
	if fam.pend != nil {
		fam.pend.beKeys, fam.pend.beVals = append(fam.pend.beKeys, id), append(fam.pend.beVals, b)
		return nil
	}
	return full(fam.be.Put(id, b))
}

// full marks the error of a write into a map with no room left (a hash map answers E2BIG)
// as loadbalancer.ErrFull.
func full(err error) error {
	if errors.Is(err, unix.E2BIG) || errors.Is(err, unix.ENOSPC) {
		return fmt.Errorf("%w: %w", loadbalancer.ErrFull, err)
	}
	return err
}

// injected is the failure a test injects into the next map write (tables.fault), if any.
func (fam family[K, B, R]) injected() error {
	if fam.fault == nil {
		return nil
	}
	return fam.fault()
}

// del deletes a service entry; for a slot, its backend loses the reference.
func del[K comparable, B any, R any](d *Datapath, fam family[K, B, R], k K) error {
	if err := fam.injected(); err != nil {
		return err
	}
	if err := fam.svc.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete service entry: %w", err)
	}
	if old, had := fam.applied.get(k); had && fam.slot(k) > 0 {
		d.count(old.BackendId, -1)
	}
	fam.applied.del(k)
	return nil
}

// id numbers a backend.
func (d *Datapath) id(ref backendRef) uint32 {
	if id, ok := d.ids[ref]; ok {
		return id
	}
	var id uint32
	if n := len(d.free); n > 0 {
		id, d.free = d.free[n-1], d.free[:n-1]
	} else {
		id = uint32(len(d.numbered))
		d.numbered = append(d.numbered, numbered{})
	}
	d.ids[ref] = id
	d.numbered[id] = numbered{ref: ref, inUse: true}
	return id
}

// forget releases a backend number.
func (d *Datapath) forget(id uint32) {
	delete(d.ids, d.numbered[id].ref)
	d.numbered[id] = numbered{}
	d.free = append(d.free, id)
}

// addr4, addr6 and port lay out addresses and ports in network byte order in the host-order
// integers that bpf2go generates.
func addr4(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func addr6(a netip.Addr) [4]uint32 {
	b := a.As16()
	var out [4]uint32
	for i := range out {
		out[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return out
}

func bytes4(v uint32) [4]byte {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return b
}

func bytes16(v [4]uint32) [16]byte {
	var b [16]byte
	for i, w := range v {
		binary.NativeEndian.PutUint32(b[4*i:], w)
	}
	return b
}

func unport(p uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], p)
	return binary.BigEndian.Uint16(b[:])
}

func port(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}
