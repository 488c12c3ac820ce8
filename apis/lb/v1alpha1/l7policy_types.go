package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// Duration is a time span such as 500ms, 10s or 1m30s (Gateway API GEP-2257 form).
//
// +kubebuilder:validation:MaxLength=24
// +kubebuilder:validation:XValidation:rule="self.matches('^([0-9]{1,5}(h|m|s|ms)){1,4}$')",message="must be a duration such as 500ms, 10s or 1m30s"
type Duration string

// L7TargetReference names a Service, and optionally one of its ports, in the policy's
// namespace.
type L7TargetReference struct {
	ServiceTargetReference `json:",inline"`
	// SectionName is the name of one port of the Service. Empty means every TCP port.
	// +kubebuilder:validation:MaxLength=15
	// +optional
	SectionName string `json:"sectionName,omitempty"`
}

// Retries re-sends requests that failed in a way that is safe to retry.
type Retries struct {
	// Attempts is the most retries of one request.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=10
	// +kubebuilder:default=2
	// +optional
	Attempts int32 `json:"attempts,omitempty"`
	// PerTryTimeout bounds each attempt; empty means only the request timeout applies.
	// +optional
	PerTryTimeout Duration `json:"perTryTimeout,omitempty"`
	// RetryOn lists the failures to retry (not "on": YAML 1.1 reads an unquoted on as true). Every one of them happens before the backend processed
	// the request: ConnectFailure (refused or timed out), Reset (connection reset before any
	// response byte), RefusedStream (HTTP/2 REFUSED_STREAM), Unavailable (gRPC UNAVAILABLE
	// from the proxy's own transport). Default: all four.
	// +kubebuilder:validation:MaxItems=4
	// +kubebuilder:validation:items:Enum=ConnectFailure;Reset;RefusedStream;Unavailable
	// +listType=set
	// +optional
	RetryOn []string `json:"retryOn,omitempty"`
	// BudgetPercent caps retries at this share of the requests in flight, so that retries
	// cannot multiply load on failing backends.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=100
	// +kubebuilder:default=20
	// +optional
	BudgetPercent int32 `json:"budgetPercent,omitempty"`
}

// OutlierDetection ejects backends that keep failing, for a while.
type OutlierDetection struct {
	// ConsecutiveFailures ejects a backend after this many failed requests in a row.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=1000
	// +kubebuilder:default=5
	// +optional
	ConsecutiveFailures int32 `json:"consecutiveFailures,omitempty"`
	// BaseEjectionTime is how long a first ejection lasts; each further ejection lasts longer.
	// +kubebuilder:default="30s"
	// +optional
	BaseEjectionTime Duration `json:"baseEjectionTime,omitempty"`
	// MaxEjectionPercent is the largest share of backends ejected at once.
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	// +kubebuilder:default=50
	// +optional
	MaxEjectionPercent int32 `json:"maxEjectionPercent,omitempty"`
}

// L7PolicySpec turns on per-request load balancing for the Service ports it targets.
type L7PolicySpec struct {
	// TargetRefs names Services (and optionally ports) in the policy's namespace.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=16
	// +listType=atomic
	TargetRefs []L7TargetReference `json:"targetRefs"`
	// Protocol is what the clients speak: GRPC, HTTP2 (cleartext, prior knowledge) or HTTP1.
	// +kubebuilder:validation:Enum=GRPC;HTTP2;HTTP1
	Protocol string `json:"protocol"`
	// Algorithm picks a backend per request: RoundRobin, LeastRequest (power of two choices)
	// or Random.
	// +kubebuilder:validation:Enum=RoundRobin;LeastRequest;Random
	// +kubebuilder:default=RoundRobin
	// +optional
	Algorithm string `json:"algorithm,omitempty"`
	// RequestTimeout bounds each request, retries included; empty means no timeout beyond the
	// client's own deadline.
	// +optional
	RequestTimeout Duration `json:"requestTimeout,omitempty"`
	// Retries re-sends requests that failed before a backend processed them.
	// +optional
	Retries *Retries `json:"retries,omitempty"`
	// OutlierDetection ejects backends that keep failing.
	// +optional
	OutlierDetection *OutlierDetection `json:"outlierDetection,omitempty"`
	// DrainTimeout is how long requests in flight on a backend that left the Service may
	// still run before their streams are reset.
	// +kubebuilder:default="30s"
	// +optional
	DrainTimeout Duration `json:"drainTimeout,omitempty"`
	// IdleTimeout is how long a client's connection with no request in flight stays open:
	// the proxy then closes it, an HTTP/2 one with GOAWAY NO_ERROR first, after which
	// clients open a new connection for their next request. An HTTP/1.1 listener keeps
	// the value it opened with.
	// +kubebuilder:default="5m"
	// +kubebuilder:validation:XValidation:rule="!self.matches('^([0-9]{1,5}(h|m|s|ms)){1,4}$') || duration(self) >= duration('1s')",message="idleTimeout must be at least 1s"
	// +optional
	IdleTimeout Duration `json:"idleTimeout,omitempty"`
}

// L7Policy balances requests, not connections, for the Service ports it targets: the node's
// proxy keeps connections to every backend and spreads each request over them.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName=l7pol,categories=portico
// +kubebuilder:printcolumn:name="Protocol",type=string,JSONPath=".spec.protocol"
// +kubebuilder:printcolumn:name="Algorithm",type=string,JSONPath=".spec.algorithm"
// +kubebuilder:printcolumn:name="Services",type=integer,JSONPath=".status.attachedServices"
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=".status.conditions[?(@.type==\"Accepted\")].status"
// +kubebuilder:printcolumn:name="Programmed",type=string,JSONPath=".status.conditions[?(@.type==\"Programmed\")].status"
// +kubebuilder:printcolumn:name="Nodes",type=integer,JSONPath=".status.programmedNodes"
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=".metadata.creationTimestamp"
type L7Policy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   L7PolicySpec `json:"spec"`
	Status PolicyStatus `json:"status,omitempty"`
}

// L7PolicyList is a list of L7Policies.
//
// +kubebuilder:object:root=true
type L7PolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []L7Policy `json:"items"`
}

func init() {
	SchemeBuilder.Register(&L7Policy{}, &L7PolicyList{})
}
