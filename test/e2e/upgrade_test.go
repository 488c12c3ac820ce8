package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/nstest"
	"github.com/portico-dev/portico/test/harness/wait"
)

// upgrade rolls every agent, one node at a time as a DaemonSet's rolling update does, to
// an agent that lays the Maglev map out differently (--maglev-table-size is its value
// size), then back. Connections held through a LoadBalancer address (announced by L2),
// a NodePort and a ClusterIP keep their backend through every restart; new connections
// work after each; the client's neighbour entry of each LoadBalancer address never moves
// (a restarting agent's peers hold its addresses); each node ends with the new layout alone.
func (c *cluster) upgrade(t *testing.T) {
	svc := c.service(t, "upgrade", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeLoadBalancer })
	c.endpoints(t, "upgrade", c.web[2])
	addrs := c.addresses(t, svc)
	for _, a := range addrs {
		_ = ip(c.net.Client, "route", "del", netip.PrefixFrom(a, a.BitLen()).String())
	}
	macs := c.macs(t)
	announcer := make([]int, len(families))
	var conns []*net.TCPConn
	var what []string
	for f := range families {
		announcer[f] = c.announcer(t, addrs[f])
		nodePort := netip.AddrPortFrom(c.net.Nodes[0].IPs[f], uint16(svc.Spec.Ports[0].NodePort))
		for _, to := range []netip.AddrPort{netip.AddrPortFrom(addrs[f], 80), nodePort} {
			everyPodAnswers(t, f, c.fromClient(to), c.web[2])
			conn, err := c.connect(netip.AddrPort{}, to)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { conn.Close() })
			conns, what = append(conns, conn), append(what, to.String())
		}
	}
	clusterIPs := make([]netip.AddrPort, len(families))
	for _, a := range svc.Spec.ClusterIPs {
		addr := netip.MustParseAddr(a)
		clusterIPs[map[bool]int{true: 0, false: 1}[addr.Is4()]] = netip.AddrPortFrom(addr, 80)
	}
	probes := make([]*probeConn, len(clusterIPs))
	for f, to := range clusterIPs {
		probes[f] = c.holdFromProbe(t, to)
	}
	held := func(t *testing.T, when string) {
		t.Helper()
		for i, conn := range conns {
			answer, err := exchange(conn)
			if err == nil {
				_, err = answeredBy(answer, i/2, c.web[2])
			}
			if err != nil {
				t.Errorf("%s, the connection held to %s: %v", when, what[i], err)
			}
		}
		for f, p := range probes {
			answer, err := p.exchange()
			if err == nil {
				_, err = answeredBy(answer, f, c.web[2])
			}
			if err != nil {
				t.Fatalf("%s, the probe's connection held to %s: %v", when, clusterIPs[f], err)
			}
		}
	}
	held(t, "before the upgrade")
	for _, version := range []struct {
		name string
		args []string
	}{{"to another Maglev map layout", []string{"--maglev-table-size=1021"}}, {"back", nil}} {
		t.Run(version.name, func(t *testing.T) {
			for i, node := range c.net.Nodes {
				before := c.maglevPins(t, i)
				if err := c.lab.Agents[i].Stop(); err != nil {
					t.Fatal(err)
				}
				held(t, node.Name+"'s agent stopped")
				// As a DaemonSet's rolling update does (maxUnavailable 1), the next node
				// waits until this one's agent is ready.
				c.restartAgent(t, i, version.args...)
				wait.For(t, node.Name+"'s maps to swap to the new layout", func() error {
					if now := c.maglevPins(t, i); len(now) != 1 || slices.Equal(now, before) {
						return fmt.Errorf("Maglev pins %v (before: %v)", now, before)
					}
					return nil
				})
				held(t, node.Name+"'s agent upgraded")
				for f := range families {
					if got := c.neighbour(t, addrs[f]); got != macs[announcer[f]] {
						t.Fatalf("after %s's restart the client's entry for %s is %q; want node-%d's %s all along", node.Name, addrs[f], got, announcer[f]+1, macs[announcer[f]])
					}
					everyPodAnswers(t, f, c.fromClient(netip.AddrPortFrom(addrs[f], 80)), c.web[2])
					everyPodAnswers(t, f, c.fromProbe(t, clusterIPs[f]), c.web[2])
				}
			}
			for f := range families {
				if got := c.announcer(t, addrs[f]); got != announcer[f] {
					t.Fatalf("%s moved from node-%d to node-%d", addrs[f], announcer[f]+1, got+1)
				}
			}
		})
	}
}

// agentReady asks a node's agent for /readyz, as the kubelet's readiness probe does.
func agentReady(node *lab.Node) error {
	status, _, err := agentGet(node, "127.0.0.1:9091", "/readyz")
	if err == nil && !strings.Contains(status, " 200 ") {
		err = fmt.Errorf("readyz: %s", status)
	}
	return err
}

// maglevPins lists node i's pins of the Maglev map, one per layout.
func (c *cluster) maglevPins(t *testing.T, i int) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(c.bpffs, "portico", c.net.Nodes[i].Name))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "portico_maglev-") {
			out = append(out, e.Name())
		}
	}
	return out
}

// probeConn is a connection held by a process in the probe pod (node-1's cgroup, where the
// socket programs translate it): each line written to it goes out, each answer comes back.
type probeConn struct {
	in  io.Writer
	out *bufio.Reader
}

func (c *cluster) holdFromProbe(t *testing.T, to netip.AddrPort) *probeConn {
	t.Helper()
	script := fmt.Sprintf(`exec 3<>/dev/tcp/%s/%d || exit 1; while read -r l; do echo "$l" >&3; IFS= read -r -t 2 r <&3 || exit 1; echo "$r"; done`, to.Addr(), to.Port())
	cmd, cg := nstest.CommandIn(t, c.probe.NS, c.net.Nodes[0].Cgroup, "bash", "-c", script)
	defer cg.Close()
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		_ = cmd.Wait()
	})
	return &probeConn{in: in, out: bufio.NewReader(out)}
}

func (p *probeConn) exchange() (string, error) {
	if _, err := io.WriteString(p.in, "hello\n"); err != nil {
		return "", err
	}
	line, err := p.out.ReadString('\n')
	return strings.TrimSpace(line), err
}
