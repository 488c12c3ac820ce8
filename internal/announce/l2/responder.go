// Package l2 answers ARP requests and NDP neighbour solicitations for the addresses a node
// announces, one responder per interface, and tells the segment when it takes an address
// over (gratuitous ARP, unsolicited neighbour advertisement). See docs/l2.md.
package l2

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"github.com/mdlayher/ndp"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// responder answers for its addresses on one interface. Its ARP side needs an IPv4 address
// on the interface and its NDP side a link-local address; an interface without one answers
// only in the other family.
type responder struct {
	ifi *net.Interface
	arp *arp.Client
	ndp *ndp.Conn
	// na sends neighbour advertisements from the announced address itself, as the kernel does
	// for its own addresses (tools such as ndisc6 ignore link-local answers for a global
	// target). It may: it is bound with IPV6_FREEBIND.
	na      *ipv6.PacketConn
	metrics *Metrics
	wg      sync.WaitGroup

	mu     sync.Mutex
	ips    map[netip.Addr]bool
	groups map[netip.Addr]int // solicited-node groups joined, by the addresses that need them
}

func listen(ifi *net.Interface, m *Metrics) (*responder, error) {
	r := &responder{ifi: ifi, metrics: m, ips: map[netip.Addr]bool{}, groups: map[netip.Addr]int{}}
	if len(ifi.HardwareAddr) != 6 {
		return nil, fmt.Errorf("interface %s has no Ethernet address", ifi.Name)
	}
	var errs []error
	if c, err := arp.Dial(ifi); err == nil {
		r.arp = c
	} else {
		errs = append(errs, fmt.Errorf("ARP: %w", err))
	}
	if c, _, err := ndp.Listen(ifi, ndp.LinkLocal); err == nil {
		var f ipv6.ICMPFilter
		f.SetAll(true)
		f.Accept(ipv6.ICMPTypeNeighborSolicitation)
		na, err := advertiser()
		if err == nil {
			err = c.SetICMPFilter(&f)
		}
		if err != nil {
			_ = c.Close()
			errs = append(errs, fmt.Errorf("NDP: %w", err))
		} else {
			r.ndp, r.na = c, na
		}
	} else {
		errs = append(errs, fmt.Errorf("NDP: %w", err))
	}
	if r.arp == nil && r.ndp == nil {
		return nil, fmt.Errorf("listen on %s: %w", ifi.Name, errors.Join(errs...))
	}
	if r.arp != nil {
		r.wg.Add(1)
		go r.answerARP()
	}
	if r.ndp != nil {
		r.wg.Add(1)
		go r.answerNDP()
	}
	return r, nil
}

// close stops answering at once and waits for the readers.
func (r *responder) close() {
	r.mu.Lock()
	r.ips = map[netip.Addr]bool{}
	r.mu.Unlock()
	if r.arp != nil {
		_ = r.arp.Close()
	}
	if r.ndp != nil {
		_ = r.ndp.Close()
		_ = r.na.Close()
	}
	r.wg.Wait()
}

// set makes the responder answer for ips and nothing else; addresses it did not answer for
// before are announced. Addresses of a family the interface cannot answer in are skipped.
func (r *responder) set(ips []netip.Addr) error {
	r.mu.Lock()
	want := map[netip.Addr]bool{}
	var added []netip.Addr
	var errs []error
	for _, ip := range ips {
		if (ip.Is4() && r.arp == nil) || (ip.Is6() && r.ndp == nil) {
			continue
		}
		want[ip] = true
		if r.ips[ip] {
			continue
		}
		if ip.Is6() {
			if err := r.join(ip); err != nil {
				errs = append(errs, err)
				delete(want, ip)
				continue
			}
		}
		added = append(added, ip)
	}
	for ip := range r.ips {
		if !want[ip] && ip.Is6() {
			errs = append(errs, r.leave(ip))
		}
	}
	r.ips = want
	r.mu.Unlock()
	for _, ip := range added {
		errs = append(errs, r.gratuitous(ip))
	}
	return errors.Join(errs...)
}

func (r *responder) owns(ip netip.Addr) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ips[ip]
}

// join and leave count the addresses behind each solicited-node group: addresses that
// share their last 24 bits share the group. Called with mu held.
func (r *responder) join(ip netip.Addr) error {
	g, err := ndp.SolicitedNodeMulticast(ip)
	if err != nil {
		return err
	}
	if r.groups[g] == 0 {
		if err := r.ndp.JoinGroup(g); err != nil {
			return fmt.Errorf("join %s on %s: %w", g, r.ifi.Name, err)
		}
	}
	r.groups[g]++
	return nil
}

func (r *responder) leave(ip netip.Addr) error {
	g, err := ndp.SolicitedNodeMulticast(ip)
	if err != nil {
		return err
	}
	if r.groups[g]--; r.groups[g] > 0 {
		return nil
	}
	delete(r.groups, g)
	if err := r.ndp.LeaveGroup(g); err != nil {
		return fmt.Errorf("leave %s on %s: %w", g, r.ifi.Name, err)
	}
	return nil
}

// gratuitous tells the segment that ip is here now: ARP as both a request and a reply (hosts
// differ in which they heed), or an unsolicited NA with Override to all nodes.
func (r *responder) gratuitous(ip netip.Addr) error {
	mac := r.ifi.HardwareAddr
	if ip.Is4() {
		for _, p := range []*arp.Packet{
			{Operation: arp.OperationRequest, TargetHardwareAddr: ethernet.Broadcast},
			{Operation: arp.OperationReply, TargetHardwareAddr: mac},
		} {
			pkt, err := arp.NewPacket(p.Operation, mac, ip, p.TargetHardwareAddr, ip)
			if err != nil {
				return err
			}
			if err := r.arp.WriteTo(pkt, ethernet.Broadcast); err != nil {
				return fmt.Errorf("gratuitous ARP for %s on %s: %w", ip, r.ifi.Name, err)
			}
			r.metrics.gratuitous.WithLabelValues(r.ifi.Name, "arp").Inc()
		}
		return nil
	}
	if err := r.advertise(ip, false, netip.IPv6LinkLocalAllNodes()); err != nil {
		return fmt.Errorf("unsolicited NA for %s on %s: %w", ip, r.ifi.Name, err)
	}
	r.metrics.gratuitous.WithLabelValues(r.ifi.Name, "ndp").Inc()
	return nil
}

func (r *responder) answerARP() {
	defer r.wg.Done()
	mac := r.ifi.HardwareAddr
	requests, replies := r.metrics.requests.WithLabelValues(r.ifi.Name, "arp"), r.metrics.replies.WithLabelValues(r.ifi.Name, "arp")
	for {
		p, _, err := r.arp.Read()
		if err != nil {
			return // closed; other read errors on a packet socket mean the interface went
		}
		// Our own frames come back on the packet socket; gratuitous ARP from others asks
		// nothing.
		if p.Operation != arp.OperationRequest || slices.Equal(p.SenderHardwareAddr, mac) || p.SenderIP == p.TargetIP {
			continue
		}
		requests.Inc()
		if !r.owns(p.TargetIP) {
			continue
		}
		if r.arp.Reply(p, mac, p.TargetIP) == nil {
			replies.Inc()
		}
	}
}

func (r *responder) answerNDP() {
	defer r.wg.Done()
	requests, replies := r.metrics.requests.WithLabelValues(r.ifi.Name, "ndp"), r.metrics.replies.WithLabelValues(r.ifi.Name, "ndp")
	for {
		m, _, from, err := r.ndp.ReadFrom()
		if err != nil {
			return
		}
		ns, ok := m.(*ndp.NeighborSolicitation)
		if !ok {
			continue
		}
		requests.Inc()
		if !r.owns(ns.TargetAddress) {
			continue
		}
		solicited, to := true, from
		if from.IsUnspecified() {
			// Duplicate address detection: the answer goes to all nodes, unsolicited.
			solicited, to = false, netip.IPv6LinkLocalAllNodes()
		}
		if r.advertise(ns.TargetAddress, solicited, to) == nil {
			replies.Inc()
		}
	}
}

// advertise sends a neighbour advertisement for ip, from ip, with Override.
func (r *responder) advertise(ip netip.Addr, solicited bool, to netip.Addr) error {
	b, err := ndp.MarshalMessage(&ndp.NeighborAdvertisement{Solicited: solicited, Override: true, TargetAddress: ip,
		Options: []ndp.Option{&ndp.LinkLayerAddress{Direction: ndp.Target, Addr: r.ifi.HardwareAddr}}})
	if err != nil {
		return err
	}
	cm := &ipv6.ControlMessage{HopLimit: ndp.HopLimit, Src: ip.AsSlice(), IfIndex: r.ifi.Index}
	_, err = r.na.WriteTo(b, cm, &net.IPAddr{IP: to.AsSlice(), Zone: r.ifi.Name})
	return err
}

// advertiser opens the raw ICMPv6 socket advertisements go out on: it may send from addresses
// the node does not hold (IPV6_FREEBIND), has the kernel fill in the checksum, and reads
// nothing.
func advertiser() (*ipv6.PacketConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_FREEBIND, 1) })
		return cmp.Or(err, serr)
	}}
	c, err := lc.ListenPacket(context.Background(), "ip6:ipv6-icmp", "::")
	if err != nil {
		return nil, fmt.Errorf("open the advertisement socket: %w", err)
	}
	pc := ipv6.NewPacketConn(c)
	var none ipv6.ICMPFilter
	none.SetAll(true)
	for _, err := range []error{pc.SetHopLimit(ndp.HopLimit), pc.SetMulticastHopLimit(ndp.HopLimit), pc.SetChecksum(true, 2), pc.SetICMPFilter(&none)} {
		if err != nil {
			_ = c.Close()
			return nil, fmt.Errorf("set up the advertisement socket: %w", err)
		}
	}
	return pc, nil
}
