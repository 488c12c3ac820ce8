// Command porticoctl shows what Portico did and why. As a kubectl plugin, install it on the
// PATH as kubectl-portico and run `kubectl portico <command>`. Only wiring lives here
// (internal/cli).
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/portico-dev/portico/internal/cli"
	"github.com/portico-dev/portico/internal/scheme"
)

const usage = `porticoctl shows what Portico did and why.

  porticoctl pools                      each pool: ready, addresses used and free per family, conflicts
  porticoctl announcements              each LoadBalancer address: its Service, pool, announcing node
  porticoctl nodes                      each node's agent: ready, programmed Services, policies, announcements
  porticoctl explain [-n ns] <service>  why a Service has (no) address, where its traffic goes
  porticoctl uninstall-node [--bpffs /sys/fs/bpf] <node>
                                        on the node, after its agent stopped: remove Portico's
                                        programs and pins (deleting the DaemonSet does it everywhere)

Flags:
`

func main() {
	flag.Usage = func() {
		fmt.Fprint(flag.CommandLine.Output(), usage)
		flag.PrintDefaults()
	}
	flag.Parse()
	args := flag.Args()
	if len(args) == 0 {
		flag.Usage()
		os.Exit(2)
	}
	if args[0] == "uninstall-node" {
		uninstall := flag.NewFlagSet("uninstall-node", flag.ExitOnError)
		bpffs := uninstall.String("bpffs", "/sys/fs/bpf", "The node's bpffs mount, the agent's --bpffs.")
		probe := uninstall.String("agent-probe-address", "127.0.0.1:9091", "Where the node's agent answers health probes (its --health-probe-bind-address): a running agent is left alone.")
		_ = uninstall.Parse(args[1:])
		if uninstall.NArg() != 1 {
			flag.Usage()
			os.Exit(2)
		}
		up := false
		if conn, err := net.DialTimeout("tcp", *probe, time.Second); err == nil {
			conn.Close()
			up = true
		}
		if err := cli.UninstallNode(os.Stdout, filepath.Join(*bpffs, "portico", uninstall.Arg(0)), up); err != nil {
			fail(err)
		}
		return
	}
	cfg, err := ctrl.GetConfig()
	if err != nil {
		fail(err)
	}
	s, err := scheme.New()
	if err != nil {
		fail(err)
	}
	c, err := client.New(cfg, client.Options{Scheme: s})
	if err != nil {
		fail(err)
	}
	run := &cli.CLI{Client: c, Out: os.Stdout}
	ctx := context.Background()
	switch {
	case args[0] == "pools" && len(args) == 1:
		err = run.Pools(ctx)
	case args[0] == "announcements" && len(args) == 1:
		err = run.Announcements(ctx)
	case args[0] == "nodes" && len(args) == 1:
		err = run.Nodes(ctx)
	case args[0] == "explain":
		explain := flag.NewFlagSet("explain", flag.ExitOnError)
		namespace := explain.String("n", "default", "Namespace of the Service (or give namespace/name).")
		_ = explain.Parse(args[1:])
		if explain.NArg() != 1 {
			flag.Usage()
			os.Exit(2)
		}
		ns, name, ok := strings.Cut(explain.Arg(0), "/")
		if !ok {
			ns, name = *namespace, explain.Arg(0)
		}
		err = run.Explain(ctx, ns, name)
	default:
		flag.Usage()
		os.Exit(2)
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "porticoctl:", err)
	os.Exit(1)
}
