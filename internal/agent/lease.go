package agent

import (
	"context"
	"fmt"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
)

// +kubebuilder:rbac:groups=coordination.k8s.io,resources=leases,verbs=create;patch;delete,namespace=system

// leaseKeeper renews the agent's Lease (lbv1.AgentLeasePrefix + node) in the agents'
// namespace: four times per duration, as the kubelet renews its node Lease. The operator
// reads it to tell a live agent from one that died with its NodeAgent still saying Ready;
// the agent deletes it when it stops cleanly, so that the operator knows at once.
type leaseKeeper struct {
	client    client.Client
	namespace string
	node      string
	duration  time.Duration
	report    *reporter
}

func (l *leaseKeeper) name() string { return lbv1.AgentLeasePrefix + l.node }

// Start renews the Lease until ctx ends, then deletes it (a manager Runnable). After a
// renewal gap longer than the duration the operator may have marked the NodeAgent, so the
// report is written again.
func (l *leaseKeeper) Start(ctx context.Context) error {
	log := ctrl.LoggerFrom(ctx).WithValues("lease", l.namespace+"/"+l.name())
	var renewed time.Time
	for {
		now := time.Now()
		if err := l.renew(ctx, now); err != nil {
			log.Error(err, "Failed to renew the agent's Lease")
		} else {
			if !renewed.IsZero() && now.Sub(renewed) > l.duration {
				l.report.rewrite()
			}
			renewed = now
		}
		select {
		case <-ctx.Done():
			del, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			err := l.client.Delete(del, &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: l.namespace, Name: l.name()}})
			if err != nil && !apierrors.IsNotFound(err) {
				log.Error(err, "Failed to delete the agent's Lease")
			}
			return nil
		case <-time.After(l.duration / 4):
		}
	}
}

// renew applies the Lease, owned by the Node so that it goes with it.
func (l *leaseKeeper) renew(ctx context.Context, now time.Time) error {
	lease := &coordinationv1.Lease{
		TypeMeta:   metav1.TypeMeta{APIVersion: coordinationv1.SchemeGroupVersion.String(), Kind: "Lease"},
		ObjectMeta: metav1.ObjectMeta{Namespace: l.namespace, Name: l.name()},
		Spec: coordinationv1.LeaseSpec{
			HolderIdentity:       ptr.To(l.node),
			LeaseDurationSeconds: ptr.To(int32(l.duration.Round(time.Second) / time.Second)),
			RenewTime:            &metav1.MicroTime{Time: now},
		},
	}
	var node corev1.Node
	if err := l.client.Get(ctx, types.NamespacedName{Name: l.node}, &node); err == nil {
		lease.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}}
	}
	if err := l.client.Patch(ctx, lease, client.Apply, client.FieldOwner(fieldOwner), client.ForceOwnership); err != nil {
		return fmt.Errorf("apply Lease %s/%s: %w", l.namespace, l.name(), err)
	}
	return nil
}
