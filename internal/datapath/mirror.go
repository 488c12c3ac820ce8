package datapath

// mirror is what one family's service map holds, as the tables wrote it, grouped by
// frontend: its entry (slot 0) and the backend numbers its slots 1..n name. One Go map
// entry per frontend rather than per slot: at 10 backends a frontend, a fifth of the
// memory (docs/benchmarks.md, the agent at 10,000 LoadBalancer Services).
type mirror[K comparable] struct {
	// frontends are keyed by their entry's key (slot 0), whether that entry is there or
	// not (a delete that failed halfway leaves slots).
	frontends map[K]*mirrored
	entries   int // service map entries, slots included
	slot      func(K) uint16
	withSlot  func(K, uint16) K
}

type mirrored struct {
	head    sockLBSvcValue
	hasHead bool
	// slots[i-1] is the backend number slot i names; 0 (a number never given): no slot i.
	slots []uint32
}

func newMirror[K comparable](slot func(K) uint16, withSlot func(K, uint16) K) *mirror[K] {
	return &mirror[K]{frontends: map[K]*mirrored{}, slot: slot, withSlot: withSlot}
}

// get is the entry at k: a frontend's (slot 0), or a slot's, which names a backend alone.
func (m *mirror[K]) get(k K) (sockLBSvcValue, bool) {
	f := m.frontends[m.withSlot(k, 0)]
	switch i := int(m.slot(k)); {
	case f == nil:
		return sockLBSvcValue{}, false
	case i == 0:
		return f.head, f.hasHead
	case i <= len(f.slots) && f.slots[i-1] != 0:
		return sockLBSvcValue{BackendId: f.slots[i-1]}, true
	}
	return sockLBSvcValue{}, false
}

func (m *mirror[K]) set(k K, v sockLBSvcValue) {
	head := m.withSlot(k, 0)
	f := m.frontends[head]
	if f == nil {
		f = &mirrored{}
		m.frontends[head] = f
	}
	if _, had := m.get(k); !had {
		m.entries++
	}
	if i := int(m.slot(k)); i == 0 {
		f.head, f.hasHead = v, true
	} else {
		for len(f.slots) < i {
			f.slots = append(f.slots, 0)
		}
		f.slots[i-1] = v.BackendId
	}
}

func (m *mirror[K]) del(k K) {
	if _, had := m.get(k); !had {
		return
	}
	m.entries--
	head := m.withSlot(k, 0)
	f := m.frontends[head]
	if i := int(m.slot(k)); i == 0 {
		f.head, f.hasHead = sockLBSvcValue{}, false
	} else {
		f.slots[i-1] = 0
	}
	for len(f.slots) > 0 && f.slots[len(f.slots)-1] == 0 {
		f.slots = f.slots[:len(f.slots)-1]
	}
	if !f.hasHead && len(f.slots) == 0 {
		delete(m.frontends, head)
	}
}
