package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// LBPool condition reasons.
const (
	ReasonPoolReady       = "Ready"
	ReasonPoolDisabled    = "Disabled"
	ReasonPoolInvalid     = "Invalid"
	ReasonPoolOverlaps    = "Overlaps"
	ReasonPoolNoConflict  = "NoConflict"
	ReasonPoolNoAddresses = "NoAddresses"
)

// IPBlock is a contiguous set of addresses: either a CIDR or an inclusive start/stop range.
// Both forms work for IPv4 and IPv6; a range stays within one family.
//
// CEL has no ordering of IP addresses: the start <= stop rule compares IPv4 addresses as
// numbers. No formulation for IPv6 fits the API server's cost budget, so a reversed IPv6
// range is caught by the operator instead: the pool becomes Ready=False (Invalid).
//
// +kubebuilder:validation:XValidation:rule="has(self.cidr) != (has(self.start) || has(self.stop))",message="a block is either a cidr or a start/stop range, not both and not neither"
// +kubebuilder:validation:XValidation:rule="has(self.start) == has(self.stop)",message="a range needs both start and stop"
// +kubebuilder:validation:XValidation:rule="!has(self.start) || !has(self.stop) || !isIP(self.start) || !isIP(self.stop) || ip(self.start).family() == ip(self.stop).family()",message="start and stop must be of the same IP family"
// +kubebuilder:validation:XValidation:rule="!has(self.start) || !has(self.stop) || !isIP(self.start) || !isIP(self.stop) || ip(self.start).family() != 4 || ip(self.stop).family() != 4 || (int(self.start.split('.')[0]) * 16777216 + int(self.start.split('.')[1]) * 65536 + int(self.start.split('.')[2]) * 256 + int(self.start.split('.')[3])) <= (int(self.stop.split('.')[0]) * 16777216 + int(self.stop.split('.')[1]) * 65536 + int(self.stop.split('.')[2]) * 256 + int(self.stop.split('.')[3]))",message="start must not be greater than stop"
type IPBlock struct {
	// CIDR is a network in prefix notation, such as 192.0.2.0/24 or 2001:db8::/120.
	// +kubebuilder:validation:MaxLength=49
	// +kubebuilder:validation:XValidation:rule="isCIDR(self)",message="cidr must be a network in prefix notation, such as 192.0.2.0/24 or 2001:db8::/120"
	// +kubebuilder:validation:XValidation:rule="!isCIDR(self) || cidr(self) == cidr(self).masked()",message="cidr has host bits set: write the network address, such as 192.0.2.0/24 rather than 192.0.2.1/24"
	// +optional
	CIDR string `json:"cidr,omitempty"`
	// Start is the first address of a range, such as 192.0.2.10.
	// +kubebuilder:validation:MaxLength=39
	// +kubebuilder:validation:XValidation:rule="isIP(self)",message="start must be an IP address, such as 192.0.2.10 or 2001:db8::10"
	// +optional
	Start string `json:"start,omitempty"`
	// Stop is the last address of a range, inclusive.
	// +kubebuilder:validation:MaxLength=39
	// +kubebuilder:validation:XValidation:rule="isIP(self)",message="stop must be an IP address, such as 192.0.2.20 or 2001:db8::20"
	// +optional
	Stop string `json:"stop,omitempty"`
}

// L2Announcement makes a pool's addresses reachable on the nodes' L2 segment: one node per
// address answers ARP (IPv4) and NDP (IPv6) for it.
type L2Announcement struct {
	// Enabled turns L2 announcement of this pool's addresses on or off.
	// +kubebuilder:default=true
	// +optional
	Enabled *bool `json:"enabled,omitempty"`
	// Interfaces are regular expressions (RE2, matched against the whole name) for the node
	// interfaces that may announce. Empty means the interfaces that carry the node's InternalIP
	// addresses (not pod veths or bridges).
	// +kubebuilder:validation:MaxItems=16
	// +kubebuilder:validation:items:MinLength=1
	// +kubebuilder:validation:items:MaxLength=256
	// +listType=atomic
	// +optional
	Interfaces []string `json:"interfaces,omitempty"`
	// NodeSelector limits the nodes that may announce. Empty means every node; nodes labelled
	// node.kubernetes.io/exclude-from-external-load-balancers never announce.
	// +optional
	NodeSelector *LabelSelector `json:"nodeSelector,omitempty"`
}

// Announcement says how a pool's addresses are made reachable.
type Announcement struct {
	// L2 announces with ARP and NDP on the local segment.
	// +optional
	L2 *L2Announcement `json:"l2,omitempty"`
}

// LBPoolSpec defines the addresses a pool hands out and to which Services.
type LBPoolSpec struct {
	// Blocks are the addresses of the pool. Blocks of one pool may touch or overlap; an address
	// that another, older pool already holds is not handed out (see the Conflict condition).
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:XValidation:rule="size(self) > 0",message="a pool needs at least one block (a cidr or a start/stop range)"
	// +listType=atomic
	Blocks []IPBlock `json:"blocks"`
	// AutoAssign lets the pool give addresses to Services that did not ask for it by name
	// (annotation lb.portico.dev/pool) or by address. Turning it off keeps the addresses already
	// handed out: it is the way to drain a pool without moving any Service.
	// +kubebuilder:default=true
	// +optional
	AutoAssign *bool `json:"autoAssign,omitempty"`
	// Disabled withdraws the pool: its addresses are taken back from every Service, which then
	// get addresses from other pools if any select them.
	// +optional
	Disabled bool `json:"disabled,omitempty"`
	// AvoidBuggyIPs skips IPv4 addresses ending in .0 and .255, which some old clients and
	// routers mishandle.
	// +optional
	AvoidBuggyIPs bool `json:"avoidBuggyIPs,omitempty"`
	// Priority orders the pools that may serve a Service: a lower value is tried first; pools of
	// equal priority are tried by name.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=1000
	// +optional
	Priority int32 `json:"priority,omitempty"`
	// ServiceSelector limits the pool to Services whose labels match. Empty means every Service.
	// +optional
	ServiceSelector *LabelSelector `json:"serviceSelector,omitempty"`
	// NamespaceSelector limits the pool to Services in namespaces whose labels match. Empty
	// means every namespace.
	// +optional
	NamespaceSelector *LabelSelector `json:"namespaceSelector,omitempty"`
	// Announce says how the addresses are made reachable.
	// +optional
	Announce *Announcement `json:"announce,omitempty"`
}

// AddressCounts counts one family's addresses of a pool.
type AddressCounts struct {
	// Allocated is how many addresses Services hold.
	Allocated int64 `json:"allocated"`
	// Available is how many addresses are still free, in decimal: an IPv6 pool can hold more
	// than a 64-bit integer counts.
	Available string `json:"available"`
}

// LBPoolStatus is what the operator observed of a pool.
type LBPoolStatus struct {
	// Conditions: Ready (the pool hands out addresses) and Conflict (some of its blocks
	// overlap an older pool, whose addresses they stay).
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// Blocks lists the pool's blocks as text, for kubectl get.
	// +optional
	Blocks string `json:"blocks,omitempty"`
	// IPv4 counts the pool's IPv4 addresses; absent when the pool has none.
	// +optional
	IPv4 *AddressCounts `json:"ipv4,omitempty"`
	// IPv6 counts the pool's IPv6 addresses; absent when the pool has none.
	// +optional
	IPv6 *AddressCounts `json:"ipv6,omitempty"`
}

// LBPool is a pool of addresses that Services of type LoadBalancer get their IPs from.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=lbp,categories=portico
// +kubebuilder:printcolumn:name="Blocks",type=string,JSONPath=".status.blocks"
// +kubebuilder:printcolumn:name="V4 Allocated",type=integer,JSONPath=".status.ipv4.allocated"
// +kubebuilder:printcolumn:name="V4 Available",type=string,JSONPath=".status.ipv4.available"
// +kubebuilder:printcolumn:name="V6 Allocated",type=integer,JSONPath=".status.ipv6.allocated"
// +kubebuilder:printcolumn:name="V6 Available",type=string,JSONPath=".status.ipv6.available"
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=".status.conditions[?(@.type==\"Ready\")].status"
// +kubebuilder:printcolumn:name="Conflict",type=string,JSONPath=".status.conditions[?(@.type==\"Conflict\")].status",priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=".metadata.creationTimestamp"
type LBPool struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   LBPoolSpec   `json:"spec"`
	Status LBPoolStatus `json:"status,omitempty"`
}

// LBPoolList is a list of LBPools.
//
// +kubebuilder:object:root=true
type LBPoolList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []LBPool `json:"items"`
}

func init() {
	SchemeBuilder.Register(&LBPool{}, &LBPoolList{})
}
