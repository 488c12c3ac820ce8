package agent

import (
	"context"
	"fmt"

	appsv1 "k8s.io/api/apps/v1"
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
