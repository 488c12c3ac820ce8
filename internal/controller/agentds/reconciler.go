// Package agentds keeps the node agents' DaemonSet as the operator's configuration says:
// created at start, repaired when edited or deleted, rolled when the operator's version
// changes. It applies with server-side apply, so that an unchanged DaemonSet is not
// written (no update loop) and fields others add are left alone.
package agentds

import (
	"context"
	"crypto/rand"
	"fmt"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/source"
)

// fieldOwner is the operator's name in the DaemonSet's managedFields.
const fieldOwner = "portico-operator"

// VersionAnnotation on the pod template carries the operator's version: a new operator
// rolls the agents.
const VersionAnnotation = "lb.portico.dev/operator-version"

// MemoryLimit is the agents' Go soft memory limit (GOMEMLIMIT), under their container's
// 384Mi limit: the garbage collector works harder before the kernel would kill them. At
// 10,000 ClusterIP Services x 10 endpoints the live heap is ~105 MiB and the RSS ~175 MiB
// with it; at 10,000 dual-stack LoadBalancer Services the heap is ~200 MiB, over this soft
// limit, and the RSS ~260 MiB, over the 256Mi the container had before (docs/benchmarks.md).
const MemoryLimit = "150MiB"

// Config is how the agents run.
type Config struct {
	Namespace, Name string
	Image           string
	// Version is the operator's version.
	Version        string
	ServiceAccount string
	// Devices are the interfaces external traffic arrives on (the agent's --devices).
	Devices []string
	// ServiceMapSize, BackendMapSize and ConntrackSize are the agents' datapath map sizes
	// (their flags of the same names); 0: the agent's defaults (docs/datapath.md).
	ServiceMapSize, BackendMapSize, ConntrackSize uint32
	NodeSelector                                  map[string]string
}

// Reconciler applies the DaemonSet.
type Reconciler struct {
	Client   client.Client
	Recorder record.EventRecorder
	Config   Config
}

// +kubebuilder:rbac:groups=apps,resources=daemonsets,verbs=get;list;watch;create;patch
// +kubebuilder:rbac:groups="",resources=secrets,verbs=create,namespace=system

// SetupWithManager applies once at start and again whenever the DaemonSet changes.
func (r *Reconciler) SetupWithManager(mgr ctrl.Manager) error {
	start := make(chan event.GenericEvent, 1)
	start <- event.GenericEvent{Object: &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: r.Config.Namespace, Name: r.Config.Name}}}
	ours := predicate.NewPredicateFuncs(func(o client.Object) bool {
		return o.GetNamespace() == r.Config.Namespace && o.GetName() == r.Config.Name
	})
	return ctrl.NewControllerManagedBy(mgr).Named("agent-daemonset").
		For(&appsv1.DaemonSet{}, builder.WithPredicates(ours)).
		WatchesRawSource(source.Channel(start, &handler.EnqueueRequestForObject{})).
		Complete(r)
}

// Reconcile applies the DaemonSet as configured, and says so in an Event when that created
// it, rolled the agents to another version, or put back what someone else changed.
func (r *Reconciler) Reconcile(ctx context.Context, _ ctrl.Request) (ctrl.Result, error) {
	if err := r.ensureKey(ctx); err != nil {
		return ctrl.Result{}, err
	}
	var before appsv1.DaemonSet
	err := r.Client.Get(ctx, types.NamespacedName{Namespace: r.Config.Namespace, Name: r.Config.Name}, &before)
	if err != nil && !apierrors.IsNotFound(err) {
		return ctrl.Result{}, fmt.Errorf("get DaemonSet %s/%s: %w", r.Config.Namespace, r.Config.Name, err)
	}
	existed := err == nil
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(r.DaemonSet())
	if err != nil {
		return ctrl.Result{}, fmt.Errorf("convert the DaemonSet: %w", err)
	}
	// Only what the operator decides: no status, no empty timestamps.
	delete(obj, "status")
	unstructured.RemoveNestedField(obj, "metadata", "creationTimestamp")
	unstructured.RemoveNestedField(obj, "spec", "template", "metadata", "creationTimestamp")
	u := &unstructured.Unstructured{Object: obj}
	if err := r.Client.Patch(ctx, u, client.Apply, client.ForceOwnership, client.FieldOwner(fieldOwner)); err != nil {
		return ctrl.Result{}, fmt.Errorf("apply DaemonSet %s/%s: %w", r.Config.Namespace, r.Config.Name, err)
	}
	var after appsv1.DaemonSet
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &after); err != nil {
		return ctrl.Result{}, fmt.Errorf("read the applied DaemonSet: %w", err)
	}
	// The cache may still hold a DaemonSet that was deleted: a new UID is a new DaemonSet.
	switch was := before.Spec.Template.Annotations[VersionAnnotation]; {
	case !existed || before.UID != after.UID:
		r.Recorder.Eventf(u, corev1.EventTypeNormal, "Created", "Running the node agents %s (%s) on every Linux node", r.Config.Version, r.Config.Image)
	case was != r.Config.Version:
		r.Recorder.Eventf(u, corev1.EventTypeNormal, "Rolling", "Rolling the node agents from %s to %s (%s), one node at a time", was, r.Config.Version, r.Config.Image)
	case !equality.Semantic.DeepEqual(before.Spec, after.Spec):
		r.Recorder.Event(u, corev1.EventTypeWarning, "Repaired", "Put back what the operator manages in the agents' DaemonSet: it had been changed")
	}
	return ctrl.Result{}, nil
}

// KeySecret names the Secret whose "key" signs the agents' heartbeats, and whose "next",
// while the cluster changes keys, may sign them too (docs/l2.md).
func (c Config) KeySecret() string { return c.Name + "-heartbeat" }

// keyPath is where the agents read it.
const keyPath = "/etc/portico/heartbeat"

// ensureKey creates the heartbeat key's Secret, 32 random bytes, unless it exists: the
// operator never reads or changes it (a user may create their own first, or replace it and
// restart the agents), and needs no right to read Secrets.
func (r *Reconciler) ensureKey(ctx context.Context) error {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return fmt.Errorf("heartbeat key: %w", err)
	}
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: r.Config.Namespace, Name: r.Config.KeySecret(),
		Labels: map[string]string{"app.kubernetes.io/name": "portico", "app.kubernetes.io/component": "agent"}},
		Data: map[string][]byte{"key": k}}
	if err := r.Client.Create(ctx, sec); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create Secret %s/%s: %w", sec.Namespace, sec.Name, err)
	}
	return nil
}

// DaemonSet is the agents' DaemonSet: host network, the capabilities the datapath needs
// (load BPF, attach to cgroups and interfaces) and no more, bpffs and cgroup v2 from the host,
// on every Linux node whatever its taints, like kube-proxy.
func (r *Reconciler) DaemonSet() *appsv1.DaemonSet {
	c := r.Config
	labels := map[string]string{"app.kubernetes.io/name": "portico", "app.kubernetes.io/component": "agent"}
	nodeSelector := map[string]string{"kubernetes.io/os": "linux"}
	for k, v := range c.NodeSelector {
		nodeSelector[k] = v
	}
	args := []string{"--cgroup-root=/sys/fs/cgroup", "--bpffs=/sys/fs/bpf", "--metrics-bind-address=:9090", "--health-probe-bind-address=:9091",
		"--l2-heartbeat-key-file=" + keyPath + "/key", "--l2-heartbeat-next-key-file=" + keyPath + "/next"}
	args = append(args, "--daemonset="+c.Name)
	if len(c.Devices) > 0 {
		args = append(args, "--devices="+strings.Join(c.Devices, ","))
	}
	for _, f := range []struct {
		name string
		size uint32
	}{{"service-map-size", c.ServiceMapSize}, {"backend-map-size", c.BackendMapSize}, {"conntrack-size", c.ConntrackSize}} {
		if f.size > 0 {
			args = append(args, fmt.Sprintf("--%s=%d", f.name, f.size))
		}
	}
	hostPath := func(name, path string) corev1.Volume {
		return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: path, Type: ptr.To(corev1.HostPathDirectory)}}}
	}
	probe := func(path string) *corev1.Probe {
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: intstr.FromInt32(9091)}}}
	}
	return &appsv1.DaemonSet{
		TypeMeta:   metav1.TypeMeta{APIVersion: "apps/v1", Kind: "DaemonSet"},
		ObjectMeta: metav1.ObjectMeta{Name: c.Name, Namespace: c.Namespace, Labels: labels},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			UpdateStrategy: appsv1.DaemonSetUpdateStrategy{Type: appsv1.RollingUpdateDaemonSetStrategyType,
				RollingUpdate: &appsv1.RollingUpdateDaemonSet{MaxUnavailable: ptr.To(intstr.FromInt32(1))}},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels, Annotations: map[string]string{VersionAnnotation: c.Version}},
				Spec: corev1.PodSpec{
					ServiceAccountName: c.ServiceAccount,
					HostNetwork:        true,
					DNSPolicy:          corev1.DNSClusterFirstWithHostNet,
					PriorityClassName:  "system-node-critical",
					NodeSelector:       nodeSelector,
					Tolerations:        []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
					Containers: []corev1.Container{{
						Name:  "agent",
						Image: c.Image,
						Args:  args,
						Env: []corev1.EnvVar{
							{Name: "NODE_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"}}},
							{Name: "POD_NAMESPACE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
							{Name: "GOMEMLIMIT", Value: MemoryLimit},
						},
						Ports:          []corev1.ContainerPort{{Name: "metrics", ContainerPort: 9090}, {Name: "probes", ContainerPort: 9091}},
						LivenessProbe:  probe("/healthz"),
						ReadinessProbe: probe("/readyz"),
						SecurityContext: &corev1.SecurityContext{
							RunAsUser:                ptr.To(int64(0)),
							AllowPrivilegeEscalation: ptr.To(false),
							ReadOnlyRootFilesystem:   ptr.To(true),
							Capabilities: &corev1.Capabilities{
								Drop: []corev1.Capability{"ALL"},
								Add:  []corev1.Capability{"BPF", "NET_ADMIN", "NET_RAW", "PERFMON"},
							},
						},
						VolumeMounts: []corev1.VolumeMount{
							{Name: "bpffs", MountPath: "/sys/fs/bpf"},
							{Name: "cgroup", MountPath: "/sys/fs/cgroup", ReadOnly: true},
							{Name: "heartbeat-key", MountPath: keyPath, ReadOnly: true},
						},
						Resources: corev1.ResourceRequirements{
							Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("50m"), corev1.ResourceMemory: resource.MustParse("64Mi")},
							Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("384Mi")},
						},
					}},
					Volumes: []corev1.Volume{hostPath("bpffs", "/sys/fs/bpf"), hostPath("cgroup", "/sys/fs/cgroup"),
						{Name: "heartbeat-key", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: c.KeySecret(),
							DefaultMode: ptr.To(int32(0o400))}}}},
				},
			},
		},
	}
}
