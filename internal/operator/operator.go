// Package operator assembles Portico's control plane: the scheme, the manager and its
// reconcilers. The operator binary and the envtest suites both start it from here.
package operator

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	crmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/portico-dev/portico/internal/controller/agentds"
	"github.com/portico-dev/portico/internal/controller/lbpool"
	"github.com/portico-dev/portico/internal/controller/nodeagent"
	"github.com/portico-dev/portico/internal/controller/policystatus"
	"github.com/portico-dev/portico/internal/controller/servicelb"
	"github.com/portico-dev/portico/internal/scheme"
)

// Options configure the operator.
type Options struct {
	MetricsAddr, ProbeAddr string
	Class                  servicelb.Class
	Workers                int
	// QPS and Burst limit the operator's API requests (client-go's defaults, 20 and 30,
	// cap status writes at 20 per second: minutes for thousands of Services).
	QPS   float32
	Burst int
	// SeveralPerProcess allows more than one manager in a process (tests, benchmarks), which
	// otherwise refuses duplicate controller names because they share metrics.
	SeveralPerProcess bool
	// Registry takes Portico's metrics; nil: controller-runtime's, which MetricsAddr serves
	// (with SeveralPerProcess, a registry of the manager's own).
	Registry prometheus.Registerer

	// Agents, when set, is how the operator runs the node agents' DaemonSet.
	Agents *agentds.Config
	// AgentNamespace, when set, is where the agents keep their Leases: the NodeAgents of
	// agents whose Lease lapses are marked lost. AgentGrace is how long a Ready NodeAgent may
	// go without a Lease (0: 40 s).
	AgentNamespace string
	AgentGrace     time.Duration

	LeaderElect       bool
	LeaderNamespace   string
	LeaseDuration     time.Duration // zero: controller-runtime's defaults
	RenewDeadline     time.Duration
	LeaderRetryPeriod time.Duration
}

// NewManager builds the manager with every reconciler registered.
func NewManager(cfg *rest.Config, o Options) (ctrl.Manager, error) {
	s, err := scheme.New()
	if err != nil {
		return nil, err
	}
	cfg = rest.CopyConfig(cfg)
	if o.QPS > 0 {
		cfg.QPS, cfg.Burst = o.QPS, o.Burst
	}
	opts := ctrl.Options{
		Scheme: s,
		// managedFields are most of a Service's size and nothing here reads them.
		Cache:                   cache.Options{DefaultTransform: cache.TransformStripManagedFields()},
		Metrics:                 metricsserver.Options{BindAddress: o.MetricsAddr},
		HealthProbeBindAddress:  o.ProbeAddr,
		LeaderElection:          o.LeaderElect,
		LeaderElectionID:        "portico-operator.lb.portico.dev",
		LeaderElectionNamespace: o.LeaderNamespace,
		// A new leader rebuilds everything from Service status, so the old one may step down
		// at once instead of letting its lease run out.
		LeaderElectionReleaseOnCancel: true,
		Controller:                    config.Controller{SkipNameValidation: &o.SeveralPerProcess},
	}
	if o.AgentNamespace != "" {
		// Only the agents' Leases: not every namespace's (the kubelets' alone are one per node).
		opts.Cache.ByObject = map[client.Object]cache.ByObject{&coordinationv1.Lease{}: {Namespaces: map[string]cache.Config{o.AgentNamespace: {}}}}
	}
	if o.LeaseDuration > 0 {
		opts.LeaseDuration, opts.RenewDeadline, opts.RetryPeriod = &o.LeaseDuration, &o.RenewDeadline, &o.LeaderRetryPeriod
	}
	mgr, err := ctrl.NewManager(cfg, opts)
	if err != nil {
		return nil, fmt.Errorf("create manager: %w", err)
	}
	recorder := mgr.GetEventRecorderFor("portico")
	reg := o.Registry
	switch {
	case reg == nil && o.SeveralPerProcess:
		reg = prometheus.NewRegistry()
	case reg == nil:
		reg = crmetrics.Registry
	}
	allocMetrics, err := servicelb.NewMetrics(reg)
	if err != nil {
		return nil, err
	}
	poolAddresses, err := lbpool.NewAddressesGauge(reg)
	if err != nil {
		return nil, err
	}
	if err := (&servicelb.Reconciler{Client: mgr.GetClient(), Recorder: recorder, Class: o.Class, Workers: o.Workers, Metrics: allocMetrics}).SetupWithManager(mgr); err != nil {
		return nil, fmt.Errorf("set up the Service controller: %w", err)
	}
	if err := (&lbpool.Reconciler{Client: mgr.GetClient(), Recorder: recorder, Addresses: poolAddresses}).SetupWithManager(mgr); err != nil {
		return nil, fmt.Errorf("set up the LBPool controller: %w", err)
	}
	for _, kind := range []policystatus.Kind{policystatus.ServicePolicies, policystatus.L7Policies} {
		if err := (&policystatus.Reconciler{Client: mgr.GetClient(), Recorder: recorder, Kind: kind}).SetupWithManager(mgr); err != nil {
			return nil, fmt.Errorf("set up the %s controller: %w", kind.Name, err)
		}
	}
	if o.AgentNamespace != "" {
		if err := (&nodeagent.Reconciler{Client: mgr.GetClient(), Recorder: recorder, Namespace: o.AgentNamespace, Grace: o.AgentGrace}).SetupWithManager(mgr); err != nil {
			return nil, fmt.Errorf("set up the NodeAgent controller: %w", err)
		}
	}
	if o.Agents != nil {
		if err := (&agentds.Reconciler{Client: mgr.GetClient(), Recorder: recorder, Config: *o.Agents}).SetupWithManager(mgr); err != nil {
			return nil, fmt.Errorf("set up the agent DaemonSet controller: %w", err)
		}
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return nil, fmt.Errorf("add health check: %w", err)
	}
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		return nil, fmt.Errorf("add ready check: %w", err)
	}
	return mgr, nil
}
