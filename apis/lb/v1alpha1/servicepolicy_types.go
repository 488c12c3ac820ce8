package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// Backend selection algorithms.
const (
	AlgorithmRandom = "Random"
	AlgorithmMaglev = "Maglev"
)

// Forwarding modes.
const (
	ForwardingSNAT = "SNAT"
	ForwardingDSR  = "DSR"
)

// LoadBalancing chooses how the datapath picks a backend for a new connection.
//
// +kubebuilder:validation:XValidation:rule="!has(self.maglevTableSize) || self.algorithm == 'Maglev'",message="maglevTableSize applies only to the Maglev algorithm"
type LoadBalancing struct {
	// Algorithm is Random (uniform per connection) or Maglev (consistent hashing of the
	// 5-tuple: a backend change moves few connections, and every node picks the same backend).
	// +kubebuilder:validation:Enum=Random;Maglev
	// +kubebuilder:default=Random
	// +optional
	Algorithm string `json:"algorithm,omitempty"`
	// MaglevTableSize is the size of the Maglev lookup table, a prime. Larger tables spread
	// more evenly over many backends and use more memory. Default 16381.
	// +kubebuilder:validation:Enum=251;509;1021;2039;4093;8191;16381;32749;65521;131071
	// +optional
	MaglevTableSize int32 `json:"maglevTableSize,omitempty"`
}

// SessionAffinity overrides the Service's own spec.sessionAffinity.
//
// +kubebuilder:validation:XValidation:rule="!has(self.timeoutSeconds) || self.type == 'ClientIP'",message="timeoutSeconds applies only to ClientIP affinity"
type SessionAffinity struct {
	// Type is None or ClientIP (every connection of one client IP goes to one backend).
	// +kubebuilder:validation:Enum=None;ClientIP
	Type string `json:"type"`
	// TimeoutSeconds is how long an idle client keeps its backend. Default 10800.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=86400
	// +optional
	TimeoutSeconds *int32 `json:"timeoutSeconds,omitempty"`
}

// ServicePolicySpec sets datapath behaviour for the Services it targets.
//
// +kubebuilder:validation:XValidation:rule="(has(self.targetRefs) && size(self.targetRefs) > 0) || has(self.selector)",message="a policy needs targetRefs, a selector, or both"
type ServicePolicySpec struct {
	// TargetRefs names Services in the policy's namespace.
	// +kubebuilder:validation:MaxItems=16
	// +listType=atomic
	// +optional
	TargetRefs []ServiceTargetReference `json:"targetRefs,omitempty"`
	// Selector picks Services in the policy's namespace by label.
	// +optional
	Selector *LabelSelector `json:"selector,omitempty"`
	// LoadBalancing chooses the backend selection algorithm.
	// +optional
	LoadBalancing *LoadBalancing `json:"loadBalancing,omitempty"`
	// SourceRanges restricts the external frontends (NodePort, ExternalIPs, LoadBalancer IPs) to
	// clients in these CIDRs; everything else is dropped. It adds to the Service's own
	// spec.loadBalancerSourceRanges.
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=49
	// +kubebuilder:validation:XValidation:rule="self.all(c, isCIDR(c))",message="sourceRanges must be networks in prefix notation, such as 192.0.2.0/24 or 2001:db8::/64"
	// +listType=atomic
	// +optional
	SourceRanges []string `json:"sourceRanges,omitempty"`
	// ForwardingMode is SNAT (replies return through the node that received the request) or
	// DSR (backends answer clients directly; needs a datapath that supports it).
	// +kubebuilder:validation:Enum=SNAT;DSR
	// +kubebuilder:default=SNAT
	// +optional
	ForwardingMode string `json:"forwardingMode,omitempty"`
	// Acceleration is Disabled, Native (XDP in the driver; refused where the device cannot)
	// or BestEffort (XDP where the device can, TC elsewhere).
	// +kubebuilder:validation:Enum=Disabled;Native;BestEffort
	// +kubebuilder:default=Disabled
	// +optional
	Acceleration string `json:"acceleration,omitempty"`
	// SessionAffinity overrides the Service's spec.sessionAffinity.
	// +optional
	SessionAffinity *SessionAffinity `json:"sessionAffinity,omitempty"`
}

// ServicePolicy sets how the datapath serves the Services it targets.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=svcpol,categories=portico
// +kubebuilder:printcolumn:name="Services",type=integer,JSONPath=".status.attachedServices"
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=".status.conditions[?(@.type==\"Accepted\")].status"
// +kubebuilder:printcolumn:name="Conflict",type=string,JSONPath=".status.conditions[?(@.type==\"Conflict\")].status"
// +kubebuilder:printcolumn:name="Programmed",type=string,JSONPath=".status.conditions[?(@.type==\"Programmed\")].status"
// +kubebuilder:printcolumn:name="Nodes",type=integer,JSONPath=".status.programmedNodes"
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=".metadata.creationTimestamp"
type ServicePolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   ServicePolicySpec `json:"spec"`
	Status PolicyStatus      `json:"status,omitempty"`
}

// ServicePolicyList is a list of ServicePolicies.
//
// +kubebuilder:object:root=true
type ServicePolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []ServicePolicy `json:"items"`
}

func init() {
	SchemeBuilder.Register(&ServicePolicy{}, &ServicePolicyList{})
}
