// Package requeue lets a Service reconciler put other Services back in its own queue: the
// operator's Services waiting for an address when one is freed, the agent's Services whose
// frontends another Service's change moved.
package requeue

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/source"
)

// Services feeds a controller Service names to reconcile again.
type Services struct {
	ch chan event.GenericEvent
}

// New returns a Services; give its Source to the controller (WatchesRawSource).
func New() *Services { return &Services{ch: make(chan event.GenericEvent, 1024)} }

// Source is what the controller watches.
func (s *Services) Source() source.Source {
	return source.Channel(s.ch, &handler.EnqueueRequestForObject{})
}

// Add queues the Services. It waits while the buffer is full, until the controller drains it
// or ctx ends: call it holding no lock the reconciler takes.
func (s *Services) Add(ctx context.Context, names ...types.NamespacedName) {
	for _, n := range names {
		select {
		case s.ch <- event.GenericEvent{Object: &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: n.Namespace, Name: n.Name}}}:
		case <-ctx.Done():
			return
		}
	}
}
