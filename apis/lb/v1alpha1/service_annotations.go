package v1alpha1

// What Portico reads from, and writes to, a Service. It never writes a Service's spec or
// metadata: results go to status, conditions and Events.
const (
	// LoadBalancerClass is the spec.loadBalancerClass Portico serves.
	LoadBalancerClass = "lb.portico.dev/portico"

	// AnnotationIPs asks for exact addresses: one, or one per family, comma-separated
	// ("192.0.2.10" or "192.0.2.10,2001:db8::10"). It takes precedence over the deprecated
	// spec.loadBalancerIP.
	AnnotationIPs = "lb.portico.dev/ips"
	// AnnotationPool asks for addresses from the named LBPool only.
	AnnotationPool = "lb.portico.dev/pool"
	// AnnotationSharingKey lets Services with the same key share an address when their ports
	// do not collide. A key is scoped to the Service's namespace; a key that starts with
	// "cluster/" is shared by every namespace that uses it.
	AnnotationSharingKey = "lb.portico.dev/sharing-key"

	// ServiceConditionIPAllocated is the Service status condition Portico maintains.
	ServiceConditionIPAllocated = "lb.portico.dev/IPAllocated"
	// ReasonAllocated: the Service has every address it wants.
	ReasonAllocated = "Allocated"
	// ReasonInvalidAnnotation: a lb.portico.dev annotation could not be read; the Service
	// keeps the addresses it had.
	ReasonInvalidAnnotation = "InvalidAnnotation"
)
