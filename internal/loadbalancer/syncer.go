package loadbalancer

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// Programmer is what the agent needs of the datapath (*datapath.Datapath implements it).
type Programmer interface {
	Apply([]Frontend) error
	Update(Frontend) error
	Delete(addr netip.AddrPort, proto Protocol, scope Scope) error
}

// slot is one frontend entry of the datapath: two Services cannot both have it. It holds
// no pointer (netip.Addr has one): the garbage collector does not scan the maps keyed by
// the slots of 10,000 Services.
type slot struct {
	addr  [16]byte // IPv4 as IPv4-mapped
	port  uint16
	is4   bool
	proto Protocol
	scope Scope
}

func slotOf(f Frontend) slot {
	a := f.Address.Addr()
	return slot{a.As16(), f.Address.Port(), a.Is4(), f.Protocol, f.Scope}
}

// address is the slot's address and port.
func (s slot) address() netip.AddrPort {
	a := netip.AddrFrom16(s.addr)
	if s.is4 {
		a = a.Unmap()
	}
	return netip.AddrPortFrom(a, s.port)
}

func (s slot) String() string {
	return fmt.Sprintf("%s/%s", s.address(), map[Protocol]string{TCP: "TCP", UDP: "UDP"}[s.proto])
}

// Claim is what one Service asks for: its frontends, and its age, which settles conflicts
// (the older Service keeps an address and port, then the name that sorts first), so that
// every node and every restart decide alike.
type Claim struct {
	Service   types.NamespacedName
	Created   time.Time
	Frontends []Frontend
}

func older(a, b Claim) bool {
	if c := a.Created.Compare(b.Created); c != 0 {
		return c < 0
	}
	return cmp.Or(cmp.Compare(a.Service.Namespace, b.Service.Namespace), cmp.Compare(a.Service.Name, b.Service.Name)) < 0
}

// Syncer keeps the datapath equal to the Services' claims, one Service at a time.
type Syncer struct {
	dp     Programmer
	mu     sync.Mutex
	claims map[types.NamespacedName]Claim
	// claimants lists, per slot, the Services asking for it and their frontend there
	// (nearly always one: a slice, not a map, of them).
	claimants map[slot][]claimant
	// owner says which Service each programmed slot belongs to; programmed is what it holds.
	owner      map[slot]types.NamespacedName
	programmed map[slot]Frontend
	// slots counts the programmed slots of each Service.
	slots map[types.NamespacedName]int
	// waiting are the Services some frontend of which did not fit (ErrFull): they are set
	// again as soon as another Service's change frees room.
	waiting map[types.NamespacedName]bool
}

// NewSyncer returns a Syncer that programs dp.
func NewSyncer(dp Programmer) *Syncer {
	return &Syncer{dp: dp, claims: map[types.NamespacedName]Claim{}, claimants: map[slot][]claimant{},
		owner: map[slot]types.NamespacedName{}, programmed: map[slot]Frontend{}, slots: map[types.NamespacedName]int{},
		waiting: map[types.NamespacedName]bool{}}
}

// own gives slot k to svc ({} for nobody), keeping the counts.
func (s *Syncer) own(k slot, svc types.NamespacedName) {
	if prev, had := s.owner[k]; had {
		if s.slots[prev]--; s.slots[prev] == 0 {
			delete(s.slots, prev)
		}
		delete(s.owner, k)
	}
	if svc != (types.NamespacedName{}) {
		s.owner[k] = svc
		s.slots[svc]++
	}
}

// record makes c the Service's claim (none when it has no frontends), keeping claimants.
func (s *Syncer) record(c Claim) {
	for _, f := range s.claims[c.Service].Frontends {
		k := slotOf(f)
		left := slices.DeleteFunc(s.claimants[k], func(o claimant) bool { return o.service == c.Service })
		if len(left) == 0 {
			delete(s.claimants, k)
		} else {
			s.claimants[k] = left
		}
	}
	delete(s.claims, c.Service)
	if len(c.Frontends) == 0 {
		return
	}
	s.claims[c.Service] = c
	for i, f := range c.Frontends {
		k := slotOf(f)
		s.claimants[k] = append(s.claimants[k], claimant{c.Service, int32(i)})
	}
}

// Resync replaces everything at once with the claims (the start, adopting pinned maps:
// entries that stay are rewritten in place, flows and sockets go on). The oldest Services'
// frontends go first: when the maps cannot hold them all, the same Services are left out on
// every node and every restart, and Resync returns them (incomplete) to be set again later,
// when room may have freed; every other Service is programmed.
func (s *Syncer) Resync(claims []Claim) (incomplete []types.NamespacedName, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.claims, s.claimants = map[types.NamespacedName]Claim{}, map[slot][]claimant{}
	for _, c := range claims {
		s.record(c)
	}
	owner, programmed, slots := map[slot]types.NamespacedName{}, map[slot]Frontend{}, map[types.NamespacedName]int{}
	keys := make([]slot, 0, len(s.claimants))
	for k := range s.claimants {
		winner, f, _ := s.winner(k)
		owner[k], programmed[k] = winner, f
		slots[winner]++
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b slot) int {
		ca, cb := s.claims[owner[a]], s.claims[owner[b]]
		switch {
		case ca.Service != cb.Service && older(ca, cb):
			return -1
		case ca.Service != cb.Service:
			return 1
		}
		return cmp.Or(bytes.Compare(a.addr[:], b.addr[:]), cmp.Compare(a.port, b.port), cmp.Compare(a.proto, b.proto), cmp.Compare(a.scope, b.scope))
	})
	all := make([]Frontend, len(keys))
	for i, k := range keys {
		all[i] = programmed[k]
	}
	waiting := map[types.NamespacedName]bool{}
	var np *NotProgrammed
	if err := s.dp.Apply(all); errors.As(err, &np) {
		for _, f := range np.Failed {
			k := slotOf(f)
			svc := owner[k]
			delete(owner, k)
			delete(programmed, k)
			if slots[svc]--; slots[svc] == 0 {
				delete(slots, svc)
			}
			waiting[svc] = true
		}
	} else if err != nil {
		return nil, fmt.Errorf("apply %d frontends: %w", len(all), err)
	}
	s.owner, s.programmed, s.slots, s.waiting = owner, programmed, slots, waiting
	return slices.Collect(maps.Keys(waiting)), nil
}

// Set records a Service's claim (nil Frontends: the Service is gone or not ours) and
// changes only the slots whose winner or content changed. It returns the slots the Service
// lost to an older one, and the other Services to set again: those whose slots changed
// hands (their owners may want to tell their users), and, when this change freed room in
// the datapath, those waiting for it.
func (s *Syncer) Set(c Claim) (lost []string, affected []types.NamespacedName, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Only the slots this Service had or asks for can change.
	touched := map[slot]bool{}
	for _, f := range s.claims[c.Service].Frontends {
		touched[slotOf(f)] = true
	}
	for _, f := range c.Frontends {
		touched[slotOf(f)] = true
	}
	s.record(c)
	var errs []error
	freed := false
	for k := range touched {
		winner, f, ok := s.winner(k)
		asks := slices.ContainsFunc(s.claimants[k], func(o claimant) bool { return o.service == c.Service })
		if asks && winner != c.Service {
			lost = append(lost, fmt.Sprintf("%s is %s/%s's (older)", k, winner.Namespace, winner.Name))
		}
		if prev, had := s.owner[k]; had && prev != winner {
			for _, o := range []types.NamespacedName{prev, winner} {
				if o != c.Service && o != (types.NamespacedName{}) && !slices.Contains(affected, o) {
					affected = append(affected, o)
				}
			}
		}
		switch {
		case !ok:
			if _, had := s.programmed[k]; !had {
				continue
			}
			if err := s.dp.Delete(k.address(), k.proto, k.scope); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", k, err))
				continue
			}
			freed = true
			delete(s.programmed, k)
			s.own(k, types.NamespacedName{})
		case !reflect.DeepEqual(s.programmed[k], f):
			if err := s.dp.Update(f); err != nil {
				errs = append(errs, fmt.Errorf("program %s: %w", k, err))
				continue
			}
			freed = freed || len(f.Backends) < len(s.programmed[k].Backends)
			s.programmed[k] = f
			s.own(k, winner)
		default:
			s.own(k, winner)
		}
	}
	err = errors.Join(errs...)
	switch {
	case errors.Is(err, ErrFull):
		s.waiting[c.Service] = true
	case err == nil:
		delete(s.waiting, c.Service)
	}
	if freed {
		for svc := range s.waiting {
			if svc != c.Service && !slices.Contains(affected, svc) {
				affected = append(affected, svc)
			}
		}
	}
	slices.Sort(lost)
	return lost, affected, err
}

// Waiting says how many Services wait for room in the datapath's maps.
func (s *Syncer) Waiting() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.waiting)
}

// claimant is a Service asking for a slot, and which of its claim's frontends is there (an
// index, not a copy: 80,000 slots at 10,000 LoadBalancer Services).
type claimant struct {
	service  types.NamespacedName
	frontend int32
}

// winner returns which Service gets a slot, and its frontend there.
func (s *Syncer) winner(k slot) (types.NamespacedName, Frontend, bool) {
	var best Claim
	var front Frontend
	found := false
	for _, o := range s.claimants[k] {
		if c := s.claims[o.service]; !found || older(c, best) {
			best, front, found = c, c.Frontends[o.frontend], true
		}
	}
	return best.Service, front, found
}

// Counts returns how many Services have frontends programmed and how many frontends.
func (s *Syncer) Counts() (services, frontends int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.slots), len(s.programmed)
}
