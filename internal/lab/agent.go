package lab

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
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
	Log        io.Writer
}

// Agent is a node agent process running in its node's namespace and cgroup.
type Agent struct {
	cmd  *exec.Cmd
	done chan struct{}
}

// StartAgent starts the node's agent: the datapath on eth0, the socket programs on the
// node's cgroup. It enters only the network namespace (nsenter, not `ip netns exec`, which
// would hide the cgroup and bpffs mounts under /sys).
func (node *Node) StartAgent(c AgentConfig) (*Agent, error) {
	cg, err := os.Open(node.Cgroup)
	if err != nil {
		return nil, fmt.Errorf("open cgroup: %w", err)
	}
	defer cg.Close()
	cmd := exec.Command("nsenter", "--net="+filepath.Join("/run/netns", node.NS), c.Binary,
		"--node-name="+node.Name, "--devices=eth0", "--cgroup-root="+node.Cgroup, "--bpffs="+c.BPFFS,
		"--kubeconfig="+c.Kubeconfig, "--metrics-bind-address=127.0.0.1:9090", "--health-probe-bind-address=127.0.0.1:9091")
	cmd.Stdout, cmd.Stderr = c.Log, c.Log
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd()), Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the agent of %s: %w", node.Name, err)
	}
	a := &Agent{cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(a.done) }()
	return a, nil
}

// Stop ends the agent as the kubelet would (SIGTERM, then SIGKILL after 10 s). Its pins stay.
func (a *Agent) Stop() error {
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
		return nil
	case <-time.After(10 * time.Second):
		return errors.Join(errors.New("the agent did not stop within 10 s"), a.Kill())
	}
}

// Kill ends the agent at once, as a crash would.
func (a *Agent) Kill() error {
	err := a.cmd.Process.Kill()
	<-a.done
	if errors.Is(err, os.ErrProcessDone) {
		return nil
	}
	return err
}
