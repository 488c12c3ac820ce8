package lab

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// A node's pod bridge keeps its address while pods come and go: it is the pods' gateway,
// and a bridge that took its ports' lowest address would leave the pods' neighbour entries
// pointing at an old one (their traffic off the node lost for seconds).
func TestPodGatewayKeepsItsAddress(t *testing.T) {
	// nstest.NeedRoot stands on this package: the check is written out here.
	if testing.Short() || os.Geteuid() != 0 {
		t.Skip("needs root (and no -short): creates network namespaces")
	}
	n, err := New(fmt.Sprintf("gw%d", os.Getpid()), 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Close() })
	node := n.Nodes[0]
	mac := func() string {
		t.Helper()
		out, err := exec.Command("ip", "netns", "exec", node.NS, "cat", "/sys/class/net/cni0/address").Output()
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(out))
	}
	want := mac()
	var pods []*Pod
	for i := range 3 {
		p, err := node.AddPod(fmt.Sprintf("p%d", i))
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
		if got := mac(); got != want {
			t.Fatalf("the gateway's address changed from %s to %s when pod %d came", want, got, i)
		}
	}
	for i, p := range pods {
		if err := node.RemovePod(p); err != nil {
			t.Fatal(err)
		}
		if got := mac(); got != want {
			t.Fatalf("the gateway's address changed from %s to %s when pod %d left", want, got, i)
		}
	}
}
