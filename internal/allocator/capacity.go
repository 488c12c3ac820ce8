package allocator

import (
	"math/big"
	"net/netip"

	"go4.org/netipx"
)

// Capacity counts the usable addresses of each family in a set: all of them, less the IPv4
// addresses ending in .0 and .255 when avoidBuggy is set. IPv6 counts can exceed 64 bits.
func Capacity(set *netipx.IPSet, avoidBuggy bool) (v4, v6 *big.Int) {
	v4, v6 = new(big.Int), new(big.Int)
	if set == nil {
		return v4, v6
	}
	for _, r := range set.Ranges() {
		n := new(big.Int).Sub(addrInt(r.To()), addrInt(r.From()))
		n.Add(n, big.NewInt(1))
		if r.From().Is4() {
			if avoidBuggy {
				n.Sub(n, big.NewInt(int64(buggyBelow(r.To())-buggyBelow(r.From().Prev()))))
			}
			v4.Add(v4, n)
		} else {
			v6.Add(v6, n)
		}
	}
	return v4, v6
}

// buggyBelow counts the IPv4 addresses in [0.0.0.0, a] that end in .0 or .255; an invalid a
// (the Prev of 0.0.0.0) counts nothing.
func buggyBelow(a netip.Addr) int {
	if !a.IsValid() {
		return 0
	}
	b := a.As4()
	n := int(b[0])<<24 | int(b[1])<<16 | int(b[2])<<8 | int(b[3])
	return n/256 + 1 + (n+1)/256
}

// isBuggy reports whether an address is an IPv4 address ending in .0 or .255.
func isBuggy(a netip.Addr) bool {
	if !a.Is4() {
		return false
	}
	last := a.As4()[3]
	return last == 0 || last == 255
}

func addrInt(a netip.Addr) *big.Int {
	b := a.AsSlice()
	return new(big.Int).SetBytes(b)
}

// saturate turns a count into a uint64, capped at the largest uint64.
func saturate(n *big.Int) uint64 {
	if n.IsUint64() {
		return n.Uint64()
	}
	return ^uint64(0)
}
