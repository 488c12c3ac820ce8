// Package datapath loads Portico's BPF programs, attaches them and keeps their maps equal to a
// desired set of frontends and backends (docs/datapath.md). It knows nothing of Kubernetes.
package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Protocol is a transport protocol, numbered as in IP headers.
type Protocol uint8

// The protocols the datapath translates.
const (
	TCP Protocol = 6
	UDP Protocol = 17
)

// Frontend is one address, port and protocol clients connect to, and the backends behind it.
type Frontend struct {
	Address  netip.AddrPort
	Protocol Protocol
	Backends []netip.AddrPort
}

// SocketLB translates connections of the processes in one cgroup (and below) at the socket
// layer: connect() or sendmsg() to a frontend goes to one of its backends, getpeername() and
// recvmsg() show the frontend. IPv4 and IPv6, TCP and UDP.
type SocketLB struct {
	objs  sockLBObjects
	links []link.Link
	// ids numbers the backends in the maps (one numbering for both families); an id is
	// reused once its backend is gone.
	ids    map[backendRef]uint32
	refOf  map[uint32]backendRef
	refs   map[backendRef]int // how many slots name each backend
	free   []uint32
	nextID uint32
	pinDir string
	// applied4 and applied6 mirror the service maps, so that updates write only what changed.
	applied4 map[sockLBSvc4Key]sockLBSvcValue
	applied6 map[sockLBSvc6Key]sockLBSvcValue
}

type backendRef struct {
	addr  netip.AddrPort
	proto Protocol
}

// AttachSocketLB loads the socket programs and attaches them to a cgroup v2 directory.
//
// With a pinDir (a directory on a bpffs mount) the maps and the attachments are pinned there:
// when the process exits the programs stay attached and keep translating with the last
// state, and the next AttachSocketLB with the same pinDir adopts the maps, with every
// frontend and socket in them, and replaces the programs with its own in one step. Without a
// pinDir everything goes when the SocketLB is closed.
func AttachSocketLB(cgroupPath, pinDir string) (*SocketLB, error) {
	s := newSocketLB(pinDir)
	if err := loadObjects(&s.objs, pinDir); err != nil {
		return nil, err
	}
	for _, p := range []struct {
		name   string
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		{"connect4", s.objs.PorticoConnect4, ebpf.AttachCGroupInet4Connect},
		{"sendmsg4", s.objs.PorticoSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
		{"recvmsg4", s.objs.PorticoRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
		{"getpeername4", s.objs.PorticoGetpeername4, ebpf.AttachCgroupInet4GetPeername},
		{"connect6", s.objs.PorticoConnect6, ebpf.AttachCGroupInet6Connect},
		{"sendmsg6", s.objs.PorticoSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
		{"recvmsg6", s.objs.PorticoRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
		{"getpeername6", s.objs.PorticoGetpeername6, ebpf.AttachCgroupInet6GetPeername},
	} {
		l, err := s.attach(cgroupPath, "link_"+p.name, p.prog, p.attach)
		if err != nil {
			return nil, errors.Join(fmt.Errorf("attach %s to %s: %w", p.name, cgroupPath, err), s.Close())
		}
		s.links = append(s.links, l)
	}
	if err := s.adopt(); err != nil {
		return nil, errors.Join(err, s.Close())
	}
	return s, nil
}

func newSocketLB(pinDir string) *SocketLB {
	return &SocketLB{ids: map[backendRef]uint32{}, refOf: map[uint32]backendRef{}, refs: map[backendRef]int{}, nextID: 1, pinDir: pinDir,
		applied4: map[sockLBSvc4Key]sockLBSvcValue{}, applied6: map[sockLBSvc6Key]sockLBSvcValue{}}
}

// loadObjects loads the programs and maps, adopting maps pinned in pinDir; with no pinDir
// nothing is pinned.
func loadObjects(objs *sockLBObjects, pinDir string) error {
	spec, err := loadSockLB()
	if err != nil {
		return fmt.Errorf("read socket programs: %w", err)
	}
	opts := &ebpf.CollectionOptions{}
	if pinDir == "" {
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
	} else {
		if err := os.MkdirAll(pinDir, 0o700); err != nil {
			return fmt.Errorf("make pin directory: %w", err)
		}
		opts.Maps.PinPath = pinDir
	}
	if err := spec.LoadAndAssign(objs, opts); err != nil {
		return fmt.Errorf("load socket programs: %w", err)
	}
	return nil
}

// attach adopts a pinned attachment, swapping in prog, or makes (and pins) a new one.
func (s *SocketLB) attach(cgroupPath, pinName string, prog *ebpf.Program, typ ebpf.AttachType) (link.Link, error) {
	pin := filepath.Join(s.pinDir, pinName)
	if s.pinDir != "" {
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			if err := l.Update(prog); err != nil {
				return nil, errors.Join(fmt.Errorf("replace the program of %s: %w", pin, err), l.Close())
			}
			return l, nil
		} else if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("load pinned link %s: %w", pin, err)
		}
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: typ, Program: prog})
	if err != nil {
		return nil, err
	}
	if s.pinDir != "" {
		if err := l.Pin(pin); err != nil {
			return nil, errors.Join(fmt.Errorf("pin link: %w", err), l.Close())
		}
	}
	return l, nil
}

// adopt rebuilds what was applied, and the backend numbering, from adopted maps.
func (s *SocketLB) adopt() error {
	if err := errors.Join(mirror(s.objs.PorticoSvc4, s.applied4), mirror(s.objs.PorticoSvc6, s.applied6)); err != nil {
		return fmt.Errorf("read adopted service maps: %w", err)
	}
	var id uint32
	var b4 sockLBBackend4
	it4 := s.objs.PorticoBe4.Iterate()
	for it4.Next(&id, &b4) {
		s.adoptID(id, backendRef{netip.AddrPortFrom(netip.AddrFrom4(bytes4(b4.Address)), unport(b4.Port)), Protocol(b4.Proto)})
	}
	var b6 sockLBBackend6
	it6 := s.objs.PorticoBe6.Iterate()
	for it6.Next(&id, &b6) {
		s.adoptID(id, backendRef{netip.AddrPortFrom(netip.AddrFrom16(bytes16(b6.Address)), unport(b6.Port)), Protocol(b6.Proto)})
	}
	if err := errors.Join(it4.Err(), it6.Err()); err != nil {
		return fmt.Errorf("read adopted backends: %w", err)
	}
	for k, v := range s.applied4 {
		if k.Slot > 0 {
			s.refs[s.refOf[v.BackendId]]++
		}
	}
	for k, v := range s.applied6 {
		if k.Slot > 0 {
			s.refs[s.refOf[v.BackendId]]++
		}
	}
	taken := make(map[uint32]bool, len(s.ids))
	for _, id := range s.ids {
		taken[id] = true
	}
	for i := uint32(1); i < s.nextID; i++ {
		if !taken[i] {
			s.free = append(s.free, i)
		}
	}
	return nil
}

func mirror[K comparable](m *ebpf.Map, into map[K]sockLBSvcValue) error {
	var k K
	var v sockLBSvcValue
	it := m.Iterate()
	for it.Next(&k, &v) {
		into[k] = v
	}
	return it.Err()
}

func (s *SocketLB) adoptID(id uint32, ref backendRef) {
	s.ids[ref] = id
	s.refOf[id] = ref
	s.nextID = max(s.nextID, id+1)
}

// Close releases this process's hold on the programs and maps. Pinned ones stay in force.
func (s *SocketLB) Close() error {
	var errs []error
	for _, l := range s.links {
		errs = append(errs, l.Close())
	}
	errs = append(errs, s.objs.Close())
	return errors.Join(errs...)
}

// Uninstall detaches the programs and deletes the pins: translation stops for good.
func (s *SocketLB) Uninstall() error {
	var errs []error
	for _, l := range s.links {
		errs = append(errs, l.Unpin())
	}
	for _, m := range []*ebpf.Map{s.objs.PorticoSvc4, s.objs.PorticoBe4, s.objs.PorticoSock4, s.objs.PorticoSvc6, s.objs.PorticoBe6, s.objs.PorticoSock6} {
		if m.IsPinned() {
			errs = append(errs, m.Unpin())
		}
	}
	errs = append(errs, s.Close())
	if s.pinDir != "" {
		errs = append(errs, os.Remove(s.pinDir))
	}
	return errors.Join(errs...)
}

// family describes one IP family's maps and how its keys and backends are laid out.
type family[K comparable, B any] struct {
	svc, be  *ebpf.Map
	applied  map[K]sockLBSvcValue
	is       func(netip.Addr) bool
	key      func(f netip.AddrPort, proto Protocol, slot uint16) K
	slot     func(K) uint16
	withSlot func(K, uint16) K
	backend  func(b netip.AddrPort, proto Protocol) B
}

var (
	ipv4 = family[sockLBSvc4Key, sockLBBackend4]{
		is: netip.Addr.Is4,
		key: func(f netip.AddrPort, proto Protocol, slot uint16) sockLBSvc4Key {
			return sockLBSvc4Key{Address: addr4(f.Addr()), Port: port(f.Port()), Proto: uint8(proto), Scope: scopeInternal, Slot: slot}
		},
		slot:     func(k sockLBSvc4Key) uint16 { return k.Slot },
		withSlot: func(k sockLBSvc4Key, slot uint16) sockLBSvc4Key { k.Slot = slot; return k },
		backend: func(b netip.AddrPort, proto Protocol) sockLBBackend4 {
			return sockLBBackend4{Address: addr4(b.Addr()), Port: port(b.Port()), Proto: uint8(proto)}
		},
	}
	ipv6 = family[sockLBSvc6Key, sockLBBackend6]{
		is: func(a netip.Addr) bool { return a.Is6() && !a.Is4In6() },
		key: func(f netip.AddrPort, proto Protocol, slot uint16) sockLBSvc6Key {
			return sockLBSvc6Key{Address: addr6(f.Addr()), Port: port(f.Port()), Proto: uint8(proto), Scope: scopeInternal, Slot: slot}
		},
		slot:     func(k sockLBSvc6Key) uint16 { return k.Slot },
		withSlot: func(k sockLBSvc6Key, slot uint16) sockLBSvc6Key { k.Slot = slot; return k },
		backend: func(b netip.AddrPort, proto Protocol) sockLBBackend6 {
			return sockLBBackend6{Address: addr6(b.Addr()), Port: port(b.Port()), Proto: uint8(proto)}
		},
	}
)

// Apply makes the maps hold exactly these frontends (a full resync): it updates each one and
// deletes the frontends it does not list.
func (s *SocketLB) Apply(frontends []Frontend) error {
	for _, f := range frontends {
		if err := validate(f); err != nil {
			return err
		}
	}
	for _, f := range frontends {
		if err := s.Update(f); err != nil {
			return err
		}
	}
	return errors.Join(deleteUnlisted(s, s.v4(), frontends), deleteUnlisted(s, s.v6(), frontends))
}

// Update adds a frontend or changes its backends, in an order that never lets a reader see
// it without backends: new backends, then new slots, then the frontend entry with its count
// (one atomic update), then slots and backends no longer used. It touches only this
// frontend's entries, whatever the number of others.
func (s *SocketLB) Update(f Frontend) error {
	if err := validate(f); err != nil {
		return err
	}
	if f.Address.Addr().Is4() {
		return update(s, s.v4(), f)
	}
	return update(s, s.v6(), f)
}

// Delete removes a frontend; connections already made stay where they are.
func (s *SocketLB) Delete(addr netip.AddrPort, proto Protocol) error {
	if addr.Addr().Is4() {
		fam := s.v4()
		return deleteFrontend(s, fam, fam.key(addr, proto, 0))
	}
	fam := s.v6()
	return deleteFrontend(s, fam, fam.key(addr, proto, 0))
}

func validate(f Frontend) error {
	for _, b := range f.Backends {
		if b.Addr().Is4() != f.Address.Addr().Is4() {
			return fmt.Errorf("frontend %s: backend %s is of the other IP family", f.Address, b)
		}
	}
	if f.Address.Addr().Is4In6() || f.Address.Addr().Zone() != "" {
		return fmt.Errorf("frontend %s: IPv4-mapped and zoned addresses are not frontends", f.Address)
	}
	if len(f.Backends) > math.MaxUint16 {
		return fmt.Errorf("frontend %s: %d backends, at most %d", f.Address, len(f.Backends), math.MaxUint16)
	}
	return nil
}

func (s *SocketLB) v4() family[sockLBSvc4Key, sockLBBackend4] {
	fam := ipv4
	fam.svc, fam.be, fam.applied = s.objs.PorticoSvc4, s.objs.PorticoBe4, s.applied4
	return fam
}

func (s *SocketLB) v6() family[sockLBSvc6Key, sockLBBackend6] {
	fam := ipv6
	fam.svc, fam.be, fam.applied = s.objs.PorticoSvc6, s.objs.PorticoBe6, s.applied6
	return fam
}

func update[K comparable, B any](s *SocketLB, fam family[K, B], f Frontend) error {
	head := fam.key(f.Address, f.Protocol, 0)
	old := slotBackends(s, fam, head)
	for i, b := range f.Backends {
		ref := backendRef{b, f.Protocol}
		id, fresh := s.id(ref)
		if fresh {
			if err := fam.be.Put(id, fam.backend(b, f.Protocol)); err != nil {
				return fmt.Errorf("write backend %s: %w", b, err)
			}
		}
		s.refs[ref]++
		if err := put(fam, fam.key(f.Address, f.Protocol, uint16(i+1)), sockLBSvcValue{BackendId: id}); err != nil {
			return fmt.Errorf("write slot %d of %s: %w", i+1, f.Address, err)
		}
	}
	if err := put(fam, head, sockLBSvcValue{Count: uint16(len(f.Backends))}); err != nil {
		return fmt.Errorf("write frontend %s: %w", f.Address, err)
	}
	for i := len(f.Backends) + 1; i <= len(old); i++ {
		if err := del(fam, fam.key(f.Address, f.Protocol, uint16(i))); err != nil {
			return err
		}
	}
	return unref(s, fam, old)
}

// deleteFrontend removes the frontend entry first, so that no reader follows it to a slot
// that is gone, then its slots and the backends nothing else uses.
func deleteFrontend[K comparable, B any](s *SocketLB, fam family[K, B], head K) error {
	old := slotBackends(s, fam, head)
	if _, ok := fam.applied[head]; !ok {
		return nil
	}
	if err := del(fam, head); err != nil {
		return err
	}
	for i := range old {
		if err := del(fam, fam.withSlot(head, uint16(i+1))); err != nil {
			return err
		}
	}
	return unref(s, fam, old)
}

func deleteUnlisted[K comparable, B any](s *SocketLB, fam family[K, B], frontends []Frontend) error {
	listed := make(map[K]bool, len(frontends))
	for _, f := range frontends {
		if fam.is(f.Address.Addr()) {
			listed[fam.key(f.Address, f.Protocol, 0)] = true
		}
	}
	var unlisted []K
	for k := range fam.applied {
		if fam.slot(k) == 0 && !listed[k] {
			unlisted = append(unlisted, k)
		}
	}
	for _, k := range unlisted {
		if err := deleteFrontend(s, fam, k); err != nil {
			return err
		}
	}
	return nil
}

// slotBackends lists the backends a frontend's slots name now.
func slotBackends[K comparable, B any](s *SocketLB, fam family[K, B], head K) []backendRef {
	v, ok := fam.applied[head]
	if !ok {
		return nil
	}
	out := make([]backendRef, 0, v.Count)
	for i := uint16(1); i <= v.Count; i++ {
		if slot, ok := fam.applied[fam.withSlot(head, i)]; ok {
			out = append(out, s.refOf[slot.BackendId])
		}
	}
	return out
}

// unref drops one reference to each backend and removes the backends left unreferenced.
func unref[K comparable, B any](s *SocketLB, fam family[K, B], refs []backendRef) error {
	for _, ref := range refs {
		if s.refs[ref]--; s.refs[ref] > 0 {
			continue
		}
		id := s.ids[ref]
		if err := fam.be.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete backend %s: %w", ref.addr, err)
		}
		delete(s.refs, ref)
		delete(s.ids, ref)
		delete(s.refOf, id)
		s.free = append(s.free, id)
	}
	return nil
}

// put writes a service entry unless the map already holds that value.
func put[K comparable, B any](fam family[K, B], k K, v sockLBSvcValue) error {
	if old, ok := fam.applied[k]; ok && old == v {
		return nil
	}
	if err := fam.svc.Put(k, v); err != nil {
		return err
	}
	fam.applied[k] = v
	return nil
}

func del[K comparable, B any](fam family[K, B], k K) error {
	if err := fam.svc.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete service entry: %w", err)
	}
	delete(fam.applied, k)
	return nil
}

// id numbers a backend; fresh says the number is new, so the backend is not in the maps yet.
func (s *SocketLB) id(ref backendRef) (id uint32, fresh bool) {
	if id, ok := s.ids[ref]; ok {
		return id, false
	}
	if n := len(s.free); n > 0 {
		id, s.free = s.free[n-1], s.free[:n-1]
	} else {
		id = s.nextID
		s.nextID++
	}
	s.ids[ref] = id
	s.refOf[id] = ref
	return id, true
}

// scopeInternal is LB_SCOPE_INTERNAL: socket-level translation serves clients on the node.
const scopeInternal = 1

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
