package datapath

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/portico-dev/portico/test/harness/nstest"
)

// A map's layout digest changes with anything that changes what an entry means: a field's
// name, offset or type, the value size; not with the map's size or flags.
func TestLayoutFollowsKeyAndValueTypes(t *testing.T) {
	spec, err := loadNodePort()
	if err != nil {
		t.Fatal(err)
	}
	ct := spec.Maps["portico_ct"]
	base := layout(ct)
	resized := ct.Copy()
	resized.MaxEntries, resized.Flags = 7, 1
	if layout(resized) != base {
		t.Error("the size or flags changed the layout digest")
	}
	renamed := ct.Copy()
	value := btf.Copy(ct.Value).(*btf.Struct)
	value.Members[len(value.Members)-2].Name = "state"
	renamed.Value = value
	moved := ct.Copy()
	value = btf.Copy(ct.Value).(*btf.Struct)
	value.Members[0].Offset += 32
	moved.Value = value
	bigger := ct.Copy()
	bigger.ValueSize += 8
	for name, ms := range map[string]*ebpf.MapSpec{"a renamed field": renamed, "a moved field": moved, "a bigger value": bigger} {
		if layout(ms) == base {
			t.Errorf("%s kept the layout digest", name)
		}
	}
}

// Nodes installed before versioned pins have their maps pinned under bare names: an agent
// adopts them with their entries and pins them under their layout.
func TestBarePinsAreAdopted(t *testing.T) {
	nstest.NeedRoot(t, "loads BPF programs")
	pins := filepath.Join(nstest.BPFFS(t), "node")
	vip, backend := leavePinned(t, Options{PinDir: pins})
	entries, err := os.ReadDir(pins)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if bare := pinOf(e.Name()); bare != e.Name() {
			if err := os.Rename(filepath.Join(pins, e.Name()), filepath.Join(pins, bare)); err != nil {
				t.Fatal(err)
			}
		}
	}
	d, err := Load(Options{PinDir: pins})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Uninstall()
	if got := d.Rebuilt(); len(got) != 0 {
		t.Errorf("rebuilt %v, want every map adopted", got)
	}
	if got := frontends4(t, d); !slices.Equal(got[vip], []netip.AddrPort{backend}) {
		t.Fatalf("the frontend under a bare pin was not adopted: %v", got)
	}
	if got := pinsOf(t, pins, "portico_svc4"); len(got) != 1 || got[0] == "portico_svc4" {
		t.Fatalf("service map pins %v, want one under its layout", got)
	}
}
