package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// NodeAgentStatus is what a node's agent has programmed into the node's datapath.
type NodeAgentStatus struct {
	// Conditions: Ready (the agent programmed the datapath from the API server's state and
	// keeps it in sync) and MapsFull (True while some Services do not fit in the datapath's
	// maps; they are programmed as others free room).
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// Version is the agent's version.
	// +optional
	Version string `json:"version,omitempty"`
	// Services is how many Services the node serves.
	// +optional
	Services int32 `json:"services"`
	// Frontends is how many frontends (address, port, protocol and scope) the datapath holds.
	// +optional
	Frontends int32 `json:"frontends"`
	// Policies are the ServicePolicies and L7Policies in force on the node (each winning at
	// least one Service or port), with the generation programmed.
	// +listType=atomic
	// +optional
	Policies []ProgrammedPolicy `json:"policies,omitempty"`
	// Announcements are the LoadBalancer addresses this node answers ARP and NDP for.
	// +listType=atomic
	// +optional
	Announcements []AnnouncedAddress `json:"announcements,omitempty"`
	// LivePeers are the other nodes whose agents this one hears (their heartbeats arrive,
	// signed with the cluster's key, and say they are ready): the nodes it counts as live
	// when it decides which node announces an address (docs/l2.md).
	// +listType=atomic
	// +optional
	LivePeers []string `json:"livePeers,omitempty"`
}

// ConditionMapsFull is the NodeAgent condition that says some Services do not fit in the
// node's datapath maps.
const ConditionMapsFull = "MapsFull"

// AgentLeasePrefix starts the name of the Lease each node's agent renews in the agents'
// namespace ("portico-agent-<node>"). The operator marks the NodeAgent of an agent whose Lease
// expired: Ready=Unknown, no announcements.
const AgentLeasePrefix = "portico-agent-"

// AnnouncedAddress is one LoadBalancer address a node announces on its segment.
type AnnouncedAddress struct {
	// Address is the LoadBalancer address.
	Address string `json:"address"`
	// Service holds the address, as namespace/name.
	Service string `json:"service"`
	// Interfaces are the node's interfaces that answer for it.
	Interfaces []string `json:"interfaces"`
}

// ProgrammedPolicy names a policy and the generation of it a node programmed.
type ProgrammedPolicy struct {
	// Kind is ServicePolicy or L7Policy.
	// +kubebuilder:validation:Enum=ServicePolicy;L7Policy
	Kind       string `json:"kind"`
	Namespace  string `json:"namespace"`
	Name       string `json:"name"`
	Generation int64  `json:"generation"`
}

// NodeAgent reports one node's agent: its readiness and what it programmed. The agent of the
// node of the same name creates and writes it; it goes with its Node.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=pna,categories=portico
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=".status.conditions[?(@.type==\"Ready\")].status"
// +kubebuilder:printcolumn:name="Services",type=integer,JSONPath=".status.services"
// +kubebuilder:printcolumn:name="Frontends",type=integer,JSONPath=".status.frontends"
// +kubebuilder:printcolumn:name="Announcing",type=string,JSONPath=".status.announcements[*].address"
// +kubebuilder:printcolumn:name="Hears",type=string,JSONPath=".status.livePeers",priority=1
// +kubebuilder:printcolumn:name="Version",type=string,JSONPath=".status.version"
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=".metadata.creationTimestamp"
type NodeAgent struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Status NodeAgentStatus `json:"status,omitempty"`
}

// NodeAgentList is a list of NodeAgents.
//
// +kubebuilder:object:root=true
type NodeAgentList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NodeAgent `json:"items"`
}

func init() {
	SchemeBuilder.Register(&NodeAgent{}, &NodeAgentList{})
}
