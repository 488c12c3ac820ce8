package lab

import (
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
)

// MAC is the node's Ethernet address on the segment.
func (node *Node) MAC() (string, error) {
	var mac string
	err := In(node.NS, func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err == nil {
			mac = ifi.HardwareAddr.String()
		}
		return err
	})
	return mac, err
}

// Resolve asks for a from the client namespace tries times, with arping (IPv4) or ndisc6
// (IPv6), as a router on the segment would, and returns the MAC address of every answer.
func (n *Network) Resolve(a netip.Addr, tries int) []string {
	cmd := []string{"arping", "-c", fmt.Sprint(tries), "-i", "eth0", a.String()}
	if a.Is6() {
		cmd = []string{"ndisc6", "-m", "-n", "-r", fmt.Sprint(tries), "-w", "500", a.String(), "eth0"}
	}
	out, _ := exec.Command("ip", append([]string{"netns", "exec", n.Client}, cmd...)...).CombinedOutput()
	var macs []string
	for _, line := range strings.Split(string(out), "\n") {
		// arping: "60 bytes from 02:..:.. (192.0.2.33): index=0 ..."; ndisc6: "Target link-layer address: 02:..".
		if f := strings.Fields(line); len(f) >= 4 && f[1] == "bytes" && f[2] == "from" {
			macs = append(macs, strings.ToLower(f[3]))
		}
		if _, mac, ok := strings.Cut(line, "Target link-layer address: "); ok {
			macs = append(macs, strings.ToLower(strings.TrimSpace(mac)))
		}
	}
	return macs
}

// Neighbour is the client kernel's neighbour entry for a: its MAC, "" when none.
func (n *Network) Neighbour(a netip.Addr) (string, error) {
	out, err := exec.Command("ip", "netns", "exec", n.Client, "ip", "neigh", "show", a.String(), "dev", "eth0").Output()
	if err != nil {
		return "", fmt.Errorf("ip neigh: %w", err)
	}
	if f := strings.Fields(string(out)); len(f) >= 3 && f[1] == "lladdr" {
		return f[2], nil
	}
	return "", nil
}
