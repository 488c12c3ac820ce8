// Package wait polls for a condition in tests: the one way tests wait for something the API
// server, an agent or the network will get to.
package wait

import (
	"testing"
	"time"
)

// Timeout is how long For waits: long enough for a loaded CI machine, short enough that a
// broken test fails in reasonable time.
const Timeout = 30 * time.Second

// For calls check every 50 ms until it returns nil, and fails t with what and check's last
// error when it has not within Timeout.
func For(t testing.TB, what string, check func() error) {
	t.Helper()
	Within(t, Timeout, what, check)
}

// Within is For with another time limit, for what has a bound of its own to wait out.
func Within(t testing.TB, limit time.Duration, what string, check func() error) {
	t.Helper()
	var err error
	for deadline := time.Now().Add(limit); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if err = check(); err == nil {
			return
		}
	}
	if what == "" {
		t.Fatal(err)
	}
	t.Fatalf("%s: %v", what, err)
}
