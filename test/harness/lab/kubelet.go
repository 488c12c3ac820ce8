package lab

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/ptr"
)

// Kubelet plays the kubelet for one lab node: it registers the Node and keeps its Lease
// fresh, and runs the Pods bound to the node: a namespace on the node's pod bridge with the
// next free address of each pod CIDR, and the built-in workload its image names. Pod status
// follows: Running and Ready (readiness gates honoured), or Pending with an Event for an
// image the lab does not have. A deleted pod runs its preStop sleep (within its grace
// period), stops, and is removed.
type Kubelet struct {
	node   *Node
	cs     kubernetes.Interface
	events record.EventRecorder
	queue  workqueue.TypedRateLimitingInterface[string]
	store  cache.Store

	// stopping counts pods waiting out their preStop sleep.
	stopping sync.WaitGroup
	mu       sync.Mutex
	running  map[string]*running // by namespace/name
	refused  map[types.UID]bool  // pods told about an unknown image
}

type running struct {
	uid         types.UID
	pod         *Pod
	echo        *echo
	started     metav1.Time
	terminating bool
}

// NewKubelet makes the node daemon of node; Run starts it.
func NewKubelet(node *Node, cs kubernetes.Interface) *Kubelet {
	return &Kubelet{node: node, cs: cs,
		queue:   workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]()),
		running: map[string]*running{}, refused: map[types.UID]bool{}}
}

// Run registers the node and serves its pods until ctx ends; then it stops every workload
// and removes the pod namespaces (the Pod objects stay, as when a node goes down).
func (k *Kubelet) Run(ctx context.Context) error {
	if err := k.register(ctx); err != nil {
		return err
	}
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: k.cs.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	k.events = broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "lab-kubelet", Host: k.node.Name})

	factory := informers.NewSharedInformerFactoryWithOptions(k.cs, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = "spec.nodeName=" + k.node.Name
	}))
	informer := factory.Core().V1().Pods().Informer()
	k.store = informer.GetStore()
	enqueue := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			k.queue.Add(key)
		}
	}
	if _, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue, UpdateFunc: func(_, obj any) { enqueue(obj) }, DeleteFunc: enqueue,
	}); err != nil {
		return fmt.Errorf("watch pods: %w", err)
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()

	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); k.heartbeat(ctx) }()
	go func() { defer wg.Done(); <-ctx.Done(); k.queue.ShutDown() }()
	if cache.WaitForCacheSync(ctx.Done(), informer.HasSynced) {
		for k.work(ctx) {
		}
	}
	wg.Wait()
	k.stopping.Wait()
	k.stopAll()
	return nil
}

func (k *Kubelet) work(ctx context.Context) bool {
	key, quit := k.queue.Get()
	if quit {
		return false
	}
	defer k.queue.Done(key)
	if err := k.sync(ctx, key); err != nil {
		if ctx.Err() == nil {
			k.queue.AddRateLimited(key)
		}
		return true
	}
	k.queue.Forget(key)
	return true
}

// sync brings pod key (namespace/name) to what its object says.
func (k *Kubelet) sync(ctx context.Context, key string) error {
	obj, exists, err := k.store.GetByKey(key)
	if err != nil {
		return err
	}
	k.mu.Lock()
	r := k.running[key]
	k.mu.Unlock()
	if !exists {
		return k.teardown(key, r)
	}
	pod := obj.(*corev1.Pod).DeepCopy()
	if r != nil && r.uid != pod.UID {
		// The name was reused by a new pod while the old one's namespace remained.
		if err := k.teardown(key, r); err != nil {
			return err
		}
		r = nil
	}
	switch {
	case pod.DeletionTimestamp != nil:
		return k.terminate(ctx, key, pod, r)
	case pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed:
		return nil
	case r == nil:
		return k.start(ctx, key, pod)
	}
	return k.report(ctx, pod, r)
}

// start runs a new pod: its namespace and workload, then Running in its status.
func (k *Kubelet) start(ctx context.Context, key string, pod *corev1.Pod) error {
	var ports []Port
	var images []string
	for _, c := range pod.Spec.Containers {
		image, _, _ := strings.Cut(c.Image, ":")
		if image != EchoImage && image != GreeterImage {
			return k.refuse(ctx, pod, c)
		}
		images = append(images, image)
		var own []Port
		for _, p := range c.Ports {
			own = append(own, Port{Number: p.ContainerPort, Protocol: string(p.Protocol), GRPC: image == GreeterImage})
		}
		switch {
		case len(own) > 0:
		case image == GreeterImage:
			own = []Port{{50051, "TCP", true}}
		default:
			own = []Port{{8080, "TCP", false}, {8080, "UDP", false}}
		}
		ports = append(ports, own...)
	}
	p, err := k.node.AddPod(pod.Name)
	if err != nil {
		k.events.Eventf(pod, corev1.EventTypeWarning, "FailedStart", "Could not set up the pod's network on %s (retried): %v", k.node.Name, err)
		return err
	}
	e, err := serveEcho(p, ports)
	if err != nil {
		k.events.Eventf(pod, corev1.EventTypeWarning, "FailedStart", "Could not start %s on %s (retried): %v", strings.Join(images, ", "), k.node.Name, err)
		return errors.Join(err, k.node.RemovePod(p))
	}
	r := &running{uid: pod.UID, pod: p, echo: e, started: metav1.Now()}
	k.mu.Lock()
	k.running[key] = r
	k.mu.Unlock()
	k.events.Eventf(pod, corev1.EventTypeNormal, "Started", "Started the lab's %s on %s with addresses %v", strings.Join(images, ", "), k.node.Name, p.IPs)
	return k.report(ctx, pod, r)
}

// refuse leaves a pod with an image the lab cannot run Pending, and says why once.
func (k *Kubelet) refuse(ctx context.Context, pod *corev1.Pod, c corev1.Container) error {
	msg := fmt.Sprintf("the lab runs only its built-in images (%s, %s), not %q", EchoImage, GreeterImage, c.Image)
	k.mu.Lock()
	told := k.refused[pod.UID]
	k.refused[pod.UID] = true
	k.mu.Unlock()
	if !told {
		k.events.Event(pod, corev1.EventTypeWarning, "Failed", msg)
	}
	var statuses []corev1.ContainerStatus
	for _, c := range pod.Spec.Containers {
		statuses = append(statuses, corev1.ContainerStatus{Name: c.Name, Image: c.Image,
			State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ErrImagePull", Message: msg}}})
	}
	if pod.Status.Phase == corev1.PodPending && len(pod.Status.ContainerStatuses) == len(statuses) {
		return nil
	}
	pod.Status.Phase = corev1.PodPending
	pod.Status.ContainerStatuses = statuses
	setCondition(pod, corev1.ContainersReady, false, "ContainersNotReady")
	setCondition(pod, corev1.PodReady, false, "ContainersNotReady")
	_, err := k.cs.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
	return err
}

// report writes the running pod's status when it differs: addresses, containers, and Ready,
// which needs every readiness gate's condition True.
func (k *Kubelet) report(ctx context.Context, pod *corev1.Pod, r *running) error {
	before := pod.Status.DeepCopy()
	st := &pod.Status
	st.Phase = corev1.PodRunning
	st.HostIP, st.PodIP, st.HostIPs, st.PodIPs = k.node.IPs[0].String(), r.pod.IPs[0].String(), nil, nil
	for _, a := range k.node.IPs {
		st.HostIPs = append(st.HostIPs, corev1.HostIP{IP: a.String()})
	}
	for _, a := range r.pod.IPs {
		st.PodIPs = append(st.PodIPs, corev1.PodIP{IP: a.String()})
	}
	if st.StartTime == nil {
		st.StartTime = &r.started
	}
	st.QOSClass = corev1.PodQOSBestEffort
	st.ContainerStatuses = nil
	for _, c := range pod.Spec.Containers {
		st.ContainerStatuses = append(st.ContainerStatuses, corev1.ContainerStatus{Name: c.Name, Image: c.Image,
			ImageID: "lab://" + c.Image, ContainerID: fmt.Sprintf("lab://%s/%s", pod.UID, c.Name),
			Ready: true, Started: ptr.To(true), State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: r.started}}})
	}
	ready := true
	for _, gate := range pod.Spec.ReadinessGates {
		if c := condition(pod, gate.ConditionType); c == nil || c.Status != corev1.ConditionTrue {
			ready = false
		}
	}
	for _, t := range []corev1.PodConditionType{corev1.PodReadyToStartContainers, corev1.PodInitialized, corev1.ContainersReady, corev1.PodScheduled} {
		setCondition(pod, t, true, "")
	}
	reason := ""
	if !ready {
		reason = "ReadinessGatesNotReady"
	}
	setCondition(pod, corev1.PodReady, ready, reason)
	if equalStatus(before, st) {
		return nil
	}
	_, err := k.cs.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
	return err
}

// terminate ends a deleted pod: its preStop sleep (bounded by the grace period), then the
// workload stops, the namespace goes, and the Pod object is removed.
func (k *Kubelet) terminate(ctx context.Context, key string, pod *corev1.Pod, r *running) error {
	if r == nil {
		return k.remove(ctx, pod)
	}
	k.mu.Lock()
	busy := r.terminating
	r.terminating = true
	k.mu.Unlock()
	if busy {
		return nil
	}
	wait := time.Duration(0)
	for _, c := range pod.Spec.Containers {
		if c.Lifecycle != nil && c.Lifecycle.PreStop != nil && c.Lifecycle.PreStop.Sleep != nil {
			wait = max(wait, time.Duration(c.Lifecycle.PreStop.Sleep.Seconds)*time.Second)
		}
	}
	if grace := pod.DeletionGracePeriodSeconds; grace != nil {
		wait = min(wait, time.Duration(*grace)*time.Second)
	}
	k.events.Eventf(pod, corev1.EventTypeNormal, "Killing", "Stopping the workload in %s", wait)
	k.stopping.Add(1)
	go func() {
		defer k.stopping.Done()
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return
		}
		if err := k.teardown(key, r); err != nil {
			k.events.Eventf(pod, corev1.EventTypeWarning, "FailedKillPod", "%v", err)
		}
		_ = k.remove(ctx, pod)
	}()
	return nil
}

// remove deletes the Pod object for good, as the kubelet does once the pod has stopped.
func (k *Kubelet) remove(ctx context.Context, pod *corev1.Pod) error {
	err := k.cs.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To[int64](0), Preconditions: &metav1.Preconditions{UID: &pod.UID}})
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil
	}
	return err
}

// teardown stops a pod's workload and removes its namespace.
func (k *Kubelet) teardown(key string, r *running) error {
	if r == nil {
		return nil
	}
	r.echo.close()
	k.mu.Lock()
	if k.running[key] == r {
		delete(k.running, key)
	}
	k.mu.Unlock()
	return k.node.RemovePod(r.pod)
}

func (k *Kubelet) stopAll() {
	k.mu.Lock()
	all := make(map[string]*running, len(k.running))
	for key, r := range k.running {
		all[key] = r
	}
	k.mu.Unlock()
	for key, r := range all {
		_ = k.teardown(key, r)
	}
}

// Pod returns the running pod namespace/name on this node, or nil.
func (k *Kubelet) Pod(namespace, name string) *Pod {
	k.mu.Lock()
	defer k.mu.Unlock()
	if r := k.running[namespace+"/"+name]; r != nil {
		return r.pod
	}
	return nil
}

// register creates (or takes over) the Node object: addresses, pod CIDRs, capacity, Ready.
func (k *Kubelet) register(ctx context.Context) error {
	nodes := k.cs.CoreV1().Nodes()
	obj := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: k.node.Name, Labels: map[string]string{
		corev1.LabelHostname: k.node.Name, corev1.LabelOSStable: "linux", corev1.LabelArchStable: "amd64"}}}
	if k.node.Zone != "" {
		obj.Labels[corev1.LabelTopologyZone] = k.node.Zone
	}
	for _, p := range k.node.Pods {
		obj.Spec.PodCIDRs = append(obj.Spec.PodCIDRs, p.String())
	}
	obj.Spec.PodCIDR = obj.Spec.PodCIDRs[0]
	created, err := nodes.Create(ctx, obj, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		created, err = nodes.Get(ctx, k.node.Name, metav1.GetOptions{})
	}
	if err != nil {
		return fmt.Errorf("register node %s: %w", k.node.Name, err)
	}
	return k.nodeStatus(ctx, created)
}

func (k *Kubelet) nodeStatus(ctx context.Context, node *corev1.Node) error {
	now := metav1.Now()
	capacity := corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("2"),
		corev1.ResourceMemory: resource.MustParse("4Gi"), corev1.ResourcePods: resource.MustParse("110")}
	node.Status.Capacity, node.Status.Allocatable = capacity, capacity
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeHostName, Address: k.node.Name}}
	for _, a := range k.node.IPs {
		node.Status.Addresses = append(node.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: a.String()})
	}
	node.Status.NodeInfo = corev1.NodeSystemInfo{OperatingSystem: "linux", Architecture: "amd64", KubeletVersion: "lab", ContainerRuntimeVersion: "lab://"}
	node.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
		Message: "the lab node daemon is running", LastHeartbeatTime: now, LastTransitionTime: now}}
	for _, t := range []corev1.NodeConditionType{corev1.NodeMemoryPressure, corev1.NodeDiskPressure, corev1.NodePIDPressure} {
		node.Status.Conditions = append(node.Status.Conditions, corev1.NodeCondition{Type: t, Status: corev1.ConditionFalse,
			Reason: "NoPressure", LastHeartbeatTime: now, LastTransitionTime: now})
	}
	if _, err := k.cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("report node %s: %w", k.node.Name, err)
	}
	return nil
}

// heartbeat renews the node's Lease every 10 s, as the kubelet does, so that the node
// lifecycle controller keeps the node Ready.
func (k *Kubelet) heartbeat(ctx context.Context) {
	leases := k.cs.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	for {
		now := metav1.NewMicroTime(time.Now())
		lease, err := leases.Get(ctx, k.node.Name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			lease = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: k.node.Name, Namespace: corev1.NamespaceNodeLease},
				Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(k.node.Name), LeaseDurationSeconds: ptr.To[int32](40), RenewTime: &now}}
			_, _ = leases.Create(ctx, lease, metav1.CreateOptions{})
		case err == nil:
			lease.Spec.RenewTime = &now
			_, _ = leases.Update(ctx, lease, metav1.UpdateOptions{})
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Second):
		}
	}
}

func condition(pod *corev1.Pod, t corev1.PodConditionType) *corev1.PodCondition {
	for i := range pod.Status.Conditions {
		if pod.Status.Conditions[i].Type == t {
			return &pod.Status.Conditions[i]
		}
	}
	return nil
}

// setCondition sets one of the pod's conditions, keeping its transition time when the
// status stays.
func setCondition(pod *corev1.Pod, t corev1.PodConditionType, ok bool, reason string) {
	status := corev1.ConditionFalse
	if ok {
		status = corev1.ConditionTrue
	}
	c := condition(pod, t)
	if c == nil {
		pod.Status.Conditions = append(pod.Status.Conditions, corev1.PodCondition{Type: t})
		c = &pod.Status.Conditions[len(pod.Status.Conditions)-1]
	}
	if c.Status != status {
		c.LastTransitionTime = metav1.Now()
	}
	c.Status, c.Reason = status, reason
}

func equalStatus(a, b *corev1.PodStatus) bool {
	return a.Phase == b.Phase && a.PodIP == b.PodIP && len(a.ContainerStatuses) == len(b.ContainerStatuses) &&
		fmt.Sprint(conditionStates(a)) == fmt.Sprint(conditionStates(b))
}

func conditionStates(s *corev1.PodStatus) map[corev1.PodConditionType]corev1.ConditionStatus {
	m := map[corev1.PodConditionType]corev1.ConditionStatus{}
	for _, c := range s.Conditions {
		m[c.Type] = c.Status
	}
	return m
}
