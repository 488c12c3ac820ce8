// Command demo shows Portico's control plane at work on a real API server: it starts etcd,
// kube-apiserver and the operator, applies config/samples and a few Services that show the
// interesting cases, and prints what a user would look at. With -keep it stays up for kubectl
// until Ctrl-C. The full lab with nodes and traffic is `make lab` once it exists.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap/zapcore"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	lbv1 "github.com/portico-dev/portico/apis/lb/v1alpha1"
	"github.com/portico-dev/portico/internal/controller/servicelb"
	"github.com/portico-dev/portico/internal/operator"
	"github.com/portico-dev/portico/test/testenv"
)

func main() {
	keep := flag.Bool("keep", false, "Stay up after the demo, for kubectl, until Ctrl-C.")
	flag.Parse()
	if err := run(*keep); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(keep bool) error {
	ctrl.SetLogger(zap.New(zap.Level(zapcore.ErrorLevel)))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	step("Starting etcd and kube-apiserver")
	env, err := testenv.Start()
	if err != nil {
		return err
	}
	defer func() { _ = env.Stop() }()
	dir, err := os.MkdirTemp("", "portico-demo-")
	if err != nil {
		return fmt.Errorf("make temporary directory: %w", err)
	}
	defer os.RemoveAll(dir)
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := env.WriteKubeconfig(kubeconfig); err != nil {
		return err
	}

	step("Starting the operator (it serves Services with no loadBalancerClass too)")
	mgr, err := operator.NewManager(env.Config, operator.Options{MetricsAddr: "0", ProbeAddr: "0", Workers: 4,
		Class: servicelb.Class{Name: lbv1.LoadBalancerClass, ClaimClassless: true}})
	if err != nil {
		return err
	}
	mgrCtx, stopMgr := context.WithCancel(ctx)
	defer stopMgr()
	go func() { _ = mgr.Start(mgrCtx) }()

	step("Applying config/samples: an LBPool, a ServicePolicy, an L7Policy and the web Service")
	if err := applySamples(ctx, env.Client); err != nil {
		return err
	}
	step("Adding Services: the gRPC greeter, two sharing one address, a requested address, two mistakes")
	for _, s := range extraServices() {
		if err := env.Client.Create(ctx, s); err != nil {
			return fmt.Errorf("create Service %s: %w", s.Name, err)
		}
	}
	if err := waitAllocated(ctx, env.Client, "web", "greeter", "dns-tcp", "dns-udp", "pinned"); err != nil {
		return err
	}
	time.Sleep(1500 * time.Millisecond) // pool counts follow Service changes within a second

	if err := show(ctx, env.Client, kubeconfig); err != nil {
		return err
	}
	if !keep {
		fmt.Println("Run `make demo DEMO_ARGS=-keep` to keep it up and use kubectl against it.")
		return nil
	}
	fmt.Printf("\nThe API server stays up. In another shell:\n  export KUBECONFIG=%s\n  kubectl get lbpools,svc,servicepolicies,l7policies -A\nCtrl-C stops everything.\n", kubeconfig)
	<-ctx.Done()
	return nil
}

func step(s string) { fmt.Printf("==> %s\n", s) }

func applySamples(ctx context.Context, c client.Client) error {
	samples, err := testenv.Samples()
	if err != nil {
		return err
	}
	for _, obj := range samples {
		if err := c.Create(ctx, obj); err != nil {
			return fmt.Errorf("apply %s %s: %w", obj.GetObjectKind().GroupVersionKind().Kind, obj.GetName(), err)
		}
	}
	return nil
}

func extraServices() []*corev1.Service {
	svc := func(name string, port int32, proto corev1.Protocol, ann map[string]string) *corev1.Service {
		return &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, Annotations: ann},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, Selector: map[string]string{"app": "dns"},
				Ports: []corev1.ServicePort{{Name: "dns", Port: port, Protocol: proto, TargetPort: intstr.FromInt32(5353)}}},
		}
	}
	greeter := svc("greeter", 9000, corev1.ProtocolTCP, nil)
	greeter.Spec.Ports[0].Name = "grpc"
	return []*corev1.Service{
		greeter,
		svc("dns-tcp", 53, corev1.ProtocolTCP, map[string]string{lbv1.AnnotationSharingKey: "dns"}),
		svc("dns-udp", 53, corev1.ProtocolUDP, map[string]string{lbv1.AnnotationSharingKey: "dns"}),
		svc("pinned", 443, corev1.ProtocolTCP, map[string]string{lbv1.AnnotationIPs: "192.0.2.110"}),
		svc("outside", 443, corev1.ProtocolTCP, map[string]string{lbv1.AnnotationIPs: "198.51.100.7"}),
		svc("typo", 443, corev1.ProtocolTCP, map[string]string{lbv1.AnnotationIPs: "192.0.2.1100"}),
	}
}

func waitAllocated(ctx context.Context, c client.Client, names ...string) error {
	deadline := time.Now().Add(30 * time.Second)
	for _, name := range names {
		for {
			var s corev1.Service
			if err := c.Get(ctx, client.ObjectKey{Namespace: "default", Name: name}, &s); err == nil && len(s.Status.LoadBalancer.Ingress) > 0 {
				break
			}
			if time.Now().After(deadline) {
				return errors.New("Services did not get addresses within 30 s")
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return nil
}

func show(ctx context.Context, c client.Client, kubeconfig string) error {
	var svcs corev1.ServiceList
	if err := c.List(ctx, &svcs, client.InNamespace("default")); err != nil {
		return fmt.Errorf("list Services: %w", err)
	}
	fmt.Printf("\n%-10s %-32s %s\n", "SERVICE", "ADDRESSES", "PORTICO SAYS")
	for _, s := range svcs.Items {
		cond := meta.FindStatusCondition(s.Status.Conditions, lbv1.ServiceConditionIPAllocated)
		if cond == nil {
			continue
		}
		var ips []string
		for _, in := range s.Status.LoadBalancer.Ingress {
			ips = append(ips, in.IP)
		}
		fmt.Printf("%-10s %-32s %s: %s\n", s.Name, strings.Join(ips, ","), cond.Reason, cond.Message)
	}
	if _, err := exec.LookPath("kubectl"); err != nil {
		return nil
	}
	fmt.Println()
	for _, args := range [][]string{{"get", "lbpools", "-o", "wide"}, {"get", "servicepolicies,l7policies", "-A"}, {"get", "events", "-n", "default", "--field-selector", "type=Warning"}} {
		fmt.Printf("$ kubectl %s\n", strings.Join(args, " "))
		cmd := exec.CommandContext(ctx, "kubectl", append([]string{"--kubeconfig", kubeconfig}, args...)...)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("kubectl %s: %w", args[0], err)
		}
		fmt.Println()
	}
	return nil
}
