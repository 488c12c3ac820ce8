package speaker

import (
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
)

// A refused peer is logged once a minute per reason, not ten times a second.
func TestRefusedHeartbeatsAreLoggedOncePerMinute(t *testing.T) {
	var lines []string
	r := &refusals{log: funcr.New(func(_, args string) { lines = append(lines, args) }, funcr.Options{}), last: map[[2]string]time.Time{}}
	for range 10 {
		r.tell("node-2", "forged")
	}
	r.tell("node-2", "stale")
	r.tell("node-3", "forged")
	if len(lines) != 3 || !strings.Contains(lines[0], `"peer"="node-2"`) || !strings.Contains(lines[0], `"reason"="forged"`) {
		t.Fatalf("logged %q; want one line per peer and reason", lines)
	}
}
