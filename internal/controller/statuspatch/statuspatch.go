// Package statuspatch writes an object's status the way every Portico reconciler does: a
// merge patch against what was read, guarded by resourceVersion, so that a concurrent writer
// is never overwritten.
package statuspatch

import (
	"context"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// Patch writes obj's status as changed from orig. An object deleted meanwhile needs nothing
// more; one written meanwhile is reconciled again from a fresh read, without an error log.
func Patch(ctx context.Context, c client.Client, obj, orig client.Object) (ctrl.Result, error) {
	err := c.Status().Patch(ctx, obj, client.MergeFromWithOptions(orig, client.MergeFromWithOptimisticLock{}))
	switch {
	case err == nil, apierrors.IsNotFound(err):
		return ctrl.Result{}, nil
	case apierrors.IsConflict(err):
		return ctrl.Result{Requeue: true}, nil
	}
	return ctrl.Result{}, fmt.Errorf("write status of %T %s: %w", obj, client.ObjectKeyFromObject(obj), err)
}
