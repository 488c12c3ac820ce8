// Package datapath loads Portico's BPF programs, attaches them and keeps their maps equal to a
// desired set of frontends and backends (docs/datapath.md). It knows nothing of Kubernetes.
//
// Two layers share one set of service maps: socket programs on a cgroup translate the
// connections of clients on the node (AttachCgroup), and TC programs on external interfaces
// translate packets from outside (AttachInterface).
package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/portico-dev/portico/internal/maglev"
)

// Options configure a datapath.
type Options struct {
	// PinDir, a directory on a bpffs mount, keeps the maps and attachments after the process
	// exits: the programs go on translating with the last state, and the next Load with the
	// same PinDir adopts them, with every frontend, socket and flow, or rebuilds the maps
	// whose layout it changed (pins.go). Empty: nothing is pinned and everything goes with
	// Close.
	PinDir string
	// MaglevTableSize is the prime size of Maglev tables (maglev.DefaultTableSize when 0).
	// It is the Maglev map's value size: changing it rebuilds that map (pins.go).
	MaglevTableSize uint32
	// ConntrackSize is the number of entries (two per flow) of the packet layer's table of
	// confirmed flows; new flows have a table of a quarter of it, so that a flood of them
	// cannot push out established ones.
	ConntrackSize uint32
	// Pinned maps keep the size (and flags) they were made with, whatever these ask:
	// Capacity says what the datapath holds. Changing them on a node takes an uninstall.
	// ServiceEntries and Backends size each family's service map (a frontend takes one entry,
	// plus one per backend) and backends map (one entry per distinct backend address, port
	// and protocol); 0: bpf/lib/lb.h's defaults (2,097,152 and 524,288), which hold 10,000
	// dual-stack LoadBalancer Services x 3 ports x 10 endpoints (docs/datapath.md).
	ServiceEntries, Backends uint32
	// MaglevSeed must be the same on every node, so that they pick the same backend for a flow.
	MaglevSeed uint64
}

// DefaultConntrackSize holds 65,536 flows through the packet layer.
const DefaultConntrackSize = 131072

// Datapath is the loaded programs and maps of one node.
type Datapath struct {
	sock   sockLBObjects
	np     nodePortObjects
	links  map[string]link.Link
	pinDir string
	// rebuilt names the maps made anew beside pinned ones of another layout, stale the pins
	// to remove once the links run this datapath's programs (pins.go); swaps are the link
	// updates waiting for the first Apply to fill the new maps.
	rebuilt []string
	stale   []string
	swaps   []func() error
	maglev  *maglev.Maglev
	tables
}

// Load loads the programs and maps (adopting pinned ones) without attaching anything.
func Load(opts Options) (*Datapath, error) {
	if opts.MaglevTableSize == 0 {
		opts.MaglevTableSize = maglev.DefaultTableSize
	}
	if opts.ConntrackSize == 0 {
		opts.ConntrackSize = DefaultConntrackSize
	}
	mg, err := maglev.New(maglev.Config{TableSize: uint64(opts.MaglevTableSize), Seed: opts.MaglevSeed})
	if err != nil {
		return nil, err
	}
	d := &Datapath{links: map[string]link.Link{}, pinDir: opts.PinDir, maglev: mg, tables: newTables()}
	if err := d.load(opts); err != nil {
		return nil, errors.Join(err, d.Close())
	}
	if err := d.adopt(); err != nil {
		return nil, errors.Join(err, d.Close())
	}
	if len(d.rebuilt) == 0 {
		if err := d.settle(); err != nil {
			return nil, errors.Join(err, d.Close())
		}
	}
	return d, nil
}

func (d *Datapath) load(opts Options) error {
	sockSpec, err := loadSockLB()
	if err != nil {
		return fmt.Errorf("read socket programs: %w", err)
	}
	npSpec, err := loadNodePort()
	if err != nil {
		return fmt.Errorf("read packet programs: %w", err)
	}
	for _, spec := range []*ebpf.CollectionSpec{sockSpec, npSpec} {
		spec.Maps["portico_maglev"].ValueSize = 4 * opts.MaglevTableSize
		if err := spec.Variables["maglev_size"].Set(opts.MaglevTableSize); err != nil {
			return fmt.Errorf("set the Maglev table size: %w", err)
		}
	}
	// Both objects declare every map of bpf/lib/lb.h: one set serves both layers.
	specs := map[string]*ebpf.MapSpec{}
	for _, spec := range []*ebpf.CollectionSpec{npSpec, sockSpec} {
		for name, ms := range spec.Maps {
			if ms.Pinning == ebpf.PinByName {
				specs[name] = ms
			}
		}
	}
	specs["portico_ct"].MaxEntries = opts.ConntrackSize
	specs["portico_ct_new"].MaxEntries = max(opts.ConntrackSize/4, 1)
	for name, size := range map[string]uint32{"portico_svc4": opts.ServiceEntries, "portico_svc6": opts.ServiceEntries,
		"portico_be4": opts.Backends, "portico_be6": opts.Backends} {
		if size > 0 {
			specs[name].MaxEntries = size
		}
	}
	var set pinSet
	if opts.PinDir != "" {
		if err := os.MkdirAll(opts.PinDir, 0o700); err != nil {
			return fmt.Errorf("make pin directory: %w", err)
		}
		if set, err = openMaps(opts.PinDir, specs); err != nil {
			return err
		}
	} else if set.maps, err = makeMaps(specs); err != nil {
		return err
	}
	defer func() {
		for _, m := range set.maps {
			m.Close()
		}
	}()
	d.rebuilt, d.stale = set.rebuilt, set.stale
	for _, p := range []struct {
		spec *ebpf.CollectionSpec
		into any
	}{{sockSpec, &d.sock}, {npSpec, &d.np}} {
		copts := ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{}}
		for name, ms := range p.spec.Maps {
			if m := set.maps[name]; m != nil {
				ms.MaxEntries, ms.Flags, ms.Pinning = m.MaxEntries(), m.Flags(), ebpf.PinNone
				copts.MapReplacements[name] = m
			}
		}
		if err := p.spec.LoadAndAssign(p.into, &copts); err != nil {
			return fmt.Errorf("load programs: %w", err)
		}
	}
	return nil
}

// makeMaps makes the maps of specs, unpinned.
func makeMaps(specs map[string]*ebpf.MapSpec) (map[string]*ebpf.Map, error) {
	maps := map[string]*ebpf.Map{}
	for name, ms := range specs {
		m, err := newMap(name, ms)
		if err != nil {
			for _, m := range maps {
				m.Close()
			}
			return nil, err
		}
		maps[name] = m
	}
	return maps, nil
}

// newMap makes a map of spec ms without pinning it (its caller pins it, or not).
func newMap(name string, ms *ebpf.MapSpec) (*ebpf.Map, error) {
	fresh := ms.Copy()
	fresh.Pinning = ebpf.PinNone
	m, err := ebpf.NewMap(fresh)
	if err != nil {
		return nil, fmt.Errorf("make map %s: %w", name, err)
	}
	return m, nil
}

// Capacity is what a loaded datapath's maps hold, per family for the first two.
type Capacity struct {
	ServiceEntries, Backends, Conntrack uint32
}

// Capacity returns the sizes of the maps as loaded (pinned ones keep theirs).
func (d *Datapath) Capacity() Capacity {
	return Capacity{ServiceEntries: d.sock.PorticoSvc4.MaxEntries(), Backends: d.sock.PorticoBe4.MaxEntries(), Conntrack: d.np.PorticoCt.MaxEntries()}
}

// AttachCgroup attaches the socket programs to a cgroup v2 directory: connections of the
// processes in it (and below) to a frontend's internal scope go to its backends.
func (d *Datapath) AttachCgroup(cgroupPath string) error {
	for _, p := range []struct {
		name   string
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		{"connect4", d.sock.PorticoConnect4, ebpf.AttachCGroupInet4Connect},
		{"sendmsg4", d.sock.PorticoSendmsg4, ebpf.AttachCGroupUDP4Sendmsg},
		{"recvmsg4", d.sock.PorticoRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
		{"getpeername4", d.sock.PorticoGetpeername4, ebpf.AttachCgroupInet4GetPeername},
		{"connect6", d.sock.PorticoConnect6, ebpf.AttachCGroupInet6Connect},
		{"sendmsg6", d.sock.PorticoSendmsg6, ebpf.AttachCGroupUDP6Sendmsg},
		{"recvmsg6", d.sock.PorticoRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
		{"getpeername6", d.sock.PorticoGetpeername6, ebpf.AttachCgroupInet6GetPeername},
	} {
		err := d.attach("link_"+p.name, p.prog, func() (link.Link, error) {
			return link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: p.attach, Program: p.prog})
		})
		if err != nil {
			return fmt.Errorf("attach %s to %s: %w", p.name, cgroupPath, err)
		}
	}
	return nil
}

// AttachInterface attaches the packet programs to an external interface (TCX ingress and
// egress): NodePort, ExternalIP and LoadBalancer traffic arriving on it is translated.
func (d *Datapath) AttachInterface(ifindex int) error {
	for _, p := range []struct {
		dir    string
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		{"ingress", d.np.PorticoNodeportIngress, ebpf.AttachTCXIngress},
		{"egress", d.np.PorticoNodeportEgress, ebpf.AttachTCXEgress},
	} {
		err := d.attach(fmt.Sprintf("link_tc_%d_%s", ifindex, p.dir), p.prog, func() (link.Link, error) {
			return link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: p.prog, Attach: p.attach})
		})
		if err != nil {
			return fmt.Errorf("attach the packet programs to interface %d (%s): %w", ifindex, p.dir, err)
		}
	}
	return nil
}

// DetachInterface removes the packet programs from an interface.
func (d *Datapath) DetachInterface(ifindex int) error {
	var errs []error
	for _, dir := range []string{"ingress", "egress"} {
		name := fmt.Sprintf("link_tc_%d_%s", ifindex, dir)
		if l, ok := d.links[name]; ok {
			if d.pinDir != "" {
				errs = append(errs, l.Unpin())
			}
			errs = append(errs, l.Close())
			delete(d.links, name)
		}
	}
	return errors.Join(errs...)
}

// attach adopts a pinned attachment, swapping in prog, or makes (and pins) a new one.
func (d *Datapath) attach(name string, prog *ebpf.Program, make func() (link.Link, error)) error {
	if _, ok := d.links[name]; ok {
		return nil
	}
	pin := filepath.Join(d.pinDir, name)
	if d.pinDir != "" {
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			swap := func() error {
				if err := l.Update(prog); err != nil {
					return fmt.Errorf("replace the program of %s: %w", pin, err)
				}
				return nil
			}
			if len(d.rebuilt) > 0 {
				// The running programs use maps this datapath rebuilt: they go on
				// until the first Apply has filled the new ones.
				d.swaps = append(d.swaps, swap)
			} else if err := swap(); err != nil {
				return errors.Join(err, l.Close())
			}
			d.links[name] = l
			return nil
		} else if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("load pinned link %s: %w", pin, err)
		}
	}
	l, err := make()
	if err != nil {
		return err
	}
	if d.pinDir != "" {
		if err := l.Pin(pin); err != nil {
			return errors.Join(fmt.Errorf("pin link: %w", err), l.Close())
		}
	}
	d.links[name] = l
	return nil
}

// Close releases this process's hold on the programs and maps. Pinned ones stay in force.
func (d *Datapath) Close() error {
	var errs []error
	for _, l := range d.links {
		errs = append(errs, l.Close())
	}
	errs = append(errs, d.sock.Close(), d.np.Close())
	return errors.Join(errs...)
}

// Uninstall detaches the programs and deletes the pins: translation stops for good.
func (d *Datapath) Uninstall() error {
	err := d.Close()
	if d.pinDir != "" {
		err = errors.Join(err, os.RemoveAll(d.pinDir))
	}
	return err
}

// ConntrackEntries counts the packet layer's flow entries (two per flow), for tests and
// metrics: confirmed flows and those still in the table of new flows (bpf/nodeport.c). A
// few thousand per syscall (BPF_MAP_LOOKUP_BATCH), about a millisecond for the default
// 131,072.
func (d *Datapath) ConntrackEntries() (confirmed, unconfirmed int, err error) {
	if confirmed, err = count(d.np.PorticoCt); err != nil {
		return 0, 0, err
	}
	unconfirmed, err = count(d.np.PorticoCtNew)
	return confirmed, unconfirmed, err
}

func count(m *ebpf.Map) (int, error) {
	const batch = 4096
	keys, vals := make([]nodePortCtKey, batch), make([]nodePortCtValue, batch)
	var cursor ebpf.MapBatchCursor
	total := 0
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		total += n
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return total, nil
		case err != nil:
			return total, fmt.Errorf("count conntrack entries: %w", err)
		}
	}
}
