package datapath

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// Versioned pins (docs/datapath.md "Upgrades"): each map is pinned as <name>-<layout>, the
// layout a digest of its type and its key and value types as BTF describes them (field
// names, offsets, sizes), so that an agent never reads a map another version laid out
// differently. A map pinned with the agent's layout is adopted with its entries; any other
// is built anew beside the old one, which the programs attached by the previous agent go
// on using until the new maps hold the desired state (the first Apply) and the new
// programs replace them in their links, atomically. Then the old pins go.

// serviceState are the maps the agent's desired state fills: one consistent set (slots
// name backends by number), so that when one of them is built anew, they all are.
var serviceState = []string{"portico_svc4", "portico_svc6", "portico_be4", "portico_be6", "portico_srcrange4", "portico_srcrange6"}

// pinSet is what openMaps found in a pin directory.
type pinSet struct {
	maps map[string]*ebpf.Map
	// rebuilt names the maps made anew beside a pinned map of another layout: until the
	// swap, the programs in the links use the old one.
	rebuilt []string
	// stale are the pins to delete once the links run the new programs.
	stale []string
}

// layout is the digest a map is pinned under: whatever would make an entry mean something
// else. Sizes (max entries) and flags are not part of it: a pinned map keeps them.
func layout(ms *ebpf.MapSpec) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s key %d ", ms.Type, ms.KeySize)
	describe(&b, ms.Key)
	fmt.Fprintf(&b, " value %d ", ms.ValueSize)
	describe(&b, ms.Value)
	sum := sha256.Sum256([]byte(b.String()))
	return hex.EncodeToString(sum[:6])
}

// describe writes a type's layout: scalars by size and encoding, arrays by element and
// length, structs and unions by their members' names, offsets and types.
func describe(b *strings.Builder, t btf.Type) {
	switch t := btf.UnderlyingType(t).(type) {
	case nil:
		b.WriteString("none")
	case *btf.Int:
		fmt.Fprintf(b, "int%d%s", t.Size*8, t.Encoding)
	case *btf.Enum:
		fmt.Fprintf(b, "enum%d", t.Size*8)
	case *btf.Array:
		fmt.Fprintf(b, "[%d]", t.Nelems)
		describe(b, t.Type)
	case *btf.Struct:
		fmt.Fprintf(b, "struct%d{", t.Size)
		members(b, t.Members)
	case *btf.Union:
		fmt.Fprintf(b, "union%d{", t.Size)
		members(b, t.Members)
	default:
		fmt.Fprintf(b, "%T", t)
	}
}

func members(b *strings.Builder, ms []btf.Member) {
	for _, m := range ms {
		fmt.Fprintf(b, "%s@%d:%d ", m.Name, m.Offset, m.BitfieldSize)
		describe(b, m.Type)
		b.WriteString(";")
	}
	b.WriteString("}")
}

// openMaps adopts or makes every map of specs in dir (made maps are pinned there) and sets
// each spec's size and flags to those of the map it gets, so that programs load with it.
func openMaps(dir string, specs map[string]*ebpf.MapSpec) (set pinSet, err error) {
	set.maps = map[string]*ebpf.Map{}
	defer func() {
		if err != nil {
			for _, m := range set.maps {
				m.Close()
			}
		}
	}()
	entries, err := os.ReadDir(dir)
	if err != nil {
		return set, fmt.Errorf("read pin directory: %w", err)
	}
	var present []string
	for _, e := range entries {
		present = append(present, e.Name())
	}
	pins := map[string]string{} // each map's pin name: its name and layout
	for name, ms := range specs {
		pins[name] = name + "-" + layout(ms)
	}
	pin := func(name string) string { return pins[name] }
	// Adopt every map pinned with our layout; a service-state map missing rebuilds the set.
	adopted := map[string]*ebpf.Map{}
	for name := range specs {
		if m, err := adopt(dir, present, name, pin(name), specs[name]); err != nil {
			return set, err
		} else if m != nil {
			adopted[name] = m
		}
	}
	if slices.ContainsFunc(serviceState, func(n string) bool { return adopted[n] == nil }) {
		for _, n := range serviceState {
			if m := adopted[n]; m != nil {
				m.Close()
				delete(adopted, n)
				if err := os.Remove(filepath.Join(dir, pin(n))); err != nil {
					return set, fmt.Errorf("remove a partial set of service maps: %w", err)
				}
				present = slices.DeleteFunc(present, func(p string) bool { return p == pin(n) })
			}
		}
	}
	for name, ms := range specs {
		m := adopted[name]
		if m == nil {
			if m, err = newMap(name, ms); err != nil {
				return set, err
			}
			if err := m.Pin(filepath.Join(dir, pin(name))); err != nil {
				return set, errors.Join(fmt.Errorf("pin map %s: %w", name, err), m.Close())
			}
			if slices.ContainsFunc(present, func(p string) bool { return pinOf(p) == name }) {
				set.rebuilt = append(set.rebuilt, name)
			}
		}
		set.maps[name] = m
		ms.MaxEntries, ms.Flags = m.MaxEntries(), m.Flags()
	}
	for _, p := range present {
		if !strings.HasPrefix(p, "link_") && (specs[pinOf(p)] == nil || p != pin(pinOf(p))) {
			set.stale = append(set.stale, filepath.Join(dir, p))
		}
	}
	slices.Sort(set.rebuilt)
	return set, nil
}

// adopt loads name's map pinned under want, or under its bare name as agents before
// versioned pins left it (type, key and value sizes must match, then it is renamed).
func adopt(dir string, present []string, name, want string, ms *ebpf.MapSpec) (*ebpf.Map, error) {
	if slices.Contains(present, want) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, want), nil)
		if err != nil {
			return nil, fmt.Errorf("load pinned map %s: %w", want, err)
		}
		return m, nil
	}
	if !slices.Contains(present, name) {
		return nil, nil
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
	if err != nil {
		return nil, fmt.Errorf("load pinned map %s: %w", name, err)
	}
	if m.Type() != ms.Type || m.KeySize() != ms.KeySize || m.ValueSize() != ms.ValueSize {
		m.Close()
		return nil, nil
	}
	if err := m.Pin(filepath.Join(dir, want)); err != nil {
		return nil, errors.Join(fmt.Errorf("rename pinned map %s: %w", name, err), m.Close())
	}
	return m, nil
}

// pinOf is the map name a pin stands for: the name without its layout.
func pinOf(pin string) string {
	if i := strings.LastIndexByte(pin, '-'); i > 0 {
		return pin[:i]
	}
	return pin
}

// settle runs the link updates an upgrade held back and removes the pins no program of
// this datapath uses: from here on, the previous agent's maps go with its programs.
func (d *Datapath) settle() error {
	var errs []error
	for _, swap := range d.swaps {
		errs = append(errs, swap())
	}
	d.swaps, d.rebuilt = nil, nil
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for _, p := range d.stale {
		errs = append(errs, os.RemoveAll(p))
	}
	d.stale = nil
	return errors.Join(errs...)
}

// Rebuilt names the maps this datapath made anew beside pinned maps of another layout (an
// upgrade that changed them), until the first Apply has filled them and the programs swap.
func (d *Datapath) Rebuilt() []string { return d.rebuilt }
