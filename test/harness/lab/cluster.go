package lab

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sync"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Config says what a lab cluster runs on.
type Config struct {
	Name  string // prefixes every namespace and the cgroup (short and unique: "plab")
	Nodes int
	// Zones, when set, labels the nodes with topology.kubernetes.io/zone zone-a, zone-b, …
	// in runs of consecutive nodes: 4 nodes in 2 zones are node-1 and node-2 in zone-a,
	// node-3 and node-4 in zone-b.
	Zones int
	Dir   string // kubeconfigs and logs go here
	// API is the running API server (etcd and kube-apiserver, started by the caller).
	API *rest.Config
	// Assets holds kube-controller-manager and kube-scheduler.
	Assets string
	// Operator and Agent are the binaries of cmd/operator and cmd/agent.
	Operator, Agent string
	BPFFS           string // a bpffs mount for the agents' pins
}

// Cluster is a lab cluster: the network, kube-controller-manager and kube-scheduler, the
// operator, and per node a Kubelet and an agent. Its processes log to Dir/<name>.log.
type Cluster struct {
	*Network
	Kubeconfig string // for clients in the root namespace: kubectl, the operator
	Kubelets   []*Kubelet
	// Agents are the nodes' agents; StartAgent replaces one.
	Agents []*Process

	cfg      Config
	ctx      context.Context
	operator *Process
	cs       kubernetes.Interface
	nodeKC   string // for processes in node namespaces, through their forwarders
	procs    []*Process
	forwards []func()
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	errs     chan error
}

// Up builds the network and starts everything on it. On error, what started is stopped.
func Up(cfg Config) (*Cluster, error) {
	if cfg.Zones < 0 || cfg.Zones > cfg.Nodes || cfg.Zones > 26 {
		return nil, fmt.Errorf("%d zones for %d nodes: want 0 to %d", cfg.Zones, cfg.Nodes, min(cfg.Nodes, 26))
	}
	n, err := New(cfg.Name, cfg.Nodes)
	if err != nil {
		return nil, err
	}
	if cfg.Zones > 0 {
		for i, node := range n.Nodes {
			node.Zone = "zone-" + string(rune('a'+i*cfg.Zones/cfg.Nodes))
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Cluster{Network: n, cfg: cfg, ctx: ctx, cancel: cancel, errs: make(chan error, cfg.Nodes+4), // each component, kubelet and the routes tell at most once
		Kubeconfig: filepath.Join(cfg.Dir, "kubeconfig"), nodeKC: filepath.Join(cfg.Dir, "node.kubeconfig"),
		Agents: make([]*Process, cfg.Nodes), forwards: make([]func(), cfg.Nodes)}
	if err := c.up(ctx); err != nil {
		return nil, errors.Join(err, c.Close())
	}
	return c, nil
}

func (c *Cluster) up(ctx context.Context) error {
	if err := WriteKubeconfig(c.cfg.API, c.cfg.API.Host, c.Kubeconfig); err != nil {
		return err
	}
	if err := WriteKubeconfig(c.cfg.API, fmt.Sprintf("https://127.0.0.1:%d", APIPort), c.nodeKC); err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(c.cfg.API)
	if err != nil {
		return fmt.Errorf("client: %w", err)
	}
	c.cs = cs
	components := []*exec.Cmd{
		exec.Command(filepath.Join(c.cfg.Assets, "kube-controller-manager"), "--kubeconfig="+c.Kubeconfig,
			"--leader-elect=false", "--secure-port=0", "--controllers=*", "--use-service-account-credentials=false",
			"--cluster-name="+c.cfg.Name),
		exec.Command(filepath.Join(c.cfg.Assets, "kube-scheduler"), "--kubeconfig="+c.Kubeconfig,
			"--leader-elect=false", "--secure-port=0"),
	}
	for _, cmd := range components {
		if _, err := c.start(ctx, cmd); err != nil {
			return err
		}
	}
	if err := c.RestartOperator(); err != nil {
		return err
	}
	for i, node := range c.Nodes {
		k := NewKubelet(node, cs)
		c.Kubelets = append(c.Kubelets, k)
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			if err := k.Run(ctx); err != nil {
				c.errs <- err
			}
		}()
		if err := c.ConnectAPI(i); err != nil {
			return err
		}
		if err := c.StartAgent(i); err != nil {
			return err
		}
	}
	return nil
}

// start runs a component in the root namespace, logging to Dir/<binary>.log; Failed
// tells when it ends before ctx, unless it was stopped.
func (c *Cluster) start(ctx context.Context, cmd *exec.Cmd) (*Process, error) {
	name := filepath.Base(cmd.Path)
	path := filepath.Join(c.cfg.Dir, name+".log")
	log, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, fmt.Errorf("log: %w", err)
	}
	defer log.Close()
	cmd.Stdout, cmd.Stderr = log, log
	p, err := startIn(cmd, "")
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	c.procs = append(c.procs, p)
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		select {
		case <-p.Exited():
			if !p.stopped.Load() {
				c.errs <- fmt.Errorf("%s exited: %s (log: %s)", name, p.cmd.ProcessState, path)
			}
		case <-ctx.Done():
		}
	}()
	return p, nil
}

// RestartOperator starts the operator, or stops it (SIGTERM, as a rollout does) and starts
// it again.
func (c *Cluster) RestartOperator() error {
	if c.operator != nil {
		if err := c.operator.Stop(); err != nil {
			return err
		}
	}
	p, err := c.start(c.ctx, exec.Command(c.cfg.Operator, "--kubeconfig="+c.Kubeconfig, "--claim-classless-services",
		"--agent-namespace="+AgentNamespace, "--metrics-bind-address=0", "--health-probe-bind-address=0"))
	if err != nil {
		return err
	}
	c.operator = p
	return nil
}

// Failed reports a component that ended, or a kubelet that could not start.
func (c *Cluster) Failed() <-chan error { return c.errs }

// AgentNamespace holds the agents' Leases, as a DaemonSet's namespace would. The lab's Leases
// last 2 s (40 s by default), so that a killed agent's NodeAgent is marked lost in seconds.
const AgentNamespace = "kube-system"

// StartAgent starts node i's agent, or starts it again after it stopped, with more flags
// when args are given (an upgrade: the next version's).
func (c *Cluster) StartAgent(i int, args ...string) error {
	node := c.Nodes[i]
	if old := c.Agents[i]; old != nil {
		if err := old.Stop(); err != nil {
			return err
		}
	}
	log, err := os.OpenFile(c.AgentLog(i), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("log: %w", err)
	}
	defer log.Close()
	key, err := c.heartbeatKey()
	if err != nil {
		return err
	}
	a, err := node.StartAgent(AgentConfig{Binary: c.cfg.Agent, Kubeconfig: c.nodeKC, BPFFS: c.cfg.BPFFS, HeartbeatKey: key, Log: log, Args: args})
	if err != nil {
		return err
	}
	c.Agents[i] = a
	return nil
}

// heartbeatKey returns the file of the key every agent of the lab signs its heartbeats
// with, as the operator's Secret gives a cluster's agents one; the first call writes it.
func (c *Cluster) heartbeatKey() (string, error) {
	path := filepath.Join(c.cfg.Dir, "heartbeat.key")
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	if err := os.WriteFile(path, []byte(rand.Text()), 0o600); err != nil {
		return "", fmt.Errorf("heartbeat key: %w", err)
	}
	return path, nil
}

// AgentLog is where node i's agent logs.
func (c *Cluster) AgentLog(i int) string {
	return filepath.Join(c.cfg.Dir, c.Nodes[i].Name+".agent.log")
}

// ConnectAPI opens node i's way to the API server (again); DisconnectAPI cuts it, as a
// network partition between the node and the control plane would.
func (c *Cluster) ConnectAPI(i int) error {
	if c.forwards[i] != nil {
		return nil // connected
	}
	server, err := url.Parse(c.cfg.API.Host)
	if err != nil {
		return fmt.Errorf("API server address: %w", err)
	}
	stop, err := Forward(c.Nodes[i].NS, fmt.Sprintf("127.0.0.1:%d", APIPort), server.Host)
	if err != nil {
		return err
	}
	c.forwards[i] = stop
	return nil
}

// DisconnectAPI cuts node i's way to the API server and every connection through it.
func (c *Cluster) DisconnectAPI(i int) {
	if c.forwards[i] != nil {
		c.forwards[i]()
		c.forwards[i] = nil
	}
}

// Close stops everything and removes the network.
func (c *Cluster) Close() error {
	var errs []error
	for _, a := range c.Agents {
		if a != nil {
			errs = append(errs, a.Stop())
		}
	}
	c.cancel()
	c.wg.Wait()
	for i := range c.forwards {
		c.DisconnectAPI(i)
	}
	for _, p := range c.procs {
		errs = append(errs, p.Stop())
	}
	return errors.Join(append(errs, c.Network.Close())...)
}

// WriteKubeconfig writes a kubeconfig for cfg's user that reaches the API server at server
// (cfg.Host, or a forwarder to it: the certificate must still match).
func WriteKubeconfig(cfg *rest.Config, server, path string) error {
	kc := clientcmdapi.NewConfig()
	kc.Clusters["portico"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: cfg.CertData, ClientKeyData: cfg.KeyData, Token: cfg.BearerToken}
	kc.Contexts["portico"] = &clientcmdapi.Context{Cluster: "portico", AuthInfo: "admin"}
	kc.CurrentContext = "portico"
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return nil
}
