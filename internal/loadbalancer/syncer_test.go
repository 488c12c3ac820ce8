package loadbalancer_test

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/portico-dev/portico/internal/loadbalancer"
	"github.com/portico-dev/portico/internal/loadbalancer/lbtest"
)

func frontend(addr string, backends ...string) loadbalancer.Frontend {
	f := loadbalancer.Frontend{Address: netip.MustParseAddrPort(addr), Protocol: loadbalancer.TCP, Scope: loadbalancer.Internal}
	for _, b := range backends {
		f.Backends = append(f.Backends, loadbalancer.Backend{Address: netip.MustParseAddrPort(b)})
	}
	return f
}

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func claim(name string, age int, fs ...loadbalancer.Frontend) loadbalancer.Claim {
	return loadbalancer.Claim{Service: types.NamespacedName{Namespace: "default", Name: name}, Created: t0.Add(time.Duration(age) * time.Hour), Frontends: fs}
}

func TestSetChangesOnlyWhatChanged(t *testing.T) {
	r := &lbtest.Recorder{}
	s := loadbalancer.NewSyncer(r)
	steps := []struct {
		claim loadbalancer.Claim
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
		if got := r.Take(); got != step.want {
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
	r := &lbtest.Recorder{}
	s := loadbalancer.NewSyncer(r)
	young := claim("young", 2, frontend("192.0.2.1:80", "10.244.0.2:80"))
	old := claim("old", 1, frontend("192.0.2.1:80", "10.244.0.1:80"))

	if lost, _, _ := s.Set(young); len(lost) > 0 {
		t.Fatalf("first claim lost %v", lost)
	}
	r.Take()
	// The older Service arrives: it takes the address, and the younger one is told.
	lost, affected, err := s.Set(old)
	if err != nil || len(lost) > 0 || !slices.Equal(affected, []types.NamespacedName{young.Service}) {
		t.Fatalf("older claim: lost %v affected %v err %v", lost, affected, err)
	}
	if got := r.Take(); got != "update 192.0.2.1:80->10.244.0.1:80" {
		t.Errorf("calls %q", got)
	}
	// The younger Service, synced again, learns it lost; nothing changes.
	lost, _, _ = s.Set(young)
	if want := []string{"192.0.2.1:80/TCP is default/old's (older)"}; !slices.Equal(lost, want) {
		t.Errorf("younger claim lost %v, want %v", lost, want)
	}
	if got := r.Take(); got != "" {
		t.Errorf("calls %q, want none", got)
	}
	// The older one goes: the younger gets the address.
	_, affected, _ = s.Set(claim("old", 1))
	if !slices.Equal(affected, []types.NamespacedName{young.Service}) {
		t.Errorf("affected %v", affected)
	}
	if got := r.Take(); got != "update 192.0.2.1:80->10.244.0.2:80" {
		t.Errorf("calls %q", got)
	}
}

func TestResyncAppliesTheWinners(t *testing.T) {
	r := &lbtest.Recorder{}
	s := loadbalancer.NewSyncer(r)
	incomplete, err := s.Resync([]loadbalancer.Claim{
		claim("b", 1, frontend("192.0.2.1:80", "10.244.0.2:80"), frontend("10.96.0.2:80", "10.244.0.2:80")),
		claim("a", 1, frontend("192.0.2.1:80", "10.244.0.1:80")), // same age: the name decides
	})
	if err != nil || len(incomplete) != 0 {
		t.Fatalf("Resync: %v, incomplete %v", err, incomplete)
	}
	if got, want := r.Take(), "apply 10.96.0.2:80->10.244.0.2:80 192.0.2.1:80->10.244.0.1:80"; got != want {
		t.Errorf("calls %q, want %q", got, want)
	}
	// What Resync programmed is known: the same claims again change nothing.
	if _, _, err := s.Set(claim("a", 1, frontend("192.0.2.1:80", "10.244.0.1:80"))); err != nil || r.Take() != "" {
		t.Errorf("re-set after resync: err %v, or it programmed something", err)
	}
}

// When the datapath cannot hold every frontend, Resync programs the oldest Services' first,
// whatever the order of the claims, and returns the others; they wait, and the change that
// frees room names them to be set again, which programs them.
func TestResyncLeavesOutTheYoungestWhenFull(t *testing.T) {
	r := &lbtest.Recorder{Room: 2}
	s := loadbalancer.NewSyncer(r)
	old := claim("old", 1, frontend("10.96.0.1:80", "10.244.0.1:80"), frontend("192.0.2.1:80", "10.244.0.1:80"))
	young := claim("young", 2, frontend("10.96.0.2:80", "10.244.0.2:80"))
	incomplete, err := s.Resync([]loadbalancer.Claim{young, old})
	if err != nil || len(incomplete) != 1 || incomplete[0].Name != "young" {
		t.Fatalf("Resync: %v, incomplete %v; want young left out", err, incomplete)
	}
	if got, want := r.Take(), "apply 10.96.0.1:80->10.244.0.1:80 192.0.2.1:80->10.244.0.1:80"; got != want {
		t.Fatalf("calls %q, want %q", got, want)
	}
	if services, frontends := s.Counts(); services != 1 || frontends != 2 {
		t.Fatalf("counts %d Services, %d frontends; want only old's", services, frontends)
	}
	if _, _, err := s.Set(young); !errors.Is(err, loadbalancer.ErrFull) || s.Waiting() != 1 {
		t.Fatalf("young into full maps: %v, %d waiting; want ErrFull and young waiting", err, s.Waiting())
	}
	_, affected, err := s.Set(claim("old", 1))
	if err != nil || !slices.Equal(affected, []types.NamespacedName{young.Service}) {
		t.Fatalf("old gone: %v, affected %v; want young to be set again", err, affected)
	}
	if _, _, err := s.Set(young); err != nil || s.Waiting() != 0 {
		t.Fatalf("young once old is gone: %v, %d waiting", err, s.Waiting())
	}
	if got, want := r.Take(), "delete 10.96.0.1:80; delete 192.0.2.1:80; update 10.96.0.2:80->10.244.0.2:80"; got != want {
		t.Fatalf("calls %q, want %q", got, want)
	}
}

func TestFailedUpdateIsRetried(t *testing.T) {
	r := &lbtest.Recorder{FailNext: true}
	s := loadbalancer.NewSyncer(r)
	c := claim("web", 0, frontend("10.96.0.1:80", "10.244.0.1:8080"))
	if _, _, err := s.Set(c); err == nil || !strings.Contains(err.Error(), "map full") {
		t.Fatalf("err %v, want the datapath's", err)
	}
	if _, _, err := s.Set(c); err != nil {
		t.Fatal(err)
	}
	if got := r.Take(); got != "update 10.96.0.1:80->10.244.0.1:8080" {
		t.Errorf("calls %q: the failed frontend should be written on the next sync", got)
	}
}
