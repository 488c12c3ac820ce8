package members

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"
)

func TestHeartbeatRoundTrip(t *testing.T) {
	for _, hb := range []heartbeat{
		{name: "node-1", ready: true, Peer: Peer{Claims: []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")},
			NoInterface: []string{"storage", "dmz"}}},
		{name: "n", leaving: true},
		{name: "r", ready: true, hold: 12345 * time.Millisecond, Peer: Peer{Claims: []netip.Addr{netip.MustParseAddr("192.0.2.1")}}},
	} {
		got, err := decode(encode(hb))
		if err != nil || got.name != hb.name || got.ready != hb.ready || got.leaving != hb.leaving || got.hold != hb.hold || !got.equal(hb.Peer) {
			t.Fatalf("decode(encode(%+v)) = %+v, %v", hb, got, err)
		}
	}
	for _, bad := range [][]byte{nil, []byte("PL2\x02\x01\x01a\x00\x00"), []byte("PL2\x01\x01\x09a\x00\x00"), []byte("PL2\x01\x01\x01a\x00\x01abc"),
		[]byte("PL2\x01\x01\x01a\x00\x00\x02\x01x"), []byte("PL2\x01\x01\x01a\x00\x00\x01\x05abc")} {
		if _, err := decode(bad); err == nil {
			t.Fatalf("decode(%q) accepted a malformed heartbeat", bad)
		}
	}
	// A heartbeat of an older agent (no pools) and of a newer one (fields appended) are read.
	older := []byte("PL2\x01\x01\x01a\x00\x00")
	newer := append(encode(heartbeat{name: "a", ready: true, Peer: Peer{NoInterface: []string{"p"}}}), "a field of later"...)
	if hb, err := decode(older); err != nil || hb.name != "a" || !hb.ready || hb.NoInterface != nil {
		t.Fatalf("an older agent's heartbeat: %+v, %v", hb, err)
	}
	if hb, err := decode(newer); err != nil || !slices.Equal(hb.NoInterface, []string{"p"}) {
		t.Fatalf("a newer agent's heartbeat: %+v, %v", hb, err)
	}
}

func FuzzDecode(f *testing.F) {
	f.Add(encode(heartbeat{name: "node-1", ready: true, Peer: Peer{Claims: []netip.Addr{netip.MustParseAddr("192.0.2.1")}, NoInterface: []string{"pool"}}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		hb, err := decode(b)
		if err != nil {
			return
		}
		if again, err := decode(encode(hb)); err != nil || again.name != hb.name || !again.equal(hb.Peer) {
			t.Fatalf("a decoded heartbeat does not survive encoding: %+v", hb)
		}
	})
}

type group struct {
	m      []*Members
	cancel []context.CancelFunc
	done   []chan error
	// crashed members had their socket closed under them: Run fails, as it should.
	crashed map[int]bool
	peers   map[string][]netip.Addr
	key     []byte

	mu       sync.Mutex
	rejected map[string]int // heartbeats the members refused, by reason
}

// testKey is what the groups' heartbeats are signed with, as every agent's are when the
// operator runs them.
var testKey = []byte("portico heartbeat test key, 32B!")

// startGroup runs n members on 127.0.0.1..n (all of 127/8 is local), each knowing the
// others, their heartbeats signed with key (nil: not signed).
func startGroup(t *testing.T, n int, key []byte) *group {
	t.Helper()
	g := &group{crashed: map[int]bool{}, rejected: map[string]int{}, peers: map[string][]netip.Addr{}, key: key}
	for i := range n {
		g.peers[fmt.Sprintf("node-%d", i+1)] = []netip.Addr{netip.AddrFrom4([4]byte{127, 0, 0, byte(i + 1)})}
	}
	g.m, g.cancel, g.done = make([]*Members, n), make([]context.CancelFunc, n), make([]chan error, n)
	for i := range n {
		g.start(t, i)
	}
	t.Cleanup(func() {
		for i := range g.m {
			g.stop(t, i)
		}
	})
	return g
}

// start runs member i, a new instance of it when it ran before.
func (g *group) start(t *testing.T, i int) {
	t.Helper()
	name := fmt.Sprintf("node-%d", i+1)
	m, err := New(Config{Self: name, Addr: g.peers[name][0], Port: 17947, Interval: 20 * time.Millisecond, DeadAfter: 100 * time.Millisecond,
		Key: g.key, Rejected: func(_, why string) { g.mu.Lock(); g.rejected[why]++; g.mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	m.SetPeers(g.peers)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	g.m[i], g.cancel[i], g.done[i] = m, cancel, done
}

func (g *group) stop(t *testing.T, i int) {
	if g.cancel[i] == nil {
		return
	}
	g.cancel[i]()
	if err := <-g.done[i]; err != nil && !g.crashed[i] {
		t.Errorf("node-%d: Run: %v", i+1, err)
	}
	g.cancel[i] = nil
}

// waitLive waits (bounded) until member i sees exactly want as live peers.
func (g *group) waitLive(t *testing.T, i int, want map[string][]netip.Addr) time.Duration {
	t.Helper()
	t0 := time.Now()
	for time.Since(t0) < 5*time.Second {
		if got := g.m[i].Live(); maps.EqualFunc(got, want, func(p Peer, claims []netip.Addr) bool { return slices.Equal(p.Claims, claims) }) {
			return time.Since(t0)
		}
		select {
		case <-g.m[i].Changed():
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatalf("node-%d sees %v live; want %v", i+1, g.m[i].Live(), want)
	return 0
}

func TestPeersAreLiveWhenReady(t *testing.T) {
	g := startGroup(t, 3, testKey)
	g.waitLive(t, 0, map[string][]netip.Addr{}) // nobody ready yet
	a := netip.MustParseAddr("192.0.2.7")
	g.m[1].SetSelf(true, Peer{Claims: []netip.Addr{a}, NoInterface: []string{"dmz"}})
	g.m[2].SetSelf(true, Peer{})
	g.waitLive(t, 0, map[string][]netip.Addr{"node-2": {a}, "node-3": nil})
	if got := g.m[0].Live()["node-2"].NoInterface; !slices.Equal(got, []string{"dmz"}) {
		t.Fatalf("node-2's pools without an interface, as node-1 heard them: %v", got)
	}
	g.m[1].SetSelf(true, Peer{})
	g.waitLive(t, 0, map[string][]netip.Addr{"node-2": nil, "node-3": nil})
	for t0 := time.Now(); !g.m[0].WarmedUp(); time.Sleep(10 * time.Millisecond) {
		if time.Since(t0) > 5*time.Second {
			t.Fatal("node-1 is not warmed up after hearing its peers for longer than DeadAfter")
		}
	}
}

func TestLeavingPeerGoesAtOnce(t *testing.T) {
	g := startGroup(t, 2, testKey)
	g.m[1].SetSelf(true, Peer{})
	g.waitLive(t, 0, map[string][]netip.Addr{"node-2": nil})
	g.stop(t, 1)
	// It said it is leaving: gone before it could have been timed out.
	if took := g.waitLive(t, 0, map[string][]netip.Addr{}); took >= 100*time.Millisecond {
		t.Errorf("a leaving peer was seen gone after %v; it says so, it should not wait for DeadAfter", took)
	}
}

// A peer that stops to restart (a rolling update) stays alive with what it announced while
// its next instance starts, until that one is ready; without a next instance, until the
// hold it asked for ends.
func TestRestartingPeerKeepsItsClaims(t *testing.T) {
	g := startGroup(t, 2, testKey)
	a, b := netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("192.0.2.8")
	g.m[1].SetSelf(true, Peer{Claims: []netip.Addr{a}})
	g.waitLive(t, 0, map[string][]netip.Addr{"node-2": {a}})
	g.m[1].RestartOnStop(time.Minute)
	g.stop(t, 1)
	time.Sleep(300 * time.Millisecond) // three times DeadAfter
	if got := g.m[0].Live(); !slices.Equal(got["node-2"].Claims, []netip.Addr{a}) {
		t.Fatalf("while node-2 restarts node-1 sees %v live, want node-2 with its address", got)
	}
	g.start(t, 1) // its heartbeats say "not ready" until it has synced
	time.Sleep(300 * time.Millisecond)
	if got := g.m[0].Live(); !slices.Equal(got["node-2"].Claims, []netip.Addr{a}) {
		t.Fatalf("while node-2's next instance starts node-1 sees %v live, want node-2 with its address", got)
	}
	g.m[1].SetSelf(true, Peer{Claims: []netip.Addr{b}})
	g.waitLive(t, 0, map[string][]netip.Addr{"node-2": {b}})

	g.m[1].RestartOnStop(400 * time.Millisecond)
	g.stop(t, 1)
	t0 := time.Now()
	g.waitLive(t, 0, map[string][]netip.Addr{})
	if took := time.Since(t0); took < 300*time.Millisecond {
		t.Errorf("a restarting peer that did not come back was gone after %v; it asked for 400ms", took)
	}
}

func TestSilentPeerDiesAfterDeadTime(t *testing.T) {
	g := startGroup(t, 2, testKey)
	g.m[1].SetSelf(true, Peer{})
	g.waitLive(t, 0, map[string][]netip.Addr{"node-2": nil})
	// A crash: the socket goes without a word.
	g.crashed[1] = true
	_ = g.m[1].conn.Close()
	t0 := time.Now()
	g.waitLive(t, 0, map[string][]netip.Addr{})
	if took := time.Since(t0); took < 60*time.Millisecond {
		t.Errorf("a silent peer was dead after %v; DeadAfter is 100ms, minus at most one interval", took)
	}
}

func TestHeartbeatFromAnotherAddressIsIgnored(t *testing.T) {
	g := startGroup(t, 1, nil)
	g.m[0].SetPeers(map[string][]netip.Addr{"node-2": {netip.MustParseAddr("127.0.0.2")}})
	impostor, err := New(Config{Self: "node-2", Addr: netip.MustParseAddr("127.0.0.9"), Port: 17947, Interval: 20 * time.Millisecond, DeadAfter: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	impostor.SetPeers(map[string][]netip.Addr{"node-1": {netip.MustParseAddr("127.0.0.1")}})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	impostor.SetSelf(true, Peer{})
	if err := impostor.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if live := g.m[0].Live(); len(live) != 0 {
		t.Fatalf("node-1 believes %v live from heartbeats sent from another node's address", live)
	}
}

// With a key, nothing but a peer's own fresh heartbeats keeps it alive: a dead node's
// address sending unsigned heartbeats, heartbeats signed with another key, one signed for
// another receiver, or one of its own replayed later is refused. Without a key the same
// unsigned heartbeats keep it alive, as they did before heartbeats were signed.
func TestForgedHeartbeatsAreRefused(t *testing.T) {
	for _, key := range [][]byte{testKey, nil} {
		t.Run(fmt.Sprintf("key=%t", key != nil), func(t *testing.T) {
			g := startGroup(t, 3, key)
			g.m[1].SetSelf(true, Peer{})
			g.m[2].SetSelf(true, Peer{})
			g.waitLive(t, 0, map[string][]netip.Addr{"node-2": nil, "node-3": nil})
			// A heartbeat node-3 could have sent node-1 now, to replay once it is stale.
			body := encode(heartbeat{name: "node-3", ready: true, signed: true})
			unsigned := encode(heartbeat{name: "node-3", ready: true})
			g.m[0].mu.Lock()
			recorded := sign(testKey, body, uint64(time.Now().UnixNano()), g.m[0].stamp, "node-1")
			g.m[0].mu.Unlock()
			g.crashed[2] = true
			_ = g.m[2].conn.Close()

			forger, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.3:0")))
			if err != nil {
				t.Fatal(err)
			}
			defer forger.Close()
			to := netip.MustParseAddrPort("127.0.0.1:17947")
			alive := 0
			for i := range 50 { // 500 ms: five times DeadAfter
				g.m[0].mu.Lock()
				echo := g.m[0].stamp
				g.m[0].mu.Unlock()
				stamp := uint64(time.Now().UnixNano())
				for _, msg := range [][]byte{unsigned, sign([]byte("another key, another cluster...."), body, stamp, echo, "node-1"),
					sign(testKey, body, stamp, echo, "node-2"), recorded} {
					if _, err := forger.WriteToUDPAddrPort(msg, to); err != nil {
						t.Fatal(err)
					}
				}
				time.Sleep(10 * time.Millisecond)
				if _, ok := g.m[0].Live()["node-3"]; ok && i >= 20 {
					alive++
				}
			}
			g.mu.Lock()
			defer g.mu.Unlock()
			switch {
			case key == nil && alive == 0:
				t.Fatal("without a key, unsigned heartbeats from node-3's address did not keep it alive: the forger does not reach node-1")
			case key != nil && alive > 0:
				t.Fatalf("node-3 was alive %d times in 300 ms after it died; rejected: %v", alive, g.rejected)
			case key != nil && (g.rejected["unauthenticated"] == 0 || g.rejected["forged"] == 0 || g.rejected["stale"] == 0):
				t.Fatalf("rejected %v; want some unauthenticated, forged and stale", g.rejected)
			}
			t.Logf("rejected %v", g.rejected)
		})
	}
}

// Members with different keys do not hear each other, and say why.
func TestAnotherKeyIsNotHeard(t *testing.T) {
	g := startGroup(t, 2, testKey)
	other, err := New(Config{Self: "node-3", Addr: netip.MustParseAddr("127.0.0.3"), Port: 17947, Interval: 20 * time.Millisecond,
		DeadAfter: 100 * time.Millisecond, Key: []byte("another key, another cluster....")})
	if err != nil {
		t.Fatal(err)
	}
	peers := map[string][]netip.Addr{"node-1": {netip.MustParseAddr("127.0.0.1")}, "node-2": {netip.MustParseAddr("127.0.0.2")},
		"node-3": {netip.MustParseAddr("127.0.0.3")}}
	other.SetPeers(peers)
	g.m[0].SetPeers(peers)
	g.m[1].SetSelf(true, Peer{})
	other.SetSelf(true, Peer{})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := other.Run(ctx); err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.m[0].Live()["node-3"]; ok || g.rejected["forged"] == 0 {
		t.Fatalf("node-1 sees %v live, rejected %v; want node-2 only, and node-3's heartbeats refused as forged", g.m[0].Live(), g.rejected)
	}
}

// A key changes in steps, each a rolling restart, with every pair of agents hearing each
// other at every step: first every agent accepts the new key as Next; then they sign with
// it, the old one as Next; then the old one goes.
func TestKeyRotationKeepsPeersHeard(t *testing.T) {
	old, next := testKey, []byte("the next heartbeat key, 32 bytes")
	for _, step := range []struct {
		name     string
		a, b     Config // a has rolled to the step, b not yet
		hearEach bool
	}{
		{"accept the new key", Config{Key: old, Next: next}, Config{Key: old}, true},
		{"sign with the new key", Config{Key: next, Next: old}, Config{Key: old, Next: next}, true},
		{"forget the old key", Config{Key: next}, Config{Key: next, Next: old}, true},
		{"a skipped step", Config{Key: next}, Config{Key: old}, false},
	} {
		t.Run(step.name, func(t *testing.T) {
			peers := map[string][]netip.Addr{"node-1": {netip.MustParseAddr("127.0.0.1")}, "node-2": {netip.MustParseAddr("127.0.0.2")}}
			var ms []*Members
			for i, c := range []Config{step.a, step.b} {
				name := fmt.Sprintf("node-%d", i+1)
				c.Self, c.Addr, c.Port, c.Interval, c.DeadAfter = name, peers[name][0], 17947, 20*time.Millisecond, 100*time.Millisecond
				m, err := New(c)
				if err != nil {
					t.Fatal(err)
				}
				m.SetPeers(peers)
				m.SetSelf(true, Peer{})
				ms = append(ms, m)
			}
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			for _, m := range ms {
				wg.Add(1)
				go func() { defer wg.Done(); _ = m.Run(ctx) }()
			}
			// Heard within a few intervals when they may be; given 300 ms when not.
			var oneHearsTwo, twoHearsOne bool
			for t0 := time.Now(); time.Since(t0) < 3*time.Second; time.Sleep(10 * time.Millisecond) {
				_, oneHearsTwo = ms[0].Live()["node-2"]
				_, twoHearsOne = ms[1].Live()["node-1"]
				if oneHearsTwo && twoHearsOne || !step.hearEach && time.Since(t0) > 300*time.Millisecond {
					break
				}
			}
			cancel()
			wg.Wait()
			if oneHearsTwo != step.hearEach || twoHearsOne != step.hearEach {
				t.Fatalf("node-1 hears node-2: %t, node-2 hears node-1: %t; want %t both", oneHearsTwo, twoHearsOne, step.hearEach)
			}
		})
	}
}

// An agent that stops before it was ever ready leaves at once, whatever hold it was given:
// it served nothing its peers should keep for it.
func TestNeverReadyPeerIsNotHeld(t *testing.T) {
	g := startGroup(t, 2, testKey)
	g.m[0].SetSelf(true, Peer{})
	g.waitLive(t, 1, map[string][]netip.Addr{"node-1": nil})
	g.m[1].RestartOnStop(time.Minute)
	g.stop(t, 1)
	time.Sleep(300 * time.Millisecond) // three times DeadAfter
	if got := g.m[0].Live(); len(got) != 0 {
		t.Fatalf("node-1 sees %v live after node-2, never ready, stopped", got)
	}
}
