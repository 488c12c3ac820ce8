// Package allocator hands out LoadBalancer addresses from pools to Services.
//
// It is a pure in-memory core: it knows nothing of the API server. The caller feeds it the
// pools (already validated, with overlaps resolved) and one Service request at a time, and
// persists the results (in Service status) itself. Invariants it keeps after every call:
//   - an address is held only by Services that may share it (same sharing key, no port
//     collision, same backends when either uses externalTrafficPolicy=Local);
//   - every held address lies in a pool the allocator knows (enabled pools only) that selects
//     the Service and fits what the Service asked for (pool name, exact addresses, families).
package allocator

import (
	"fmt"
	"net/netip"

	"go4.org/netipx"
	"k8s.io/apimachinery/pkg/labels"
)

// Family is an IP family.
type Family int

// The two IP families.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// FamilyOf returns the family of an address.
func FamilyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

// Pool is one enabled pool as the allocator sees it.
type Pool struct {
	Name string
	// Addresses are the pool's addresses that no other pool holds.
	Addresses *netipx.IPSet
	// AutoAssign lets the pool serve Services that did not name it or one of its addresses.
	AutoAssign bool
	// AvoidBuggyIPs excludes IPv4 addresses ending in .0 and .255.
	AvoidBuggyIPs bool
	// Priority orders pools: lower first, then by name.
	Priority int32
	// ServiceSelector and NamespaceSelector restrict the Services served; nil selects all.
	ServiceSelector   labels.Selector
	NamespaceSelector labels.Selector
}

// Port is a protocol and port number a Service exposes; two Services collide on a port when
// both are equal.
type Port struct {
	Protocol string
	Port     int32
}

func (p Port) String() string { return fmt.Sprintf("%s/%d", p.Protocol, p.Port) }

// Sharing says with whom a Service may share an address.
type Sharing struct {
	// Key is the effective sharing key; empty means the Service shares with nobody. The caller
	// scopes it (for example by namespace) so that equal keys mean "may share".
	Key string
	// Ports the Service exposes on the address.
	Ports []Port
	// Local is true for externalTrafficPolicy=Local: the address must be announced where the
	// backends are, so sharers must have the same backends.
	Local bool
	// Backends identifies the Service's backends (for example its canonical pod selector).
	Backends string
}

// Service is what the allocator needs to know of one Service.
type Service struct {
	// Key identifies the Service (namespace/name).
	Key             string
	Labels          labels.Set
	NamespaceLabels labels.Set
	// Families are the families wanted, in order.
	Families []Family
	// PreferFamilies is true for ipFamilyPolicy=PreferDualStack: a family that no pool
	// serving the Service has at all is skipped instead of reported.
	PreferFamilies bool
	// RequestedIPs are exact addresses asked for; they replace automatic choice.
	RequestedIPs []netip.Addr
	// Pool is the name of the pool asked for; empty means any pool that selects the Service.
	Pool    string
	Sharing Sharing
}

// Reason classifies why an address could not be given.
type Reason string

// Reasons for an allocation failure; they become condition reasons and Event reasons.
const (
	ReasonNoPool           Reason = "NoMatchingPool"
	ReasonPoolExhausted    Reason = "PoolExhausted"
	ReasonRequestedTaken   Reason = "RequestedIPTaken"
	ReasonRequestedOutside Reason = "RequestedIPOutsidePools"
	ReasonSharingConflict  Reason = "SharingConflict"
	ReasonUnknownPool      Reason = "UnknownPool"
	ReasonFamilyMismatch   Reason = "FamilyMismatch"
)

// Error is an allocation failure a user can act on.
type Error struct {
	Reason Reason
	Family Family
	Msg    string
}

func (e *Error) Error() string { return e.Msg }

func failf(r Reason, f Family, format string, args ...any) *Error {
	return &Error{Reason: r, Family: f, Msg: fmt.Sprintf(format, args...)}
}

// Assignment is the addresses a Service holds, one per family at most, in the order of the
// Service's families.
type Assignment struct {
	IPs   []netip.Addr
	Pools []string
}
