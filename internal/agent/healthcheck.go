package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/portico-dev/portico/internal/loadbalancer"
)

// healthChecks serve the healthCheckNodePorts of externalTrafficPolicy Local Services, as
// kube-proxy does: 200 while this node has a ready local endpoint, 503 otherwise, so that
// an external load balancer sends traffic only to nodes that keep it.
type healthChecks struct {
	addr string // the IP to listen on; "" for all
	mu   sync.Mutex
	byID map[types.NamespacedName]*healthCheck
	done bool
}

type healthCheck struct {
	port   int32
	server *http.Server
	local  atomic.Pointer[loadbalancer.Local]
}

func newHealthChecks(addr string) *healthChecks {
	return &healthChecks{addr: addr, byID: map[types.NamespacedName]*healthCheck{}}
}

// set makes svc's health check listen on port and report local endpoints (port 0: none).
func (h *healthChecks) set(svc types.NamespacedName, port int32, local loadbalancer.Local) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if hc := h.byID[svc]; hc != nil {
		if hc.port == port {
			hc.local.Store(&local)
			return nil
		}
		_ = hc.server.Close()
		delete(h.byID, svc)
	}
	if port == 0 || h.done {
		return nil
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(h.addr, strconv.Itoa(int(port))))
	if err != nil {
		return fmt.Errorf("health check port %d: %w", port, err)
	}
	hc := &healthCheck{port: port}
	hc.local.Store(&local)
	hc.server = &http.Server{Handler: hc.handler(svc), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = hc.server.Serve(ln) }() // ends when the server is closed
	h.byID[svc] = hc
	return nil
}

// handler answers with the local endpoints of the probe's IP family.
func (hc *healthCheck) handler(svc types.NamespacedName) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		counts := hc.local.Load()
		local := counts.IPv6
		if a, ok := r.Context().Value(http.LocalAddrContextKey).(*net.TCPAddr); ok && a.IP.To4() != nil {
			local = counts.IPv4
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		if local == 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		_ = json.NewEncoder(w).Encode(map[string]any{
			"service":             map[string]string{"namespace": svc.Namespace, "name": svc.Name},
			"localEndpoints":      local,
			"serviceProxyHealthy": true,
		})
	})
}

// Start runs until ctx ends, then closes every health check (a manager Runnable).
func (h *healthChecks) Start(ctx context.Context) error {
	<-ctx.Done()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.done = true
	var errs []error
	for svc, hc := range h.byID {
		errs = append(errs, hc.server.Close())
		delete(h.byID, svc)
	}
	return errors.Join(errs...)
}
