package allocator

import (
	"cmp"
	"errors"
	"net/netip"
	"slices"
	"strings"
)

// Allocator hands out addresses. It is not safe for concurrent use: the caller serialises.
type Allocator struct {
	pools   []*pool // ordered: priority, then name
	byName  map[string]*pool
	leases  map[netip.Addr]*lease
	holders map[string]*holder
	// shared indexes the addresses held under each sharing key, so that a Service with a key
	// finds its sharers without a scan.
	shared map[string]map[netip.Addr]struct{}
}

type pool struct {
	Pool
	byFamily map[Family][]rangeOf
	capacity map[Family]uint64
	used     map[Family]uint64
	// cursor is where the next search for a free address starts, per family: allocation is
	// O(1) while the pool is not fragmented, and freed addresses are reused only after the
	// cursor wraps, which keeps a just-released address from being handed out at once.
	cursor map[Family]netip.Addr
}

type rangeOf struct{ from, to netip.Addr }

type lease struct {
	pool *pool
	// key is the sharing key the address is indexed under in Allocator.shared.
	key     string
	holders map[string]*holder
}

type holder struct {
	svc Service
	ips []netip.Addr
}

// New returns an allocator with no pools.
func New() *Allocator {
	return &Allocator{
		byName:  map[string]*pool{},
		leases:  map[netip.Addr]*lease{},
		holders: map[string]*holder{},
		shared:  map[string]map[netip.Addr]struct{}{},
	}
}

// SetPools replaces the pools. Addresses that no longer lie in a pool, or whose pool no
// longer fits their Service, are taken back; the keys of the Services that lost an address
// are returned, sorted, so that the caller can give them new ones.
func (a *Allocator) SetPools(pools []Pool) []string {
	a.pools = a.pools[:0]
	old := a.byName
	a.byName = make(map[string]*pool, len(pools))
	for _, p := range pools {
		np := &pool{
			Pool:     p,
			byFamily: map[Family][]rangeOf{},
			capacity: map[Family]uint64{},
			used:     map[Family]uint64{},
			cursor:   map[Family]netip.Addr{},
		}
		if p.Addresses != nil {
			for _, r := range p.Addresses.Ranges() {
				f := FamilyOf(r.From())
				np.byFamily[f] = append(np.byFamily[f], rangeOf{r.From(), r.To()})
			}
		}
		v4, v6 := Capacity(p.Addresses, p.AvoidBuggyIPs)
		np.capacity[IPv4], np.capacity[IPv6] = saturate(v4), saturate(v6)
		if prev, ok := old[p.Name]; ok {
			for f, c := range prev.cursor {
				np.cursor[f] = c
			}
		}
		a.pools = append(a.pools, np)
		a.byName[p.Name] = np
	}
	slices.SortFunc(a.pools, func(x, y *pool) int {
		return cmp.Or(cmp.Compare(x.Priority, y.Priority), strings.Compare(x.Name, y.Name))
	})

	var affected []string
	for ip, l := range a.leases {
		l.pool = a.poolOf(ip)
		if l.pool != nil {
			l.pool.used[FamilyOf(ip)]++
		}
	}
	for key, h := range a.holders {
		lost := false
		for _, ip := range slices.Clone(h.ips) {
			if a.fits(h.svc, ip, a.leases[ip].pool) != nil {
				a.drop(h, ip)
				lost = true
			}
		}
		if lost {
			affected = append(affected, key)
		}
	}
	slices.Sort(affected)
	return affected
}

// poolOf returns the pool that holds an address, or nil.
func (a *Allocator) poolOf(ip netip.Addr) *pool {
	for _, p := range a.pools {
		if p.Addresses != nil && p.Addresses.Contains(ip) && !(p.AvoidBuggyIPs && isBuggy(ip)) {
			return p
		}
	}
	return nil
}

// selects reports whether a pool may serve a Service at all.
func (p *pool) selects(svc Service) bool {
	if svc.Pool != "" && svc.Pool != p.Name {
		return false
	}
	if p.ServiceSelector != nil && !p.ServiceSelector.Matches(svc.Labels) {
		return false
	}
	return p.NamespaceSelector == nil || p.NamespaceSelector.Matches(svc.NamespaceLabels)
}

// fits says why a Service may not hold an address in pool p (nil: it may), leaving aside
// the other holders of the address.
func (a *Allocator) fits(svc Service, ip netip.Addr, p *pool) error {
	f := FamilyOf(ip)
	switch {
	case !slices.Contains(svc.Families, f):
		return failf(ReasonFamilyMismatch, f, "%s is %s, but the Service's ipFamilies are %v", ip, f, svc.Families)
	case len(svc.RequestedIPs) > 0 && !slices.Contains(svc.RequestedIPs, ip):
		return failf(ReasonRequestedOutside, f, "%s is not among the requested addresses", ip)
	case p == nil:
		return failf(ReasonRequestedOutside, f, "%s is in no enabled pool", ip)
	case svc.Pool != "" && svc.Pool != p.Name:
		return failf(ReasonUnknownPool, f, "%s is in pool %s, not in the requested pool %s", ip, p.Name, svc.Pool)
	case !p.selects(svc):
		return failf(ReasonNoPool, f, "pool %s, which holds %s, does not select the Service", p.Name, ip)
	}
	return nil
}

// compatible says why svc may not share ip with its current holders (nil: it may).
func (a *Allocator) compatible(svc Service, ip netip.Addr) error {
	l := a.leases[ip]
	if l == nil {
		return nil
	}
	for key, h := range l.holders {
		if key == svc.Key {
			continue
		}
		if err := canShare(svc.Sharing, h.svc.Sharing); err != nil {
			return failf(ReasonSharingConflict, FamilyOf(ip), "%s is held by %s: %v", ip, key, err)
		}
	}
	return nil
}

// Claim takes addresses a Service already announced (its status, after a restart) where it
// still may hold them, without handing out anything new. It returns what the Service holds.
func (a *Allocator) Claim(svc Service, ips []netip.Addr) []netip.Addr {
	h := a.holder(svc)
	for _, ip := range ips {
		f := FamilyOf(ip)
		if slices.ContainsFunc(h.ips, func(x netip.Addr) bool { return FamilyOf(x) == f }) {
			continue
		}
		var p *pool
		if l := a.leases[ip]; l != nil {
			p = l.pool
		} else {
			p = a.poolOf(ip)
		}
		if a.fits(svc, ip, p) == nil && a.compatible(svc, ip) == nil {
			a.take(h, ip, p)
		}
	}
	a.forgetIfEmpty(h)
	return slices.Clone(h.ips)
}

// Assign gives a Service one address of each family it wants, keeping the addresses it
// holds where they still fit. The Assignment may be partial: the error then says, per family,
// why an address is missing, as *Error values joined with errors.Join.
func (a *Allocator) Assign(svc Service) (Assignment, error) {
	h := a.holder(svc)
	h.svc = svc
	for _, ip := range slices.Clone(h.ips) {
		if a.fits(svc, ip, a.leases[ip].pool) != nil || a.compatible(svc, ip) != nil {
			a.drop(h, ip)
			continue
		}
		a.index(ip, a.leases[ip])
	}
	var errs []error
	for _, f := range svc.Families {
		if slices.ContainsFunc(h.ips, func(x netip.Addr) bool { return FamilyOf(x) == f }) {
			continue
		}
		if err := a.allocate(h, f); err != nil {
			errs = append(errs, err)
		}
	}
	for _, ip := range svc.RequestedIPs {
		if !slices.Contains(svc.Families, FamilyOf(ip)) {
			errs = append(errs, failf(ReasonFamilyMismatch, FamilyOf(ip), "requested %s is %s, but the Service's ipFamilies are %v", ip, FamilyOf(ip), svc.Families))
		}
	}
	a.forgetIfEmpty(h)
	return a.assignment(h, svc.Families), errors.Join(errs...)
}

// Assigned returns what a Service holds.
func (a *Allocator) Assigned(key string) Assignment {
	h := a.holders[key]
	if h == nil {
		return Assignment{}
	}
	return a.assignment(h, h.svc.Families)
}

// Release takes back every address of a Service.
func (a *Allocator) Release(key string) {
	h := a.holders[key]
	if h == nil {
		return
	}
	for _, ip := range slices.Clone(h.ips) {
		a.drop(h, ip)
	}
	delete(a.holders, key)
}

// Holders returns the keys of the Services that hold an address.
func (a *Allocator) Holders(ip netip.Addr) []string {
	l := a.leases[ip]
	if l == nil {
		return nil
	}
	keys := make([]string, 0, len(l.holders))
	for k := range l.holders {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func (a *Allocator) assignment(h *holder, order []Family) Assignment {
	var out Assignment
	for _, f := range order {
		for _, ip := range h.ips {
			if FamilyOf(ip) == f {
				out.IPs = append(out.IPs, ip)
				name := ""
				if p := a.leases[ip].pool; p != nil {
					name = p.Name
				}
				out.Pools = append(out.Pools, name)
			}
		}
	}
	return out
}

func (a *Allocator) holder(svc Service) *holder {
	h := a.holders[svc.Key]
	if h == nil {
		h = &holder{svc: svc}
		a.holders[svc.Key] = h
	}
	return h
}

func (a *Allocator) forgetIfEmpty(h *holder) {
	if len(h.ips) == 0 {
		delete(a.holders, h.svc.Key)
	}
}

// allocate gives h one address of family f: a requested one, one a sharer already holds, or
// a free one from the first pool that has one.
func (a *Allocator) allocate(h *holder, f Family) error {
	svc := h.svc
	if len(svc.RequestedIPs) > 0 {
		return a.allocateRequested(h, f)
	}
	var candidates []*pool
	exists := false
	for _, p := range a.pools {
		if p.capacity[f] == 0 || !p.selects(svc) {
			continue
		}
		exists = true
		if svc.Pool != "" || p.AutoAssign {
			candidates = append(candidates, p)
		}
	}
	if svc.Pool != "" && a.byName[svc.Pool] == nil {
		return failf(ReasonUnknownPool, f, "the requested pool %s does not exist or is disabled", svc.Pool)
	}
	if len(candidates) == 0 {
		switch {
		case svc.PreferFamilies && !exists:
			return nil
		case svc.Pool != "":
			return failf(ReasonNoPool, f, "the requested pool %s has no %s addresses for this Service (check its service and namespace selectors)", svc.Pool, f)
		case exists:
			return failf(ReasonNoPool, f, "the pools that select this Service with %s addresses have autoAssign off; request one by annotation", f)
		}
		return failf(ReasonNoPool, f, "no enabled pool with %s addresses selects this Service", f)
	}
	if ip, p, ok := a.findShared(svc, f, candidates); ok {
		a.take(h, ip, p)
		return nil
	}
	for _, p := range candidates {
		if ip, ok := p.next(f, a.leases); ok {
			a.take(h, ip, p)
			return nil
		}
	}
	names := make([]string, len(candidates))
	for i, p := range candidates {
		names[i] = p.Name
	}
	return failf(ReasonPoolExhausted, f, "no free %s address in pools %s", f, strings.Join(names, ", "))
}

func (a *Allocator) allocateRequested(h *holder, f Family) error {
	svc := h.svc
	var errs []error
	for _, ip := range svc.RequestedIPs {
		if FamilyOf(ip) != f {
			continue
		}
		p := a.poolOf(ip)
		if l := a.leases[ip]; l != nil {
			p = l.pool
		}
		if err := a.fits(svc, ip, p); err != nil {
			errs = append(errs, err)
			continue
		}
		if l := a.leases[ip]; l != nil && len(l.holders) > 0 {
			if svc.Sharing.Key == "" {
				errs = append(errs, failf(ReasonRequestedTaken, f, "requested %s is held by %s", ip, strings.Join(a.Holders(ip), ", ")))
				continue
			}
			if err := a.compatible(svc, ip); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		a.take(h, ip, p)
		return nil
	}
	if len(errs) == 0 {
		if svc.PreferFamilies {
			return nil
		}
		return failf(ReasonFamilyMismatch, f, "the Service wants %s but requested no %s address", f, f)
	}
	return errs[0]
}

// findShared looks for an address a Service with the same sharing key holds in one of the
// candidate pools, that svc may share.
func (a *Allocator) findShared(svc Service, f Family, candidates []*pool) (netip.Addr, *pool, bool) {
	if svc.Sharing.Key == "" {
		return netip.Addr{}, nil, false
	}
	var ips []netip.Addr
	for ip := range a.shared[svc.Sharing.Key] {
		if FamilyOf(ip) == f {
			ips = append(ips, ip)
		}
	}
	slices.SortFunc(ips, netip.Addr.Compare)
	for _, ip := range ips {
		p := a.leases[ip].pool
		if slices.Contains(candidates, p) && a.compatible(svc, ip) == nil {
			return ip, p, true
		}
	}
	return netip.Addr{}, nil, false
}

// next finds a free address of family f, searching from the pool's cursor and wrapping once.
func (p *pool) next(f Family, leases map[netip.Addr]*lease) (netip.Addr, bool) {
	if p.used[f] >= p.capacity[f] {
		return netip.Addr{}, false
	}
	ranges := p.byFamily[f]
	start, at := 0, ranges[0].from
	if c, ok := p.cursor[f]; ok {
		for i, r := range ranges {
			if c.Compare(r.from) >= 0 && c.Compare(r.to) <= 0 {
				start, at = i, c
				break
			}
		}
	}
	// Visit every range once from the cursor on, then the start of the first range again.
	for n := 0; n <= len(ranges); n++ {
		i := (start + n) % len(ranges)
		r := ranges[i]
		from := r.from
		if n == 0 {
			from = at
		}
		for ip := from; ip.IsValid() && ip.Compare(r.to) <= 0; ip = ip.Next() {
			if n == len(ranges) && ip.Compare(at) >= 0 {
				break
			}
			if _, taken := leases[ip]; taken || (p.AvoidBuggyIPs && isBuggy(ip)) {
				continue
			}
			p.cursor[f] = ip.Next()
			return ip, true
		}
	}
	return netip.Addr{}, false
}

func (a *Allocator) take(h *holder, ip netip.Addr, p *pool) {
	l := a.leases[ip]
	if l == nil {
		l = &lease{pool: p, holders: map[string]*holder{}}
		a.leases[ip] = l
		if p != nil {
			p.used[FamilyOf(ip)]++
		}
	}
	l.holders[h.svc.Key] = h
	h.ips = append(h.ips, ip)
	a.index(ip, l)
}

// index files an address under the sharing key of its holders. Holders of one address all
// have the same key, except for a moment when the only holder's key changes.
func (a *Allocator) index(ip netip.Addr, l *lease) {
	var key string
	for _, h := range l.holders {
		key = h.svc.Sharing.Key
		break
	}
	if key == l.key {
		return
	}
	a.unindex(ip, l)
	l.key = key
	if key != "" {
		if a.shared[key] == nil {
			a.shared[key] = map[netip.Addr]struct{}{}
		}
		a.shared[key][ip] = struct{}{}
	}
}

func (a *Allocator) unindex(ip netip.Addr, l *lease) {
	if l.key == "" {
		return
	}
	delete(a.shared[l.key], ip)
	if len(a.shared[l.key]) == 0 {
		delete(a.shared, l.key)
	}
	l.key = ""
}

func (a *Allocator) drop(h *holder, ip netip.Addr) {
	h.ips = slices.DeleteFunc(h.ips, func(x netip.Addr) bool { return x == ip })
	l := a.leases[ip]
	if l == nil {
		return
	}
	delete(l.holders, h.svc.Key)
	if len(l.holders) > 0 {
		return
	}
	delete(a.leases, ip)
	if l.pool != nil {
		l.pool.used[FamilyOf(ip)]--
	}
	a.unindex(ip, l)
}
