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
	// ConditionProgrammed says whether every node with a ready agent programmed a policy's
	// current generation.
	ConditionProgrammed = "Programmed"
)

// LabelSelector is a Kubernetes label selector (same fields and meaning as metav1's) whose
// keys, values and operators are checked when the object is admitted, so that a typo is
// rejected instead of silently matching nothing. Its sizes are bounded so that the API server
// can budget the checks.
type LabelSelector struct {
	// MatchLabels selects objects with every one of these labels. (The API server cannot
	// budget a check of map keys; a malformed key makes the owning object Invalid instead.)
	// +kubebuilder:validation:MaxProperties=32
	// +optional
	MatchLabels map[string]LabelValue `json:"matchLabels,omitempty"`
	// MatchExpressions selects objects matching every one of these requirements.
	// +kubebuilder:validation:MaxItems=16
	// +listType=atomic
	// +optional
	MatchExpressions []LabelSelectorRequirement `json:"matchExpressions,omitempty"`
}

// LabelValue is the value of a label.
//
// +kubebuilder:validation:MaxLength=63
// +kubebuilder:validation:XValidation:rule="!format.labelValue().validate(self).hasValue()",message="label values are up to 63 characters of A-Z, a-z, 0-9, '-', '_', '.', starting and ending with a letter or digit"
type LabelValue string

// LabelSelectorRequirement is one requirement of a LabelSelector.
//
// +kubebuilder:validation:XValidation:rule="self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)",message="In and NotIn need values; Exists and DoesNotExist take none"
type LabelSelectorRequirement struct {
	// Key is the label key.
	// +kubebuilder:validation:MaxLength=317
	// +kubebuilder:validation:XValidation:rule="!format.qualifiedName().validate(self).hasValue()",message="key must be a label key ([prefix/]name)"
	Key string `json:"key"`
	// Operator is In, NotIn, Exists or DoesNotExist.
	// +kubebuilder:validation:Enum=In;NotIn;Exists;DoesNotExist
	Operator metav1.LabelSelectorOperator `json:"operator"`
	// Values for In and NotIn.
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=63
	// +kubebuilder:validation:XValidation:rule="self.all(v, !format.labelValue().validate(v).hasValue())",message="values must be label values (up to 63 characters of A-Z, a-z, 0-9, '-', '_', '.')"
	// +listType=atomic
	// +optional
	Values []string `json:"values,omitempty"`
}

// AsMeta returns the selector as the apimachinery type, for labels.Selector conversion.
func (s *LabelSelector) AsMeta() *metav1.LabelSelector {
	out := &metav1.LabelSelector{}
	if len(s.MatchLabels) > 0 {
		out.MatchLabels = make(map[string]string, len(s.MatchLabels))
		for k, v := range s.MatchLabels {
			out.MatchLabels[k] = string(v)
		}
	}
	for _, e := range s.MatchExpressions {
		out.MatchExpressions = append(out.MatchExpressions, metav1.LabelSelectorRequirement{Key: e.Key, Operator: e.Operator, Values: e.Values})
	}
	return out
}

// ServiceTargetReference names a Service in the policy's namespace, Gateway API style
// (LocalPolicyTargetReference).
type ServiceTargetReference struct {
	// Group is the API group of the target: "" (core) is the only one supported.
	// +kubebuilder:validation:Enum=""
	// +optional
	Group string `json:"group,omitempty"`
	// Kind is the kind of the target: Service is the only one supported.
	// +kubebuilder:validation:Enum=Service
	// +kubebuilder:default=Service
	// +optional
	Kind string `json:"kind,omitempty"`
	// Name is the name of the Service.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:XValidation:rule="!format.dns1035Label().validate(self).hasValue()",message="name must be a Service name (a DNS-1035 label)"
	Name string `json:"name"`
}

// PolicyStatus is what every Portico policy reports.
type PolicyStatus struct {
	// Conditions: Accepted (valid and in force), Conflict (another policy wins some targets),
	// Programmed (every node with a ready agent programmed this generation).
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	// AttachedServices is how many Services the policy applies to now.
	// +optional
	AttachedServices int32 `json:"attachedServices"`
	// ProgrammedNodes is how many nodes programmed the policy's current generation.
	// +optional
	ProgrammedNodes int32 `json:"programmedNodes,omitempty"`
}
