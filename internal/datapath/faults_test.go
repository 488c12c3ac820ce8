package datapath

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"

	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/test/harness/nstest"
)

var errInjected = errors.New("injected map write failure")

// A map write that fails in the middle of an Update or a Delete leaks nothing: the backends
// map holds exactly the backends that slots name (one that none names would stay alive for
// established flows), the mirror's reference counts agree with the maps, and once writes work
// again the same call brings the maps to the desired frontends. Every write of each change
// fails once in turn.
func TestFailedWritesLeakNoBackend(t *testing.T) {
	d := loaded(t)
	ap := netip.MustParseAddrPort
	web, api := ap("10.96.0.1:80"), ap("10.96.0.2:80")
	b1, b2, b3, b4 := ap("10.0.0.1:80"), ap("10.0.0.2:80"), ap("10.0.0.3:80"), ap("10.0.0.4:80")
	start := []loadbalancer.Frontend{internal(web, loadbalancer.TCP, b1, b2, b3), internal(api, loadbalancer.TCP, b3)}
	changes := []struct {
		name string
		do   func() error
		want map[netip.AddrPort][]netip.AddrPort
	}{
		{"web moves to b3 and b4", func() error { return d.Update(internal(web, loadbalancer.TCP, b3, b4)) },
			map[netip.AddrPort][]netip.AddrPort{web: {b3, b4}, api: {b3}}},
		{"web shrinks to b2", func() error { return d.Update(internal(web, loadbalancer.TCP, b2)) },
			map[netip.AddrPort][]netip.AddrPort{web: {b2}, api: {b3}}},
		{"a new frontend", func() error { return d.Update(internal(ap("10.96.0.3:80"), loadbalancer.TCP, b4, b1)) },
			map[netip.AddrPort][]netip.AddrPort{web: {b1, b2, b3}, api: {b3}, ap("10.96.0.3:80"): {b4, b1}}},
		{"web deleted", func() error { return d.Delete(web, loadbalancer.TCP, loadbalancer.Internal) },
			map[netip.AddrPort][]netip.AddrPort{api: {b3}}},
	}
	for _, c := range changes {
		for fail := 1; ; fail++ {
			if err := d.Apply(start); err != nil {
				t.Fatal(err)
			}
			writes := 0
			d.fault = func() error {
				if writes++; writes == fail {
					return errInjected
				}
				return nil
			}
			err := c.do()
			d.fault = nil
			consistent(t, d, c.name)
			if err == nil { // fewer writes than fail: every one has failed once
				if fail == 1 {
					t.Fatalf("%s: wrote nothing", c.name)
				}
				break
			}
			if !errors.Is(err, errInjected) {
				t.Fatalf("%s, write %d failing: %v", c.name, fail, err)
			}
			if err := c.do(); err != nil {
				t.Fatalf("%s, again after write %d failed: %v", c.name, fail, err)
			}
			consistent(t, d, c.name)
			if got := frontends4(t, d); !maps.EqualFunc(got, c.want, slices.Equal) {
				t.Fatalf("%s, again after write %d failed: the maps hold %v, want %v", c.name, fail, got, c.want)
			}
		}
	}
}

// consistent checks that the IPv4 backends map holds exactly the backends slots name, and
// that the mirror counts as many references as there are slots.
func consistent(t *testing.T, d *Datapath, step string) {
	t.Helper()
	named := map[uint32]int32{}
	var k sockLBSvc4Key
	var v sockLBSvcValue
	it := d.sock.PorticoSvc4.Iterate()
	for it.Next(&k, &v) {
		if k.Slot > 0 {
			named[v.BackendId]++
		}
	}
	have := map[uint32]bool{}
	var id uint32
	var b sockLBBackend4
	itb := d.sock.PorticoBe4.Iterate()
	for itb.Next(&id, &b) {
		have[id] = true
	}
	if err := errors.Join(it.Err(), itb.Err()); err != nil {
		t.Fatal(err)
	}
	for id := range have {
		if named[id] == 0 {
			t.Fatalf("%s: backend %d (%s) is in the map, and no slot names it", step, id, d.numbered[id].ref.addr)
		}
	}
	for id, n := range named {
		if !have[id] {
			t.Fatalf("%s: a slot names backend %d, which the map lacks", step, id)
		}
		if d.numbered[id].refs != n {
			t.Fatalf("%s: backend %d (%s) has %d references in the mirror, %d slots in the map", step, id, d.numbered[id].ref.addr, d.numbered[id].refs, n)
		}
	}
	if len(d.ids) != len(have) {
		t.Fatalf("%s: the mirror numbers %d backends, the map holds %d", step, len(d.ids), len(have))
	}
}

// frontends4 reads the IPv4 frontends from the maps: each address's backends in slot order.
func frontends4(t *testing.T, d *Datapath) map[netip.AddrPort][]netip.AddrPort {
	t.Helper()
	backends := map[uint32]netip.AddrPort{}
	var id uint32
	var b sockLBBackend4
	itb := d.sock.PorticoBe4.Iterate()
	for itb.Next(&id, &b) {
		backends[id] = netip.AddrPortFrom(netip.AddrFrom4(bytes4(b.Address)), unport(b.Port))
	}
	slots := map[netip.AddrPort]map[uint16]netip.AddrPort{}
	var k sockLBSvc4Key
	var v sockLBSvcValue
	it := d.sock.PorticoSvc4.Iterate()
	for it.Next(&k, &v) {
		addr := netip.AddrPortFrom(netip.AddrFrom4(bytes4(k.Address)), unport(k.Port))
		if slots[addr] == nil {
			slots[addr] = map[uint16]netip.AddrPort{}
		}
		if k.Slot > 0 {
			slots[addr][k.Slot] = backends[v.BackendId]
		}
	}
	if err := errors.Join(it.Err(), itb.Err()); err != nil {
		t.Fatal(err)
	}
	out := map[netip.AddrPort][]netip.AddrPort{}
	for addr, s := range slots {
		out[addr] = []netip.AddrPort{}
		for i := uint16(1); i <= uint16(len(s)); i++ {
			out[addr] = append(out[addr], s[i])
		}
	}
	return out
}

// With maps too small for every frontend, Apply writes those that fit, in the order given,
// names the rest, and leaves the maps consistent; the same Apply gives the same result;
// once a listed frontend goes, the next one in line fits. Each frontend takes 3 service
// entries (itself and two slots) and 2 backends; either map may be the one that is short.
func TestApplyProgramsWhatFits(t *testing.T) {
	for _, size := range []Options{{ServiceEntries: 20, Backends: 8}, {ServiceEntries: 12, Backends: 16}} {
		t.Run(fmt.Sprintf("%d service entries, %d backends", size.ServiceEntries, size.Backends), func(t *testing.T) {
			applyWhatFits(t, size)
		})
	}
}

func applyWhatFits(t *testing.T, size Options) {
	nstest.NeedRoot(t, "loads BPF programs")
	d, err := Load(size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	var fs []loadbalancer.Frontend
	want := map[netip.AddrPort][]netip.AddrPort{}
	for i := range 6 {
		vip := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, 0, byte(i + 1)}), 80)
		b1 := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i), 1}), 8080)
		b2 := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i), 2}), 8080)
		fs = append(fs, internal(vip, loadbalancer.TCP, b1, b2))
		if i < 4 {
			want[vip] = []netip.AddrPort{b1, b2}
		}
	}
	for _, step := range []string{"first sync into empty maps", "the same again"} {
		err := d.Apply(fs)
		var np *loadbalancer.NotProgrammed
		if !errors.As(err, &np) || len(np.Failed) != 2 || np.Failed[0].Address != fs[4].Address || np.Failed[1].Address != fs[5].Address ||
			!errors.Is(err, loadbalancer.ErrFull) {
			t.Fatalf("%s: Apply returned %v; want the last two frontends not programmed, for the maps are full", step, err)
		}
		consistent(t, d, step)
		if got := frontends4(t, d); !maps.EqualFunc(got, want, slices.Equal) {
			t.Fatalf("%s: the maps hold %v, want the first four %v", step, got, want)
		}
	}
	// The first frontend goes: the fifth takes its room, the sixth still does not fit.
	err = d.Apply(fs[1:])
	var np *loadbalancer.NotProgrammed
	if !errors.As(err, &np) || len(np.Failed) != 1 || np.Failed[0].Address != fs[5].Address {
		t.Fatalf("without the first: Apply returned %v; want only the last not programmed", err)
	}
	delete(want, fs[0].Address)
	want[fs[4].Address] = []netip.AddrPort{fs[4].Backends[0].Address, fs[4].Backends[1].Address}
	consistent(t, d, "without the first")
	if got := frontends4(t, d); !maps.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("without the first: the maps hold %v, want %v", got, want)
	}
}

// A node keeps the map sizes its pins were made with: an agent asking for others (a new
// default, another flag) loads, adopts what is pinned, and says what it holds; after an
// uninstall the sizes asked for apply.
// leavePinned loads a datapath with opts, programs one ClusterIP frontend with one backend,
// and closes it: its pins stay, as an agent leaves them when it stops.
func leavePinned(t *testing.T, opts Options) (vip, backend netip.AddrPort) {
	t.Helper()
	d, err := Load(opts)
	if err != nil {
		t.Fatal(err)
	}
	vip, backend = netip.MustParseAddrPort("10.96.0.1:80"), netip.MustParseAddrPort("10.0.0.1:80")
	if err := d.Apply([]loadbalancer.Frontend{internal(vip, loadbalancer.TCP, backend)}); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	return vip, backend
}

func TestPinnedMapsKeepTheirSize(t *testing.T) {
	nstest.NeedRoot(t, "loads BPF programs")
	pins := filepath.Join(nstest.BPFFS(t), "node")
	vip, backend := leavePinned(t, Options{PinDir: pins, ServiceEntries: 1024, Backends: 512, ConntrackSize: 2048})
	d, err := Load(Options{PinDir: pins})
	if err != nil {
		t.Fatalf("an agent with other sizes than the pins: %v", err)
	}
	if got, want := d.Capacity(), (Capacity{ServiceEntries: 1024, Backends: 512, Conntrack: 2048}); got != want {
		t.Fatalf("capacity %+v, want the pinned %+v", got, want)
	}
	if got := frontends4(t, d); !slices.Equal(got[vip], []netip.AddrPort{backend}) {
		t.Fatalf("the pinned frontend was not adopted: %v", got)
	}
	if err := d.Uninstall(); err != nil {
		t.Fatal(err)
	}
	d, err = Load(Options{PinDir: pins})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Uninstall()
	if got, want := d.Capacity(), (Capacity{ServiceEntries: 2097152, Backends: 524288, Conntrack: DefaultConntrackSize}); got != want {
		t.Fatalf("after an uninstall: capacity %+v, want the defaults %+v", got, want)
	}
}
