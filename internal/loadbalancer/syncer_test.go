package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/portico-dev/portico/internal/datapath"
)

// recorder is a Programmer that writes down each call and keeps what it was told last of
// each address (any scope); fail makes the next Update fail.
type recorder struct {
	mu    sync.Mutex
	calls []string
	fail  bool
	last  map[netip.AddrPort]datapath.Frontend
}

func (r *recorder) Apply(fs []datapath.Frontend) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var names []string
	r.last = map[netip.AddrPort]datapath.Frontend{}
	for _, f := range fs {
		names = append(names, describe(f))
		r.last[f.Address] = f
	}
	slices.Sort(names)
	r.calls = append(r.calls, "apply "+strings.Join(names, " "))
	return nil
}

func (r *recorder) Update(f datapath.Frontend) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail {
		r.fail = false
		return errors.New("map full")
	}
	r.calls = append(r.calls, "update "+describe(f))
	if r.last == nil {
		r.last = map[netip.AddrPort]datapath.Frontend{}
	}
	r.last[f.Address] = f
	return nil
}

func (r *recorder) Delete(addr netip.AddrPort, proto datapath.Protocol, scope datapath.Scope) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, fmt.Sprintf("delete %s", addr))
	delete(r.last, addr)
	return nil
}

// take returns the calls since the last take, sorted (Set's order among slots is free).
func (r *recorder) take() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := slices.Clone(r.calls)
	r.calls = nil
	slices.Sort(c)
	return strings.Join(c, "; ")
}

// frontend returns what the recorder was last told of an address.
func (r *recorder) frontend(addr netip.AddrPort) (datapath.Frontend, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f, ok := r.last[addr]
	return f, ok
}

func describe(f datapath.Frontend) string {
	var bs []string
	for _, b := range f.Backends {
		bs = append(bs, b.Address.String())
	}
	return fmt.Sprintf("%s->%s", f.Address, strings.Join(bs, ","))
}

func frontend(addr string, backends ...string) datapath.Frontend {
	f := datapath.Frontend{Address: netip.MustParseAddrPort(addr), Protocol: datapath.TCP, Scope: datapath.Internal}
	for _, b := range backends {
		f.Backends = append(f.Backends, datapath.Backend{Address: netip.MustParseAddrPort(b)})
	}
	return f
}

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func claim(name string, age int, fs ...datapath.Frontend) Claim {
	return Claim{Service: types.NamespacedName{Namespace: "default", Name: name}, Created: t0.Add(time.Duration(age) * time.Hour), Frontends: fs}
}

func TestSetChangesOnlyWhatChanged(t *testing.T) {
	r := &recorder{}
	s := NewSyncer(r)
	steps := []struct {
		claim Claim
		want  string
	}{
		{claim("web", 0, frontend("10.96.0.1:80", "10.244.0.1:8080"), frontend("10.96.0.1:443", "10.244.0.1:8443")),
			"update 10.96.0.1:443->10.244.0.1:8443; update 10.96.0.1:80->10.244.0.1:8080"},
		{claim("web", 0, frontend("10.96.0.1:80", "10.244.0.1:8080"), frontend("10.96.0.1:443", "10.244.0.1:8443")), ""},
		{claim("web", 0, frontend("10.96.0.1:80", "10.244.0.1:8080", "10.244.0.2:8080"), frontend("10.96.0.1:443", "10.244.0.1:8443")),
			"update 10.96.0.1:80->10.244.0.1:8080,10.244.0.2:8080"},
		{claim("web", 0, frontend("10.96.0.1:80", "10.244.0.1:8080", "10.244.0.2:8080")), "delete 10.96.0.1:443"},
		{claim("web", 0), "delete 10.96.0.1:80"},
	}
	for i, step := range steps {
		lost, affected, err := s.Set(step.claim)
		if err != nil || len(lost) > 0 || len(affected) > 0 {
			t.Fatalf("step %d: lost %v affected %v err %v", i, lost, affected, err)
		}
		if got := r.take(); got != step.want {
			t.Errorf("step %d: calls %q, want %q", i, got, step.want)
		}
		if svcs, fs := s.Counts(); i == 0 && (svcs != 1 || fs != 2) {
			t.Errorf("after the first step: %d Services, %d frontends programmed; want 1, 2", svcs, fs)
		}
	}
	if svcs, fs := s.Counts(); svcs != 0 || fs != 0 {
		t.Errorf("after deleting everything: %d Services, %d frontends programmed", svcs, fs)
	}
}

func TestOlderServiceKeepsASharedAddress(t *testing.T) {
	r := &recorder{}
	s := NewSyncer(r)
	young := claim("young", 2, frontend("192.0.2.1:80", "10.244.0.2:80"))
	old := claim("old", 1, frontend("192.0.2.1:80", "10.244.0.1:80"))

	if lost, _, _ := s.Set(young); len(lost) > 0 {
		t.Fatalf("first claim lost %v", lost)
	}
	r.take()
	// The older Service arrives: it takes the address, and the younger one is told.
	lost, affected, err := s.Set(old)
	if err != nil || len(lost) > 0 || !slices.Equal(affected, []types.NamespacedName{young.Service}) {
		t.Fatalf("older claim: lost %v affected %v err %v", lost, affected, err)
	}
	if got := r.take(); got != "update 192.0.2.1:80->10.244.0.1:80" {
		t.Errorf("calls %q", got)
	}
	// The younger Service, synced again, learns it lost; nothing changes.
	lost, _, _ = s.Set(young)
	if want := []string{"192.0.2.1:80/TCP is default/old's (older)"}; !slices.Equal(lost, want) {
		t.Errorf("younger claim lost %v, want %v", lost, want)
	}
	if got := r.take(); got != "" {
		t.Errorf("calls %q, want none", got)
	}
	// The older one goes: the younger gets the address.
	_, affected, _ = s.Set(claim("old", 1))
	if !slices.Equal(affected, []types.NamespacedName{young.Service}) {
		t.Errorf("affected %v", affected)
	}
	if got := r.take(); got != "update 192.0.2.1:80->10.244.0.2:80" {
		t.Errorf("calls %q", got)
	}
}

func TestResyncAppliesTheWinners(t *testing.T) {
	r := &recorder{}
	s := NewSyncer(r)
	err := s.Resync([]Claim{
		claim("b", 1, frontend("192.0.2.1:80", "10.244.0.2:80"), frontend("10.96.0.2:80", "10.244.0.2:80")),
		claim("a", 1, frontend("192.0.2.1:80", "10.244.0.1:80")), // same age: the name decides
	})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := r.take(), "apply 10.96.0.2:80->10.244.0.2:80 192.0.2.1:80->10.244.0.1:80"; got != want {
		t.Errorf("calls %q, want %q", got, want)
	}
	// What Resync programmed is known: the same claims again change nothing.
	if _, _, err := s.Set(claim("a", 1, frontend("192.0.2.1:80", "10.244.0.1:80"))); err != nil || r.take() != "" {
		t.Errorf("re-set after resync: err %v, calls %q", err, r.calls)
	}
}

func TestFailedUpdateIsRetried(t *testing.T) {
	r := &recorder{fail: true}
	s := NewSyncer(r)
	c := claim("web", 0, frontend("10.96.0.1:80", "10.244.0.1:8080"))
	if _, _, err := s.Set(c); err == nil || !strings.Contains(err.Error(), "map full") {
		t.Fatalf("err %v, want the datapath's", err)
	}
	if _, _, err := s.Set(c); err != nil {
		t.Fatal(err)
	}
	if got := r.take(); got != "update 10.96.0.1:80->10.244.0.1:8080" {
		t.Errorf("calls %q: the failed frontend should be written on the next sync", got)
	}
}
