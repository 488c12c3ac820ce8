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
// layer: connect() to a frontend goes to one of its backends, getpeername() shows the
// frontend. Only IPv4 frontends so far.
type SocketLB struct {
	objs  sockLBObjects
	links []link.Link
	// ids numbers the backends in the maps; an id is reused once its backend is gone.
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
		{s.objs.PorticoGetpeername4, ebpf.AttachCgroupInet4GetPeername},
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

// Apply makes the maps hold exactly these frontends. It writes in an order that never lets a
// reader see a frontend without its backends: backends, then the slots, then the frontend
// entry with its count (one atomic update), and removes what is left over last.
func (s *SocketLB) Apply(frontends []Frontend) error {
	wantSvc := map[sockLBSvc4Key]sockLBSvcValue{}
	wantBe := map[uint32]sockLBBackend4{}
	used := map[backendRef]bool{}
	var heads []sockLBSvc4Key
	for _, f := range frontends {
		if !f.Address.Addr().Is4() {
			return fmt.Errorf("frontend %s: only IPv4 frontends are supported so far", f.Address)
		}
		key := sockLBSvc4Key{Address: addr4(f.Address.Addr()), Port: port(f.Address.Port()), Proto: uint8(f.Protocol), Scope: scopeInternal}
		for i, b := range f.Backends {
			if !b.Addr().Is4() {
				return fmt.Errorf("frontend %s: backend %s is not IPv4", f.Address, b)
			}
			ref := backendRef{b, f.Protocol}
			id := s.id(ref)
			used[ref] = true
			wantBe[id] = sockLBBackend4{Address: addr4(b.Addr()), Port: port(b.Port()), Proto: uint8(f.Protocol)}
			slot := key
			slot.Slot = uint16(i + 1)
			wantSvc[slot] = sockLBSvcValue{BackendId: id}
		}
		wantSvc[key] = sockLBSvcValue{Count: uint16(len(f.Backends))}
		heads = append(heads, key)
	}

	for id, be := range wantBe {
		if err := s.objs.PorticoBe4.Put(id, be); err != nil {
			return fmt.Errorf("write backend %d: %w", id, err)
		}
	}
	for k, v := range wantSvc {
		if k.Slot == 0 {
			continue
		}
		if err := s.objs.PorticoSvc4.Put(k, v); err != nil {
			return fmt.Errorf("write service slot: %w", err)
		}
	}
	for _, k := range heads {
		if err := s.objs.PorticoSvc4.Put(k, wantSvc[k]); err != nil {
			return fmt.Errorf("write frontend: %w", err)
		}
	}

	var stale []sockLBSvc4Key
	var k sockLBSvc4Key
	var v sockLBSvcValue
	it := s.objs.PorticoSvc4.Iterate()
	for it.Next(&k, &v) {
		if _, ok := wantSvc[k]; !ok {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read service map: %w", err)
	}
	// Frontends first, so that no reader follows a frontend to a slot that is gone.
	slices.SortFunc(stale, func(a, b sockLBSvc4Key) int { return int(a.Slot) - int(b.Slot) })
	for _, k := range stale {
		if err := s.objs.PorticoSvc4.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete service entry: %w", err)
		}
	}
	for ref, id := range s.ids {
		if used[ref] {
			continue
		}
		if err := s.objs.PorticoBe4.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete backend %d: %w", id, err)
		}
		delete(s.ids, ref)
		s.free = append(s.free, id)
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

// addr4 and port lay out an address and a port in network byte order in the host-order
// integers that bpf2go generates.
func addr4(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func port(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}
