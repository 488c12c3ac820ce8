// Package e2e runs Portico as users do, on a real API server and simulated nodes
// (test/harness/lab), and checks it with real traffic. The scenarios follow what Kubernetes' own
// Service e2e tests ask of a kube-proxy replacement; each runs for IPv4 and IPv6.
package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/datapath"
	"github.com/portico-dev/portico/test/harness/lab"
	"github.com/portico-dev/portico/test/harness/wait"
)

// Three agents, each in its own node namespace, turn Services and EndpointSlices into
// working traffic: from pods through the socket layer, from outside through the packet layer
// of whichever node the traffic reaches.
func TestAgentsOnThreeNodes(t *testing.T) {
	c := start(t)
	t.Run("ClusterIP from a pod: scale, port change, delete", c.clusterIP)
	t.Run("NodePort on every node, and back to ClusterIP", c.nodePort)
	t.Run("LoadBalancer and externalIPs, spread then session affinity", c.loadBalancer)
	t.Run("externalTrafficPolicy Local with healthCheckNodePort", c.externalLocal)
	t.Run("trafficDistribution: same zone, same node, and their fallbacks", c.topology)
	t.Run("source ranges from the Service and from a ServicePolicy", c.sourceRanges)
	t.Run("Maglev by ServicePolicy: every node picks the same backend", c.maglev)
	t.Run("agent restart and crash keep established connections", c.restart)
	t.Run("rolling upgrade to agents with another map layout, and back", c.upgrade)
	t.Run("API server unreachable: the node keeps its last state", c.apiDown)
	t.Run("Deployment: readiness gates, termination, scale to zero", c.deployment)
	t.Run("type changes: ExternalName and ClusterIP, a released NodePort", c.typeChanges)
	t.Run("pool withdrawn and back", c.poolLifecycle)
	t.Run("L2: one node answers ARP/NDP, another takes over when its agent dies", c.l2)
	t.Run("L7Policy: the node's proxy spreads the requests of one connection", c.l7)
	t.Run("L7Policy on gRPC: 300 calls over one connection, every greeter answers", c.grpcSeed)
	t.Run("a pod with an image the lab lacks stays Pending", c.unknownImage)
	t.Run("uninstall: the DaemonSet deleted, and porticoctl for a node", c.uninstall)
}

func (c *cluster) clusterIP(t *testing.T) {
	svc := c.service(t, "cip", nil)
	c.endpoints(t, "cip", c.web[1], c.web[2])
	vip := func(f int, port uint16) netip.AddrPort {
		return netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIPs[f]), port)
	}
	// answered checks n answers from the probe pod, each from one of pods.
	answered := func(f int, to netip.AddrPort, n int, pods ...*lab.Pod) error {
		for range n {
			if _, err := answeredBy(c.dialFromProbe(t, to), f, pods...); err != nil {
				return err
			}
		}
		return nil
	}
	for f, fam := range families {
		t.Run(fam, func(t *testing.T) {
			wait.For(t, "reach the ClusterIP", func() error { return answered(f, vip(f, 80), 1, c.web[1], c.web[2]) })
		})
	}
	c.endpoints(t, "cip", c.web[2])
	for f, fam := range families {
		t.Run(fam+"/scaled down", func(t *testing.T) {
			wait.For(t, "only web-3 answers", func() error { return answered(f, vip(f, 80), 5, c.web[2]) })
		})
	}
	c.endpoints(t, "cip", c.web[0], c.web[1], c.web[2])
	for f, fam := range families {
		t.Run(fam+"/scaled up", func(t *testing.T) { everyPodAnswers(t, f, c.fromProbe(t, vip(f, 80)), c.web...) })
	}
	c.update(t, svc, func(s *corev1.Service) { s.Spec.Ports[0].Port = 90 })
	for f, fam := range families {
		t.Run(fam+"/port changed", func(t *testing.T) {
			wait.For(t, "port 90 answers", func() error { return answered(f, vip(f, 90), 1, c.web...) })
			wait.For(t, "port 80 is gone", func() error {
				if got := c.dialFromProbe(t, vip(f, 80)); isEcho(got) {
					return fmt.Errorf("port 80 still answers: %q", got)
				}
				return nil
			})
		})
	}
	if err := c.c.Delete(context.Background(), svc); err != nil {
		t.Fatal(err)
	}
	for f, fam := range families {
		t.Run(fam+"/deleted", func(t *testing.T) {
			wait.For(t, "the ClusterIP is gone", func() error {
				if got := c.dialFromProbe(t, vip(f, 90)); isEcho(got) {
					return fmt.Errorf("still answers: %q", got)
				}
				return nil
			})
		})
	}
}

func (c *cluster) nodePort(t *testing.T) {
	svc := c.service(t, "np", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeNodePort })
	c.endpoints(t, "np", c.web[0], c.web[1])
	port := uint16(svc.Spec.Ports[0].NodePort)
	for f, fam := range families {
		t.Run(fam, func(t *testing.T) {
			for i, node := range c.net.Nodes {
				to := netip.AddrPortFrom(node.IPs[f], port)
				wait.For(t, "reach "+to.String(), func() error {
					answer, err := c.dial(netip.AddrPort{}, to)
					if err != nil {
						return err
					}
					p, err := answeredBy(answer, f, c.web[0], c.web[1])
					if err != nil {
						return err
					}
					// A backend on another node sees the node's address (SNAT); one on the
					// node itself sees the client.
					if p.Node != node.Name {
						return seenFrom(answer, node.IPs[f])
					}
					if i < 2 {
						return seenFrom(answer, c.net.ClientIPs[f])
					}
					return nil
				})
			}
		})
	}
	t.Run("every node's agent counts the flows of its packet layer", func(t *testing.T) {
		for _, node := range c.net.Nodes {
			if n, size := agentMetric(t, node, "portico_agent_conntrack_entries"), agentMetric(t, node, "portico_agent_conntrack_capacity"); n < 2 || size != datapath.DefaultConntrackSize {
				t.Errorf("%s: %v conntrack entries of %v; want the NodePort flows (two entries each) of %d", node.Name, n, size, datapath.DefaultConntrackSize)
			}
		}
	})
	c.update(t, svc, func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeClusterIP
		s.Spec.Ports[0].NodePort = 0
	})
	for f, fam := range families {
		t.Run(fam+"/back to ClusterIP", func(t *testing.T) {
			to := netip.AddrPortFrom(c.net.Nodes[2].IPs[f], port)
			wait.For(t, "the NodePort is released", func() error {
				if _, err := c.dial(netip.AddrPort{}, to); !refused(err) {
					return fmt.Errorf("dial %s: %v, want connection refused", to, err)
				}
				return nil
			})
		})
	}
}

func (c *cluster) loadBalancer(t *testing.T) {
	external := []string{"192.0.2.80", "2001:db8::1:50"} // outside the pool
	svc := c.service(t, "lb", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		s.Spec.ExternalIPs = external
	})
	c.endpoints(t, "lb", c.web...)
	lbIPs := c.ingress(t, svc, 1)
	for f, fam := range families {
		c.routeVia(t, netip.MustParseAddr(external[f]), 1)
		t.Run(fam, func(t *testing.T) {
			for _, a := range []netip.Addr{lbIPs[f], netip.MustParseAddr(external[f])} {
				everyPodAnswers(t, f, c.fromClient(netip.AddrPortFrom(a, 80)), c.web...)
			}
		})
	}
	c.update(t, svc, func(s *corev1.Service) { s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP })
	for f, fam := range families {
		t.Run(fam+"/session affinity", func(t *testing.T) {
			to := netip.AddrPortFrom(lbIPs[f], 80)
			// Ten answers in a row from one pod, by chance, happen once in 20,000 rounds.
			same := func() error {
				first := ""
				for range 10 {
					answer, err := c.dial(netip.AddrPort{}, to)
					if err != nil {
						return err
					}
					p, err := answeredBy(answer, f, c.web...)
					if err != nil {
						return err
					}
					if first == "" {
						first = p.Name
					} else if p.Name != first {
						return fmt.Errorf("answers from %s and %s", first, p.Name)
					}
				}
				return nil
			}
			wait.For(t, "one pod answers every connection", same)
		})
	}
	if err := c.c.Delete(context.Background(), svc); err != nil {
		t.Fatal(err)
	}
	for f, fam := range families {
		t.Run(fam+"/deleted", func(t *testing.T) {
			wait.For(t, "the addresses are gone", func() error {
				for _, a := range []netip.Addr{lbIPs[f], netip.MustParseAddr(external[f])} {
					if answer, err := c.dial(netip.AddrPort{}, netip.AddrPortFrom(a, 80)); err == nil {
						return fmt.Errorf("%s still answers: %q", a, answer)
					}
				}
				return nil
			})
		})
	}
}

func (c *cluster) externalLocal(t *testing.T) {
	svc := c.service(t, "local", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	})
	c.endpoints(t, "local", c.web[1])
	lbIPs := c.ingress(t, svc, 1)
	// check says what node's health check answers (to a probe of each family, as each
	// family's load balancer would probe) and what a connection through the node gets.
	check := func(t *testing.T, node int, local *lab.Pod) {
		t.Helper()
		want, body := 503, `"localEndpoints":0`
		if local != nil {
			want, body = 200, `"localEndpoints":1`
		}
		for _, a := range c.net.Nodes[node].IPs {
			url := fmt.Sprintf("http://%s/", netip.AddrPortFrom(a, uint16(svc.Spec.HealthCheckNodePort)))
			wait.For(t, "GET "+url, func() error {
				code, got, err := c.get(url)
				if err != nil || code != want || !strings.Contains(got, body) {
					return fmt.Errorf("got %d %q (%v), want %d with %s", code, got, err, want, body)
				}
				return nil
			})
		}
		for f, fam := range families {
			t.Run(fam, func(t *testing.T) {
				c.routeVia(t, lbIPs[f], node)
				to := netip.AddrPortFrom(lbIPs[f], 80)
				wait.For(t, "traffic through "+c.net.Nodes[node].Name, func() error {
					answer, err := c.dial(netip.AddrPort{}, to)
					if local == nil {
						if err == nil {
							return fmt.Errorf("a node without local endpoints answered %q", answer)
						}
						return nil
					}
					if err != nil {
						return err
					}
					if _, err := answeredBy(answer, f, local); err != nil {
						return err
					}
					return seenFrom(answer, c.net.ClientIPs[f])
				})
			})
		}
	}
	t.Run("endpoint on node-2", func(t *testing.T) {
		check(t, 1, c.web[1])
		check(t, 0, nil)
	})
	c.endpoints(t, "local", c.web[0])
	t.Run("endpoint moved to node-1", func(t *testing.T) {
		check(t, 0, c.web[0])
		check(t, 1, nil)
	})
}

func (c *cluster) sourceRanges(t *testing.T) {
	svc := c.service(t, "ranges", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		s.Spec.LoadBalancerSourceRanges = []string{"192.0.2.253/32", "2001:db8::1:fd/128"}
	})
	c.endpoints(t, "ranges", c.web...)
	lbIPs := c.ingress(t, svc, 0)
	// allowed checks that exactly the allowed one of the client's two addresses gets through.
	allowed := func(t *testing.T, f int, ok, not netip.Addr) {
		t.Helper()
		to := netip.AddrPortFrom(lbIPs[f], 80)
		wait.For(t, fmt.Sprintf("only %s gets through", ok), func() error {
			if answer, err := c.dial(netip.AddrPortFrom(not, 0), to); err == nil {
				return fmt.Errorf("from %s: answered %q", not, answer)
			}
			answer, err := c.dial(netip.AddrPortFrom(ok, 0), to)
			if err != nil {
				return fmt.Errorf("from %s: %w", ok, err)
			}
			_, err = answeredBy(answer, f, c.web...)
			return err
		})
	}
	for f, fam := range families {
		t.Run(fam+"/loadBalancerSourceRanges", func(t *testing.T) { allowed(t, f, c.second[f], c.net.ClientIPs[f]) })
	}
	policy := &lbv1.ServicePolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "ranges", Namespace: "default"},
		Spec: lbv1.ServicePolicySpec{
			TargetRefs:   []lbv1.ServiceTargetReference{{Name: "ranges"}},
			SourceRanges: []string{c.net.ClientIPs[0].String() + "/32", c.net.ClientIPs[1].String() + "/128"},
		},
	}
	if err := c.c.Create(context.Background(), policy); err != nil {
		t.Fatal(err)
	}
	for f, fam := range families {
		t.Run(fam+"/ServicePolicy sourceRanges replace them", func(t *testing.T) { allowed(t, f, c.net.ClientIPs[f], c.second[f]) })
	}
	if err := c.c.Delete(context.Background(), policy); err != nil {
		t.Fatal(err)
	}
	for f, fam := range families {
		t.Run(fam+"/policy deleted", func(t *testing.T) { allowed(t, f, c.second[f], c.net.ClientIPs[f]) })
	}
}

func (c *cluster) maglev(t *testing.T) {
	svc := c.service(t, "maglev", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeLoadBalancer })
	c.endpoints(t, "maglev", c.web...)
	lbIPs := c.ingress(t, svc, 0)
	policy := &lbv1.ServicePolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "maglev", Namespace: "default"},
		Spec: lbv1.ServicePolicySpec{
			TargetRefs:    []lbv1.ServiceTargetReference{{Name: "maglev"}},
			LoadBalancing: &lbv1.LoadBalancing{Algorithm: lbv1.AlgorithmMaglev, MaglevTableSize: 16381},
		},
	}
	if err := c.c.Create(context.Background(), policy); err != nil {
		t.Fatal(err)
	}
	t.Run("every NodeAgent reports the policy, and the policy says so", func(t *testing.T) {
		want := lbv1.ProgrammedPolicy{Kind: "ServicePolicy", Namespace: "default", Name: "maglev", Generation: policy.Generation}
		for _, node := range c.net.Nodes {
			wait.For(t, node.Name+"'s NodeAgent", func() error {
				var na lbv1.NodeAgent
				if err := c.c.Get(context.Background(), client.ObjectKey{Name: node.Name}, &na); err != nil {
					return err
				}
				if !meta.IsStatusConditionTrue(na.Status.Conditions, lbv1.ConditionReady) || na.Status.Services == 0 ||
					!slices.Contains(na.Status.Policies, want) || len(na.OwnerReferences) != 1 || na.OwnerReferences[0].Name != node.Name {
					return fmt.Errorf("NodeAgent %+v, want Ready, Services, %+v and owned by its Node", na, want)
				}
				return nil
			})
		}
		wait.For(t, "the policy's Programmed condition", func() error {
			if err := c.c.Get(context.Background(), client.ObjectKeyFromObject(policy), policy); err != nil {
				return err
			}
			if !meta.IsStatusConditionTrue(policy.Status.Conditions, lbv1.ConditionProgrammed) || policy.Status.ProgrammedNodes != 3 {
				return fmt.Errorf("status %+v, want Programmed on 3 nodes", policy.Status)
			}
			return nil
		})
	})
	for f, fam := range families {
		t.Run(fam, func(t *testing.T) {
			to := netip.AddrPortFrom(lbIPs[f], 80)
			round := 0
			// The same flows (client address and port), sent once through node-1 and once
			// through node-2, reach the same pods. At random, 12 flows would agree once in
			// 500,000 rounds. Each round uses new ports: the nodes remember old flows.
			wait.For(t, "node-1 and node-2 pick alike", func() error {
				round++
				picks := [2][]string{}
				for i, node := range []int{0, 1} {
					c.routeVia(t, lbIPs[f], node)
					for k := range 12 {
						answer, err := c.dial(netip.AddrPortFrom(c.net.ClientIPs[f], uint16(40000+round*16+k)), to)
						if err != nil {
							return err
						}
						p, err := answeredBy(answer, f, c.web...)
						if err != nil {
							return err
						}
						picks[i] = append(picks[i], p.Name)
					}
				}
				if fmt.Sprint(picks[0]) != fmt.Sprint(picks[1]) {
					return fmt.Errorf("node-1 picked %v, node-2 %v", picks[0], picks[1])
				}
				if distinct := len(unique(picks[0])); distinct < 2 {
					return fmt.Errorf("12 flows all went to %s", picks[0][0])
				}
				return nil
			})
		})
	}
}

func unique(s []string) map[string]bool {
	m := map[string]bool{}
	for _, v := range s {
		m[v] = true
	}
	return m
}

func (c *cluster) restart(t *testing.T) {
	svc := c.service(t, "held", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeLoadBalancer })
	c.endpoints(t, "held", c.web[2])
	lbIPs := c.ingress(t, svc, 0)
	// answers checks new connections through node-1 until each of pods has answered.
	answers := func(t *testing.T, f int, pods ...*lab.Pod) {
		t.Helper()
		everyPodAnswers(t, f, c.fromClient(netip.AddrPortFrom(lbIPs[f], 80)), pods...)
	}
	// Connections through node-1 to web-3 on node-3, translated and SNATed by node-1, held
	// open through the restarts.
	conns := make([]*net.TCPConn, len(families))
	for f := range families {
		to := netip.AddrPortFrom(lbIPs[f], 80)
		wait.For(t, "connect to "+to.String(), func() error {
			conn, err := c.connect(netip.AddrPort{}, to)
			if err != nil {
				return err
			}
			answer, err := exchange(conn)
			if err == nil {
				_, err = answeredBy(answer, f, c.web[2])
			}
			if err == nil {
				err = c.translatedBy(answer, f, 0)
			}
			if err != nil {
				conn.Close()
				return err
			}
			conns[f] = conn
			return nil
		})
		t.Cleanup(func() { conns[f].Close() })
	}
	held := func(t *testing.T, when string) {
		t.Helper()
		for f, conn := range conns {
			answer, err := exchange(conn)
			if err == nil {
				_, err = answeredBy(answer, f, c.web[2])
			}
			if err != nil {
				t.Fatalf("%s, the held %s connection: %v", when, families[f], err)
			}
		}
	}
	for _, how := range []struct {
		name string
		stop func(*lab.Process) error
	}{{"stopped", (*lab.Process).Stop}, {"crashed", (*lab.Process).Kill}} {
		t.Run(how.name, func(t *testing.T) {
			if err := how.stop(c.lab.Agents[0]); err != nil {
				t.Fatal(err)
			}
			held(t, "agent "+how.name)
			for f := range families {
				answers(t, f, c.web[2])
			}
			// A change while no agent runs reaches node-1 once its agent is back.
			c.endpoints(t, "held", c.web[1], c.web[2])
			if err := c.lab.StartAgent(0); err != nil {
				t.Fatal(err)
			}
			for f := range families {
				answers(t, f, c.web[1], c.web[2])
			}
			held(t, "agent restarted")
			c.endpoints(t, "held", c.web[2])
		})
	}
}

func (c *cluster) apiDown(t *testing.T) {
	svc := c.service(t, "cut", func(s *corev1.Service) { s.Spec.Type = corev1.ServiceTypeLoadBalancer })
	c.endpoints(t, "cut", c.web[1])
	lbIPs := c.ingress(t, svc, 0)
	reach := func(t *testing.T, pod *lab.Pod) {
		t.Helper()
		for f := range families {
			everyPodAnswers(t, f, c.fromClient(netip.AddrPortFrom(lbIPs[f], 80)), pod)
		}
	}
	reach(t, c.web[1])
	// The addresses are on the segment, so a node without the frontend would route the
	// traffic to the announcing node, which has it: wait until node-1 translates the traffic
	// itself (it SNATs to its own address, web-2 being on node-2), so that its state is the
	// one the row looks at.
	for f := range families {
		wait.For(t, "node-1 to translate "+lbIPs[f].String()+" itself", func() error {
			answer, err := c.dial(netip.AddrPort{}, netip.AddrPortFrom(lbIPs[f], 80))
			if err != nil {
				return err
			}
			return c.translatedBy(answer, f, 0)
		})
	}
	// Node-1 loses the API server (its watches break, its lists fail) while the cluster
	// changes: it keeps forwarding with what it had.
	c.lab.DisconnectAPI(0)
	t.Cleanup(func() { _ = c.lab.ConnectAPI(0) }) // the next rows need it, whatever happens here
	c.endpoints(t, "cut", c.web[2])
	time.Sleep(3 * time.Second) // several of the agent's retries
	for f := range families {
		for range 5 {
			answer, err := c.dial(netip.AddrPort{}, netip.AddrPortFrom(lbIPs[f], 80))
			if err == nil {
				_, err = answeredBy(answer, f, c.web[1])
			}
			if err != nil {
				t.Fatalf("without the API server, node-1 %v; want the last state (web-2)", err)
			}
		}
	}
	if err := c.lab.ConnectAPI(0); err != nil {
		t.Fatal(err)
	}
	reach(t, c.web[2])
}

// agentGet asks one of the agent's endpoints in the node's namespace (addr) for path, and
// returns the status line and the body. The socket is made on a thread in the node's
// namespace (http.Get would dial from another); HTTP/1.0, so that the agent closes it after
// the response.
func agentGet(node *lab.Node, addr, path string) (status, body string, err error) {
	var conn net.Conn
	if err := lab.In(node.NS, func() (err error) { conn, err = net.Dial("tcp", addr); return err }); err != nil {
		return "", "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, "GET "+path+" HTTP/1.0\r\nHost: agent\r\n\r\n"); err != nil {
		return "", "", err
	}
	b, err := io.ReadAll(conn)
	status, body, _ = strings.Cut(string(b), "\r\n")
	return status, body, err
}

// agentMetric reads a gauge from the metrics the node's agent serves on 127.0.0.1:9090 in
// the node's namespace.
func agentMetric(t *testing.T, node *lab.Node, name string) float64 {
	t.Helper()
	_, body, err := agentGet(node, "127.0.0.1:9090", "/metrics")
	if err != nil {
		t.Fatalf("%s: scrape the agent: %v", node.Name, err)
	}
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				t.Fatalf("%s: %s: %v", node.Name, line, err)
			}
			return f
		}
	}
	t.Fatalf("%s: the agent serves no %s", node.Name, name)
	return 0
}
