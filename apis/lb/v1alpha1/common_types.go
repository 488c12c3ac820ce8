package v1alpha1

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

// Condition types shared by every Portico resource.
const (
	// ConditionReady says whether the resource is in force: a pool hands out addresses, a
	// policy applies to its Services.
	ConditionReady = "Ready"
	// ConditionAccepted says whether a policy was accepted for the Services it targets.
	ConditionAccepted = "Accepted"
	// ConditionConflict says whether the resource overlaps or competes with another one.
	ConditionConflict = "Conflict"
)

// LabelSelector is a Kubernetes label selector whose keys, values and operators are checked
// when the object is admitted, so that a typo is rejected instead of silently matching nothing.
//
// +kubebuilder:validation:XValidation:rule="!has(self.matchLabels) || self.matchLabels.all(k, !format.qualifiedName().validate(k).hasValue() && !format.labelValue().validate(self.matchLabels[k]).hasValue())",message="matchLabels must map label keys ([prefix/]name) to label values (up to 63 characters of A-Z, a-z, 0-9, '-', '_', '.')"
// +kubebuilder:validation:XValidation:rule="!has(self.matchExpressions) || self.matchExpressions.all(e, !format.qualifiedName().validate(e.key).hasValue())",message="matchExpressions keys must be label keys ([prefix/]name)"
// +kubebuilder:validation:XValidation:rule="!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn'] ? (has(e.values) && size(e.values) > 0) : (e.operator in ['Exists', 'DoesNotExist'] && (!has(e.values) || size(e.values) == 0)))",message="matchExpressions operators are In and NotIn, which need values, or Exists and DoesNotExist, which take none"
// +kubebuilder:validation:XValidation:rule="!has(self.matchExpressions) || self.matchExpressions.all(e, !has(e.values) || e.values.all(v, !format.labelValue().validate(v).hasValue()))",message="matchExpressions values must be label values (up to 63 characters of A-Z, a-z, 0-9, '-', '_', '.')"
type LabelSelector metav1.LabelSelector

// AsMeta returns the selector as the apimachinery type, for labels.Selector conversion.
func (s *LabelSelector) AsMeta() *metav1.LabelSelector { return (*metav1.LabelSelector)(s) }

// ServiceTargetReference names a Service in the policy's namespace, Gateway API style
// (LocalPolicyTargetReference).
type ServiceTargetReference struct {
	// Group is the API group of the target: "" (core) is the only one supported.
	// +kubebuilder:validation:Enum=""
	// +optional
	Group string `json:"group"`
	// Kind is the kind of the target: Service is the only one supported.
	// +kubebuilder:validation:Enum=Service
	// +kubebuilder:default=Service
	// +optional
	Kind string `json:"kind"`
	// Name is the name of the Service.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:XValidation:rule="!format.dns1035Label().validate(self).hasValue()",message="name must be a Service name (a DNS-1035 label)"
	Name string `json:"name"`
}

// PolicyStatus is what every Portico policy reports.
type PolicyStatus struct {
	// Conditions: Accepted (valid and in force), Conflict (another policy wins some targets).
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// AttachedServices is how many Services the policy applies to now.
	// +optional
	AttachedServices int32 `json:"attachedServices"`
}
