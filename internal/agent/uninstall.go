package agent

import (
	"context"
	"fmt"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// +kubebuilder:rbac:groups=apps,resources=daemonsets,verbs=get,namespace=system

// Removed says whether the agent stops because Portico is being removed from the cluster:
// its DaemonSet is gone or being deleted. Then the node should be left as it was before
// (datapath.Uninstall: programs detached, pins deleted); otherwise (a rolling update, a
// restart, a node drain) the pins stay and the node forwards with the last state until the
// next agent adopts it.
func Removed(ctx context.Context, c client.Reader, daemonSet types.NamespacedName) (bool, error) {
	var ds appsv1.DaemonSet
	err := c.Get(ctx, daemonSet, &ds)
	switch {
	case apierrors.IsNotFound(err):
		return true, nil
	case err != nil:
		return false, fmt.Errorf("read the agents' DaemonSet %s: %w", daemonSet, err)
	}
	return ds.DeletionTimestamp != nil, nil
}

// Leaving says whether a stopping agent's node goes away for longer than a restart: Portico
// is being removed (Removed, when daemonSet has a name), or the node is cordoned (drained
// for maintenance) or not Ready (shutting down). Then its peers should take its addresses
// over at once rather than keep them for its return. When it cannot tell, it says yes.
func Leaving(ctx context.Context, c client.Reader, node string, daemonSet types.NamespacedName) bool {
	if daemonSet.Name != "" {
		if removed, err := Removed(ctx, c, daemonSet); removed || err != nil {
			return true
		}
	}
	var n corev1.Node
	if err := c.Get(ctx, types.NamespacedName{Name: node}, &n); err != nil {
		return true
	}
	if n.Spec.Unschedulable {
		return true
	}
	for _, cond := range n.Status.Conditions {
		if cond.Type == corev1.NodeReady {
			return cond.Status != corev1.ConditionTrue
		}
	}
	return true
}
