// Package members tells an agent which other agents are alive, from heartbeats they send each
// other directly over UDP: fast enough for sub-second failover, and independent of the API
// server. Each heartbeat also carries the addresses its sender announces, so that two agents
// that disagree about an address find out within one interval, and the pools it has no
// interface for, so that its peers do not choose it for those. With a key, heartbeats are
// authenticated, and each proves it is fresh by echoing the receiver's own latest stamp.
// See docs/l2.md.
package members

import (
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"maps"
	"math"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// Config sets up one agent's membership.
type Config struct {
	// Self is this node's name, as its peers know it.
	Self string
	// Addr is the address to listen on (zero: every address); Port is every agent's port.
	Addr netip.Addr
	Port uint16
	// Interval is how often heartbeats go out; DeadAfter is how long a peer may stay silent.
	Interval, DeadAfter time.Duration
	// Key, when set, authenticates heartbeats (HMAC-SHA256): every agent needs the same one.
	// Without it heartbeats are neither signed nor checked.
	Key []byte
	// Next is a key heartbeats may also be signed with, while the cluster moves from one
	// key to another (docs/l2.md).
	Next []byte
	// Rejected, when set, is told of each heartbeat from a peer's address refused, and why:
	// "unauthenticated" (no signature), "forged" (a wrong one) or "stale" (a replay).
	Rejected func(peer, reason string)
}

// Members sends this agent's heartbeats and follows its peers'. Run it once.
type Members struct {
	cfg     Config
	conn    *net.UDPConn
	changed chan struct{}

	mu      sync.Mutex
	peers   map[string]*peer
	ready   bool
	self    Peer
	started time.Time
	stamp   uint64        // of the last heartbeat sent: unix nanoseconds, always increasing
	first   uint64        // of the first one this process sent
	hold    time.Duration // what the last heartbeat asks of peers when Run ends; 0: leaving
}

// Peer is what an agent's heartbeats say besides its name and readiness.
type Peer struct {
	// Claims are the addresses it announces.
	Claims []netip.Addr
	// NoInterface are the pools it has no interface for: it cannot announce their addresses.
	NoInterface []string
}

func (p Peer) equal(q Peer) bool {
	return slices.Equal(p.Claims, q.Claims) && slices.Equal(p.NoInterface, q.NoInterface)
}

type peer struct {
	addrs []netip.Addr
	seen  time.Time // the last heartbeat; zero: none yet, or it said it is leaving
	// heldUntil keeps a peer that said it is restarting alive, with what it said then,
	// until its next instance is ready or the hold it asked for ends.
	heldUntil time.Time
	ready     bool
	stamp     uint64 // of its last heartbeat taken, when authenticated; ours echo it
	Peer
}

// New binds the heartbeat socket.
func New(cfg Config) (*Members, error) {
	if cfg.Self == "" || cfg.Interval <= 0 || cfg.DeadAfter <= cfg.Interval {
		return nil, fmt.Errorf("members: need a name, and an interval shorter than the dead time")
	}
	conn, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(cfg.Addr, cfg.Port)))
	if err != nil {
		return nil, fmt.Errorf("listen for heartbeats: %w", err)
	}
	return &Members{cfg: cfg, conn: conn, changed: make(chan struct{}, 1), peers: map[string]*peer{}}, nil
}

// SetPeers sets the other agents by node name, with the addresses they heartbeat from and
// to (the first is where ours go). A peer kept keeps what was heard from it.
func (m *Members) SetPeers(peers map[string][]netip.Addr) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for name, addrs := range peers {
		if name == m.cfg.Self || len(addrs) == 0 {
			continue
		}
		if p := m.peers[name]; p != nil {
			p.addrs = addrs
		} else {
			m.peers[name] = &peer{addrs: addrs}
		}
	}
	for name := range m.peers {
		if _, ok := peers[name]; !ok {
			delete(m.peers, name)
		}
	}
}

// SetSelf sets what the next heartbeats say: whether this agent may announce, what it
// announces and which pools it cannot. A change goes out at once.
func (m *Members) SetSelf(ready bool, self Peer) {
	self = Peer{Claims: slices.Clone(self.Claims), NoInterface: slices.Clone(self.NoInterface)}
	m.mu.Lock()
	changed := ready != m.ready || !self.equal(m.self)
	m.ready, m.self = ready, self
	m.mu.Unlock()
	if changed {
		m.send(false)
	}
}

// Live returns the peers that are alive and ready, with what they last said.
func (m *Members) Live() map[string]Peer {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := time.Now()
	out := map[string]Peer{}
	for name, p := range m.peers {
		if m.alive(p, now) {
			out[name] = p.Peer
		}
	}
	return out
}

// WarmedUp says whether this agent has listened long enough to have heard every live peer.
func (m *Members) WarmedUp() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.started.IsZero() && time.Since(m.started) >= m.cfg.DeadAfter
}

// Changed is poked when the live peers or their claims change, and when the warm-up ends.
func (m *Members) Changed() <-chan struct{} { return m.changed }

func (m *Members) alive(p *peer, now time.Time) bool {
	return now.Before(p.heldUntil) || p.ready && !p.seen.IsZero() && now.Sub(p.seen) < m.cfg.DeadAfter
}

// RestartOnStop makes the heartbeat sent when Run ends say that this agent restarts
// (a rolling update): its peers keep it alive, with the addresses it announces, for hold
// or until its next instance is ready, so that the addresses do not move. Zero: it says
// it is leaving, and they take over at once.
func (m *Members) RestartOnStop(hold time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.hold = hold
}

func (m *Members) poke() {
	select {
	case m.changed <- struct{}{}:
	default:
	}
}

// Run heartbeats until ctx ends, then tells the peers it is leaving and closes the socket.
func (m *Members) Run(ctx context.Context) error {
	m.mu.Lock()
	m.started = time.Now()
	m.mu.Unlock()
	done := make(chan error, 1)
	go func() { done <- m.receive() }()
	beat := time.NewTicker(m.cfg.Interval)
	defer beat.Stop()
	// Expiry is checked four times per interval, so a silent peer is dead within a quarter
	// interval of DeadAfter.
	check := time.NewTicker(m.cfg.Interval / 4)
	defer check.Stop()
	warm := time.After(m.cfg.DeadAfter)
	live := map[string]Peer{}
	m.send(false)
	for {
		select {
		case <-ctx.Done():
			m.send(true)
			_ = m.conn.Close()
			<-done
			return nil
		case err := <-done:
			return fmt.Errorf("receive heartbeats: %w", cmp.Or(err, net.ErrClosed))
		case <-beat.C:
			m.send(false)
		case <-warm:
			m.poke()
		case <-check.C:
			if now := m.Live(); !maps.EqualFunc(now, live, Peer.equal) {
				live = now
				m.poke()
			}
		}
	}
}

// send sends a heartbeat to every peer; last says it is this process's last: leaving, or
// restarting when RestartOnStop asked for it.
func (m *Members) send(last bool) {
	type datagram struct {
		to  netip.Addr
		msg []byte
	}
	m.mu.Lock()
	hb := heartbeat{name: m.cfg.Self, ready: m.ready && !last, leaving: last, signed: m.cfg.Key != nil, Peer: m.self}
	if last && m.hold > 0 && m.ready {
		// Only an agent that served asks its peers to keep it: one that never became
		// ready has nothing to hold.
		hb.ready, hb.leaving, hb.hold = true, false, m.hold
	}
	msg := encode(hb)
	m.stamp = max(m.stamp+1, uint64(time.Now().UnixNano()))
	if m.first == 0 {
		m.first = m.stamp
	}
	out := make([]datagram, 0, len(m.peers))
	for name, p := range m.peers {
		d := datagram{p.addrs[0], msg}
		if m.cfg.Key != nil {
			d.msg = sign(m.cfg.Key, msg, m.stamp, p.stamp, name)
		}
		out = append(out, d)
	}
	m.mu.Unlock()
	for _, d := range out {
		// A peer that cannot be reached now is not an error: it is what heartbeats are for.
		_, _ = m.conn.WriteToUDPAddrPort(d.msg, netip.AddrPortFrom(d.to, m.cfg.Port))
	}
}

func (m *Members) receive() error {
	buf := make([]byte, 65536)
	for {
		n, from, err := m.conn.ReadFromUDPAddrPort(buf)
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			return err
		}
		m.heard(buf[:n], from.Addr().Unmap())
	}
}

// heard records a heartbeat, if it comes from an address of the peer it names and, with a
// key, is authentic and fresh.
func (m *Members) heard(b []byte, from netip.Addr) {
	hb, err := decode(b) // a signature follows the fields: ignored there
	if err != nil {
		return
	}
	m.mu.Lock()
	p := m.peers[hb.name]
	if p == nil || !slices.Contains(p.addrs, from) {
		m.mu.Unlock()
		return
	}
	if m.cfg.Key != nil {
		why := "unauthenticated"
		if hb.signed {
			why = m.check(b, p)
		}
		if why != "" {
			m.mu.Unlock()
			if m.cfg.Rejected != nil && why != "early" {
				m.cfg.Rejected(hb.name, why)
			}
			return
		}
	}
	now := time.Now()
	was := m.alive(p, now)
	before := p.Peer
	switch {
	case hb.leaving:
		p.seen, p.ready, p.heldUntil = time.Time{}, false, time.Time{}
	case !hb.ready && now.Before(p.heldUntil):
		// Its next instance, starting: the hold keeps what the last one said.
		p.seen = now
	default:
		p.seen, p.ready, p.Peer, p.heldUntil = now, hb.ready, hb.Peer, time.Time{}
		if hb.hold > 0 && hb.ready {
			p.heldUntil = now.Add(hb.hold)
		}
	}
	news := was != m.alive(p, now) || !before.equal(p.Peer)
	m.mu.Unlock()
	if news {
		m.poke()
	}
}

// With a key, a heartbeat ends with its sender's stamp, the stamp of the last heartbeat the
// sender took from its receiver (the echo), and an HMAC-SHA256 of all that and the
// receiver's name. The receiver takes it when the signature is right, the stamp is later
// than the sender's last, and the echo is one of the receiver's own stamps from the last
// two DeadAfters: a recorded heartbeat replayed later fails (its echo is old), without any
// clock shared between nodes; one sent to another peer fails (another name was signed).
const trailer = 8 + 8 + sha256.Size

func sign(key, msg []byte, stamp, echo uint64, to string) []byte {
	b := make([]byte, 0, len(msg)+trailer)
	b = append(b, msg...)
	b = binary.BigEndian.AppendUint64(b, stamp)
	b = binary.BigEndian.AppendUint64(b, echo)
	return mac(key, b, to).Sum(b)
}

func mac(key, signed []byte, to string) hash.Hash {
	h := hmac.New(sha256.New, key)
	h.Write(signed)
	h.Write([]byte(to))
	return h
}

// check says why heartbeat b from p is refused ("" takes it). An authentic one's stamp is
// recorded even when it is refused, for ours to echo: two agents that start together
// each need the other's stamp first. "early" is one whose sender has not heard this
// process yet, nothing wrong. Callers hold mu.
func (m *Members) check(b []byte, p *peer) string {
	if len(b) < len(magic)+trailer {
		return "forged"
	}
	signed, sum := b[:len(b)-sha256.Size], b[len(b)-sha256.Size:]
	if !hmac.Equal(mac(m.cfg.Key, signed, m.cfg.Self).Sum(nil), sum) &&
		(m.cfg.Next == nil || !hmac.Equal(mac(m.cfg.Next, signed, m.cfg.Self).Sum(nil), sum)) {
		return "forged"
	}
	stamp := binary.BigEndian.Uint64(signed[len(signed)-16:])
	echo := binary.BigEndian.Uint64(signed[len(signed)-8:])
	if stamp <= p.stamp {
		return "stale"
	}
	p.stamp = stamp
	switch {
	case echo < m.first:
		return "early"
	case echo > m.stamp || time.Duration(m.stamp-echo) > 2*m.cfg.DeadAfter:
		return "stale"
	}
	return ""
}

// The heartbeat on the wire: "PL2", version 1, flags, the name's length and the name, the
// number of claims (2 bytes) and each claim as 16 bytes (IPv4 mapped), then the number of
// pools without an interface (1 byte) and each pool's name, length first; with the flag
// "restarting", the hold it asks for (milliseconds, 4 bytes); with the flag "signed", the
// signature (trailer) ends the datagram. Bytes after what a reader knows are
// ignored: fields are only ever appended (before the signature), so that agents of two
// versions understand each other during a rolling update.
const (
	magic       = "PL2\x01"
	flagReady   = 1
	flagLeaving = 2
	flagSigned  = 4 // a signature ends the datagram
	// flagRestarting: the sender stops to start again (a rolling update); keep it alive
	// for the hold that follows the pools. Agents that predate it see a last heartbeat.
	flagRestarting = 8
	// MaxClaims keeps a heartbeat within one UDP datagram (with up to 255 pools of 253
	// bytes at most).
	MaxClaims = 4000
	maxPools  = 255
)

type heartbeat struct {
	name                   string
	ready, leaving, signed bool
	hold                   time.Duration // restarting: how long to keep the sender alive
	Peer
}

func encode(hb heartbeat) []byte {
	claims := hb.Claims[:min(len(hb.Claims), MaxClaims)]
	pools := hb.NoInterface[:min(len(hb.NoInterface), maxPools)]
	b := make([]byte, 0, len(magic)+2+len(hb.name)+2+16*len(claims)+1+256*len(pools))
	b = append(b, magic...)
	var flags byte
	if hb.ready {
		flags |= flagReady
	}
	if hb.leaving {
		flags |= flagLeaving
	}
	if hb.signed {
		flags |= flagSigned
	}
	if hb.hold > 0 {
		flags |= flagRestarting
	}
	b = append(b, flags, byte(len(hb.name)))
	b = append(b, hb.name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(claims)))
	for _, c := range claims {
		a := c.As16()
		b = append(b, a[:]...)
	}
	b = append(b, byte(len(pools)))
	for _, p := range pools {
		p = p[:min(len(p), 255)]
		b = append(b, byte(len(p)))
		b = append(b, p...)
	}
	if hb.hold > 0 {
		b = binary.BigEndian.AppendUint32(b, uint32(min(hb.hold.Milliseconds(), math.MaxUint32)))
	}
	return b
}

var errMalformed = errors.New("malformed heartbeat")

func decode(b []byte) (heartbeat, error) {
	if len(b) < len(magic)+2 || string(b[:len(magic)]) != magic {
		return heartbeat{}, errMalformed
	}
	b = b[len(magic):]
	flags, n := b[0], int(b[1])
	b = b[2:]
	if len(b) < n+2 {
		return heartbeat{}, errMalformed
	}
	hb := heartbeat{name: string(b[:n]), ready: flags&flagReady != 0, leaving: flags&flagLeaving != 0, signed: flags&flagSigned != 0}
	b = b[n:]
	count := int(binary.BigEndian.Uint16(b))
	b = b[2:]
	if len(b) < 16*count {
		return heartbeat{}, errMalformed
	}
	for i := range count {
		hb.Claims = append(hb.Claims, netip.AddrFrom16([16]byte(b[16*i:16*i+16])).Unmap())
	}
	b = b[16*count:]
	if len(b) == 0 {
		return hb, nil // from an agent that does not send pools
	}
	pools := int(b[0])
	b = b[1:]
	for range pools {
		if len(b) == 0 || len(b) < 1+int(b[0]) {
			return heartbeat{}, errMalformed
		}
		hb.NoInterface = append(hb.NoInterface, string(b[1:1+int(b[0])]))
		b = b[1+int(b[0]):]
	}
	if flags&flagRestarting != 0 {
		if len(b) < 4 {
			return heartbeat{}, errMalformed
		}
		hb.hold = time.Duration(binary.BigEndian.Uint32(b)) * time.Millisecond
	}
	return hb, nil
}
