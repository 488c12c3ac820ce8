// Package loadbalancer is Portico's load-balancing model, pure: what a node's datapath holds
// (frontends and their backends), the rules that read it from Services, EndpointSlices and
// Nodes as kube-proxy does (service.go), and the Syncer that keeps a datapath equal to the
// Services' claims (syncer.go). It knows no client and no datapath: internal/datapath
// implements Programmer, the agent feeds it objects.
package loadbalancer

import (
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// Protocol is a transport protocol, numbered as in IP headers.
type Protocol uint8

// The protocols the datapath translates.
const (
	TCP Protocol = 6
	UDP Protocol = 17
)

// Scope says which clients a frontend entry serves; one address has an entry per scope.
type Scope uint8

const (
	// External serves clients outside the node, at the packet layer: NodePort, ExternalIP
	// and LoadBalancer addresses. With externalTrafficPolicy Local, list only local backends.
	External Scope = 0
	// Internal serves clients on the node, at the socket layer: every frontend they can reach.
	// With internalTrafficPolicy Local, list only local backends.
	Internal Scope = 1
)

// Balancing chooses how a new flow picks its backend.
type Balancing uint8

const (
	// Random picks any backend.
	Random Balancing = iota
	// Maglev picks by the flow's hash in a Maglev table, the same on every node (packet layer).
	Maglev
)

// Backend is one endpoint of a frontend.
type Backend struct {
	Address netip.AddrPort
	// Local says the backend runs on this node: external traffic reaches it without SNAT.
	Local bool
	// Terminating backends get new flows only when no other backend is left; flows already
	// on them go on either way.
	Terminating bool
}

// Frontend is one address, port and protocol clients connect to, in one scope, and the
// backends behind it. No backend: connections are refused.
type Frontend struct {
	Address   netip.AddrPort
	Protocol  Protocol
	Scope     Scope
	Backends  []Backend
	Balancing Balancing
	// Affinity, when set, keeps a client on one backend until it has been idle this long
	// (sessionAffinity ClientIP). Clients on the node are told apart by network namespace.
	Affinity time.Duration
	// SourceRanges, when set, admit only these clients; the packet layer drops the rest
	// (loadBalancerSourceRanges). They must be of the frontend's family.
	SourceRanges []netip.Prefix
}

// ErrFull is what a Programmer's errors wrap when a frontend did not fit in its maps.
var ErrFull = errors.New("the datapath's maps are full")

// NotProgrammed is what a Programmer's Apply returns when some frontends did not fit (a
// full map): every other frontend is in place. Failed keeps the order Apply was given.
type NotProgrammed struct {
	Failed []Frontend
	Err    error // why the first of them failed
}

func (e *NotProgrammed) Error() string {
	return fmt.Sprintf("%d frontends not programmed, the first %s: %v", len(e.Failed), e.Failed[0].Address, e.Err)
}

func (e *NotProgrammed) Unwrap() error { return e.Err }
