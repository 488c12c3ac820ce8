// Package datapath loads Portico's BPF programs, attaches them and keeps their maps equal to a
// desired set of frontends and backends (docs/datapath.md). It knows nothing of Kubernetes.
package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"

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
	free   []uint32
	nextID uint32
}

type backendRef struct {
	addr  netip.AddrPort
	proto Protocol
}

// AttachSocketLB loads the socket programs and attaches them to a cgroup v2 directory.
func AttachSocketLB(cgroupPath string) (*SocketLB, error) {
	s := &SocketLB{ids: map[backendRef]uint32{}, nextID: 1}
	if err := loadSockLBObjects(&s.objs, nil); err != nil {
		return nil, fmt.Errorf("load socket programs: %w", err)
	}
	for _, p := range []struct {
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		{s.objs.PorticoConnect4, ebpf.AttachCGroupInet4Connect},
		{s.objs.PorticoSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
		{s.objs.PorticoRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
		{s.objs.PorticoGetpeername4, ebpf.AttachCgroupInet4GetPeername},
		{s.objs.PorticoConnect6, ebpf.AttachCGroupInet6Connect},
		{s.objs.PorticoSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
		{s.objs.PorticoRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
		{s.objs.PorticoGetpeername6, ebpf.AttachCgroupInet6GetPeername},
	} {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: p.attach, Program: p.prog})
		if err != nil {
			return nil, errors.Join(fmt.Errorf("attach %s to %s: %w", p.prog, cgroupPath, err), s.Close())
		}
		s.links = append(s.links, l)
	}
	return s, nil
}

// Close detaches the programs and frees the maps.
func (s *SocketLB) Close() error {
	var errs []error
	for _, l := range s.links {
		errs = append(errs, l.Close())
	}
	errs = append(errs, s.objs.Close())
	return errors.Join(errs...)
}

// family describes one IP family's maps and how its keys and backends are laid out.
type family[K comparable, B any] struct {
	svc, be *ebpf.Map
	is      func(netip.Addr) bool
	key     func(f netip.AddrPort, proto Protocol, slot uint16) K
	slot    func(K) uint16
	backend func(b netip.AddrPort, proto Protocol) B
}

var (
	ipv4 = family[sockLBSvc4Key, sockLBBackend4]{
		is: netip.Addr.Is4,
		key: func(f netip.AddrPort, proto Protocol, slot uint16) sockLBSvc4Key {
			return sockLBSvc4Key{Address: addr4(f.Addr()), Port: port(f.Port()), Proto: uint8(proto), Scope: scopeInternal, Slot: slot}
		},
		slot: func(k sockLBSvc4Key) uint16 { return k.Slot },
		backend: func(b netip.AddrPort, proto Protocol) sockLBBackend4 {
			return sockLBBackend4{Address: addr4(b.Addr()), Port: port(b.Port()), Proto: uint8(proto)}
		},
	}
	ipv6 = family[sockLBSvc6Key, sockLBBackend6]{
		is: func(a netip.Addr) bool { return a.Is6() && !a.Is4In6() },
		key: func(f netip.AddrPort, proto Protocol, slot uint16) sockLBSvc6Key {
			return sockLBSvc6Key{Address: addr6(f.Addr()), Port: port(f.Port()), Proto: uint8(proto), Scope: scopeInternal, Slot: slot}
		},
		slot: func(k sockLBSvc6Key) uint16 { return k.Slot },
		backend: func(b netip.AddrPort, proto Protocol) sockLBBackend6 {
			return sockLBBackend6{Address: addr6(b.Addr()), Port: port(b.Port()), Proto: uint8(proto)}
		},
	}
)

// Apply makes the maps hold exactly these frontends. It writes in an order that never lets a
// reader see a frontend without its backends: backends, then the slots, then the frontend
// entry with its count (one atomic update), and removes what is left over last.
func (s *SocketLB) Apply(frontends []Frontend) error {
	for _, f := range frontends {
		for _, b := range f.Backends {
			if b.Addr().Is4() != f.Address.Addr().Is4() {
				return fmt.Errorf("frontend %s: backend %s is of the other IP family", f.Address, b)
			}
		}
		if f.Address.Addr().Is4In6() || f.Address.Addr().Zone() != "" {
			return fmt.Errorf("frontend %s: IPv4-mapped and zoned addresses are not frontends", f.Address)
		}
	}
	used := map[backendRef]bool{}
	v4 := ipv4
	v4.svc, v4.be = s.objs.PorticoSvc4, s.objs.PorticoBe4
	v6 := ipv6
	v6.svc, v6.be = s.objs.PorticoSvc6, s.objs.PorticoBe6
	if err := apply(s, v4, frontends, used); err != nil {
		return fmt.Errorf("apply IPv4 frontends: %w", err)
	}
	if err := apply(s, v6, frontends, used); err != nil {
		return fmt.Errorf("apply IPv6 frontends: %w", err)
	}
	for ref, id := range s.ids {
		if used[ref] {
			continue
		}
		m := s.objs.PorticoBe4
		if !ref.addr.Addr().Is4() {
			m = s.objs.PorticoBe6
		}
		if err := m.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete backend %d: %w", id, err)
		}
		delete(s.ids, ref)
		s.free = append(s.free, id)
	}
	return nil
}

// apply writes one family's frontends and removes its stale service entries; backends no
// longer used are left for the caller to remove, after both families are done.
func apply[K comparable, B any](s *SocketLB, fam family[K, B], frontends []Frontend, used map[backendRef]bool) error {
	want := map[K]sockLBSvcValue{}
	var heads []K
	for _, f := range frontends {
		if !fam.is(f.Address.Addr()) {
			continue
		}
		for i, b := range f.Backends {
			ref := backendRef{b, f.Protocol}
			id := s.id(ref)
			if !used[ref] {
				if err := fam.be.Put(id, fam.backend(b, f.Protocol)); err != nil {
					return fmt.Errorf("write backend %s: %w", b, err)
				}
				used[ref] = true
			}
			slot := fam.key(f.Address, f.Protocol, uint16(i+1))
			want[slot] = sockLBSvcValue{BackendId: id}
			if err := fam.svc.Put(slot, want[slot]); err != nil {
				return fmt.Errorf("write slot %d of %s: %w", i+1, f.Address, err)
			}
		}
		head := fam.key(f.Address, f.Protocol, 0)
		want[head] = sockLBSvcValue{Count: uint16(len(f.Backends))}
		heads = append(heads, head)
	}
	for _, k := range heads {
		if err := fam.svc.Put(k, want[k]); err != nil {
			return fmt.Errorf("write frontend: %w", err)
		}
	}

	var stale []K
	var k K
	var v sockLBSvcValue
	it := fam.svc.Iterate()
	for it.Next(&k, &v) {
		if _, ok := want[k]; !ok {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read service map: %w", err)
	}
	// Frontends first, so that no reader follows a frontend to a slot that is gone.
	slices.SortFunc(stale, func(a, b K) int { return int(fam.slot(a)) - int(fam.slot(b)) })
	for _, k := range stale {
		if err := fam.svc.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete service entry: %w", err)
		}
	}
	return nil
}

func (s *SocketLB) id(ref backendRef) uint32 {
	if id, ok := s.ids[ref]; ok {
		return id
	}
	var id uint32
	if n := len(s.free); n > 0 {
		id, s.free = s.free[n-1], s.free[:n-1]
	} else {
		id = s.nextID
		s.nextID++
	}
	s.ids[ref] = id
	return id
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

func port(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}
