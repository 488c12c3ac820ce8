package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/portico-dev/portico/internal/loadbalancer"
)

// pkt describes a test packet: Ethernet, IPv4 or IPv6, TCP or UDP.
type pkt struct {
	src, dst  netip.AddrPort
	proto     loadbalancer.Protocol
	payload   []byte
	tcpFlags  byte   // SYN when zero
	ipOptions []byte // IPv4 options (a multiple of 4 bytes)
	hopByHop  bool   // IPv6: a hop-by-hop options header before the transport header
	fragment  bool   // a first fragment: IPv4 more-fragments, IPv6 fragment header
}

const (
	tcpSYN = 0x02
	tcpACK = 0x10
)

var (
	clientMAC = []byte{0x02, 0, 0, 0, 0, 0x01}
	nodeMAC   = []byte{0x02, 0, 0, 0, 0, 0x02}
)

func (p pkt) bytes() []byte {
	var l4 []byte
	switch p.proto {
	case loadbalancer.TCP:
		l4 = make([]byte, 20)
		binary.BigEndian.PutUint32(l4[4:], 1000) // seq
		flags := p.tcpFlags
		if flags == 0 {
			flags = tcpSYN
		}
		l4[12] = 5 << 4
		l4[13] = flags
		binary.BigEndian.PutUint16(l4[14:], 65535)
	case loadbalancer.UDP:
		l4 = make([]byte, 8)
		binary.BigEndian.PutUint16(l4[4:], uint16(8+len(p.payload)))
	}
	binary.BigEndian.PutUint16(l4[0:], p.src.Port())
	binary.BigEndian.PutUint16(l4[2:], p.dst.Port())
	l4 = append(l4, p.payload...)
	csumOff := 16
	if p.proto == loadbalancer.UDP {
		csumOff = 6
	}
	sum := ^checksum(l4, pseudo(p.src.Addr(), p.dst.Addr(), uint8(p.proto), len(l4)))
	if sum == 0 && p.proto == loadbalancer.UDP {
		sum = 0xffff
	}
	binary.BigEndian.PutUint16(l4[csumOff:], sum)

	eth := append(append(append([]byte{}, nodeMAC...), clientMAC...), 0, 0)
	if p.src.Addr().Is4() {
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
		ihl := 20 + len(p.ipOptions)
		ip := make([]byte, ihl)
		ip[0] = 0x40 | byte(ihl/4)
		binary.BigEndian.PutUint16(ip[2:], uint16(ihl+len(l4)))
		if p.fragment {
			binary.BigEndian.PutUint16(ip[6:], 0x2000)
		}
		ip[8] = 64
		ip[9] = uint8(p.proto)
		s, d := p.src.Addr().As4(), p.dst.Addr().As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		copy(ip[20:], p.ipOptions)
		binary.BigEndian.PutUint16(ip[10:], ^checksum(ip, 0))
		return append(append(eth, ip...), l4...)
	}
	binary.BigEndian.PutUint16(eth[12:], 0x86dd)
	var ext []byte
	next := uint8(p.proto)
	if p.fragment {
		ext = append([]byte{next, 0, 0, 1, 0, 0, 0, 7}, ext...) // offset 0, more fragments
		next = 44
	}
	if p.hopByHop {
		ext = append([]byte{next, 0, 1, 4, 0, 0, 0, 0}, ext...) // PadN
		next = 0
	}
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(l4)))
	ip[6] = next
	ip[7] = 64
	s, d := p.src.Addr().As16(), p.dst.Addr().As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return append(append(append(eth, ip...), ext...), l4...)
}

func pseudo(src, dst netip.Addr, proto uint8, length int) uint32 {
	var b []byte
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		b = append(append(b, s[:]...), d[:]...)
		b = append(b, 0, proto, byte(length>>8), byte(length))
	} else {
		s, d := src.As16(), dst.As16()
		b = append(append(b, s[:]...), d[:]...)
		b = append(b, 0, 0, byte(length>>8), byte(length), 0, 0, 0, proto)
	}
	return uint32(checksum(b, 0))
}

// checksum is the Internet checksum's folded one's-complement sum (not yet inverted).
func checksum(b []byte, initial uint32) uint16 {
	sum := initial
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

// decoded is what a packet says, after its checksums were verified.
type decoded struct {
	src, dst netip.AddrPort
	proto    uint8
	dstMAC   net.HardwareAddr
	icmpType uint8
	icmpCode uint8
	quoted   *decoded // the packet an ICMP error quotes (addresses and ports only)
	payload  []byte
}

// decode parses a packet and checks every checksum in it.
func decode(b []byte) (decoded, error) {
	if len(b) < 14 {
		return decoded{}, errors.New("short Ethernet header")
	}
	d, err := decodeIP(b[14:], true)
	d.dstMAC = b[0:6]
	return d, err
}

func decodeIP(b []byte, verify bool) (decoded, error) {
	var d decoded
	var l4 []byte
	var src, dst netip.Addr
	switch {
	case len(b) >= 20 && b[0]>>4 == 4:
		ihl := int(b[0]&0xf) * 4
		total := int(binary.BigEndian.Uint16(b[2:]))
		if ihl < 20 || ihl > len(b) || (verify && (checksum(b[:ihl], 0) != 0xffff || total > len(b) || total < ihl)) {
			return d, fmt.Errorf("bad IPv4 header (checksum or length)")
		}
		src, dst = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
		d.proto = b[9]
		l4 = b[ihl:max(ihl, min(total, len(b)))]
	case len(b) >= 40 && b[0]>>4 == 6:
		src, dst = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
		d.proto = b[6]
		l4 = b[40:min(40+int(binary.BigEndian.Uint16(b[4:])), len(b))]
		for d.proto == 0 || d.proto == 60 || d.proto == 43 {
			if len(l4) < 2 || (int(l4[1])+1)*8 > len(l4) {
				return d, errors.New("truncated IPv6 extension header")
			}
			d.proto, l4 = l4[0], l4[(int(l4[1])+1)*8:]
		}
	default:
		return d, errors.New("not an IP packet")
	}
	minLen := map[uint8]int{6: 20, 17: 8, 1: 8, 58: 8}[d.proto]
	if !verify {
		minLen = 4 // a quoted packet: ports at least
	}
	if minLen == 0 || len(l4) < minLen {
		return d, fmt.Errorf("protocol %d with %d bytes", d.proto, len(l4))
	}
	if verify {
		sum := checksum(l4, 0)
		if d.proto != 1 {
			sum = checksum(l4, pseudo(src, dst, d.proto, len(l4)))
		}
		if sum != 0xffff && !(d.proto == 17 && src.Is4() && binary.BigEndian.Uint16(l4[6:]) == 0) {
			return d, fmt.Errorf("bad %d checksum %#x", d.proto, sum)
		}
	}
	switch d.proto {
	case 6, 17:
		d.src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:]))
		d.dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:]))
		hlen := 8
		if d.proto == 6 && len(l4) > 12 {
			hlen = int(l4[12]>>4) * 4
		}
		if len(l4) >= hlen {
			d.payload = l4[hlen:]
		}
	case 1, 58:
		d.src, d.dst = netip.AddrPortFrom(src, 0), netip.AddrPortFrom(dst, 0)
		d.icmpType, d.icmpCode = l4[0], l4[1]
		if len(l4) < 8 {
			return d, errors.New("truncated ICMP header")
		}
		inner, err := decodeIP(l4[8:], false)
		if err != nil {
			return d, fmt.Errorf("ICMP quotes no packet: %w", err)
		}
		d.quoted = &inner
	}
	return d, nil
}

// BenchmarkPacketLayer measures the packet programs per packet with BPF_PROG_TEST_RUN: a
// packet of an established flow (conntrack hit, DNAT, FIB lookup, redirect) and a packet for
// the node itself that no frontend matches (the cost every other packet pays), with 1 and
// 10,000 frontends programmed. Run it with -benchtime 1x; it prints a table.
func BenchmarkPacketLayer(b *testing.B) {
	n := newNode(b)
	const repeat = 200000
	perPacket := func(in []byte) time.Duration {
		var took time.Duration
		var err error
		n.exec(func() {
			opts := ebpf.RunOptions{Data: in, Repeat: repeat, Context: skbContext{IngressIfindex: n.ext, Ifindex: n.ext}}
			t0 := time.Now()
			_, err = n.d.np.PorticoNodeportIngress.Run(&opts)
			took = time.Since(t0)
		})
		if err != nil {
			b.Fatal(err)
		}
		return took / repeat
	}
	client := netip.MustParseAddrPort("198.51.100.7:40000")
	backend := local(netip.MustParseAddrPort("10.244.1.10:8080"))
	fmt.Printf("\nper packet at TC ingress, %d runs each (BPF_PROG_TEST_RUN, one CPU)\n", repeat)
	fmt.Printf("%-9s %-34s %10s\n", "services", "packet", "time")
	for _, count := range []int{1, 10000} {
		for i := range count {
			addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, byte(i >> 8), byte(i)}), 80)
			if err := n.d.Update(external(addr, loadbalancer.TCP, backend)); err != nil {
				b.Fatal(err)
			}
		}
		flow := pkt{src: client, dst: netip.MustParseAddrPort("203.0.0.0:80"), proto: loadbalancer.TCP, tcpFlags: tcpACK}.bytes()
		other := pkt{src: client, dst: netip.MustParseAddrPort("192.0.2.1:22"), proto: loadbalancer.TCP, tcpFlags: tcpACK}.bytes()
		// The backend's reply confirms the flow: it is in the table of established flows.
		n.run(b, n.d.np.PorticoNodeportIngress, flow)
		n.run(b, n.d.np.PorticoNodeportEgress, pkt{src: backend.Address, dst: client, proto: loadbalancer.TCP, tcpFlags: tcpACK}.bytes())
		fmt.Printf("%-9d %-34s %10s\n", count, "established flow (DNAT, redirect)", perPacket(flow))
		fmt.Printf("%-9d %-34s %10s\n", count, "no frontend (passed on)", perPacket(other))
	}
	fmt.Println()
}
