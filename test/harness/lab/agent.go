package lab

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"
)

// APIPort is where, inside every node namespace, a forwarder (Forward) reaches the API server.
const APIPort = 6443

// AgentConfig says how to run a node's agent.
type AgentConfig struct {
	Binary     string // cmd/agent
	Kubeconfig string // its server is https://127.0.0.1:APIPort, the node's forwarder
	BPFFS      string // a bpffs mount; pins go to <BPFFS>/portico/<node>
	// HeartbeatKey is the file of the key that signs the agents' heartbeats.
	HeartbeatKey string
	Log          io.Writer
	// Args are more flags, after the lab's (a flag given twice takes the last value).
	Args []string
}

// Process is a process the lab started: a node's agent, a control-plane component, the
// operator.
type Process struct {
	cmd     *exec.Cmd
	done    chan struct{}
	stopped atomic.Bool // by Stop or Kill: its end is no failure
}

// StartAgent starts the node's agent: the datapath on eth0, the socket programs on the
// node's cgroup. It enters only the network namespace (nsenter, not `ip netns exec`, which
// would hide the cgroup and bpffs mounts under /sys).
func (node *Node) StartAgent(c AgentConfig) (*Process, error) {
	cmd := exec.Command("nsenter", "--net="+filepath.Join("/run/netns", node.NS), c.Binary,
		"--node-name="+node.Name, "--devices=eth0", "--cgroup-root="+node.Cgroup, "--bpffs="+c.BPFFS,
		"--kubeconfig="+c.Kubeconfig, "--metrics-bind-address=127.0.0.1:9090", "--health-probe-bind-address=127.0.0.1:9091",
		"--lease-namespace="+AgentNamespace, "--lease-duration=2s", "--l2-heartbeat-key-file="+c.HeartbeatKey)
	cmd.Args = append(cmd.Args, c.Args...)
	cmd.Stdout, cmd.Stderr = c.Log, c.Log
	p, err := startIn(cmd, node.Cgroup)
	if err != nil {
		return nil, fmt.Errorf("start the agent of %s: %w", node.Name, err)
	}
	return p, nil
}

// startIn starts cmd in its own process group, in cgroup when it is not "".
func startIn(cmd *exec.Cmd, cgroup string) (*Process, error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if cgroup != "" {
		cg, err := os.Open(cgroup)
		if err != nil {
			return nil, fmt.Errorf("open cgroup: %w", err)
		}
		defer cg.Close()
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, int(cg.Fd())
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Process{cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	return p, nil
}

// Stop ends the process as the kubelet would (SIGTERM, then SIGKILL after 10 s).
func (p *Process) Stop() error {
	p.stopped.Store(true)
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(10 * time.Second):
		return errors.Join(fmt.Errorf("%s did not stop within 10 s", filepath.Base(p.cmd.Path)), p.Kill())
	}
}

// Kill ends the process at once, as a crash would.
func (p *Process) Kill() error {
	p.stopped.Store(true)
	err := p.cmd.Process.Kill()
	<-p.done
	if errors.Is(err, os.ErrProcessDone) {
		return nil
	}
	return err
}

// Exited is closed when the process has ended.
func (p *Process) Exited() <-chan struct{} { return p.done }
