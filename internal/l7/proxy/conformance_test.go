package proxy_test

import (
	"encoding/xml"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/portico-dev/portico/internal/l7/proxy"
)

// Where the proxy departs from h2spec on purpose (docs/l7.md, HTTP/2 conformance): a
// client's HEADERS on a stream that is closed, or on one it skipped, is answered with
// RST_STREAM (a stream error), not a connection error. A trailer may cross the proxy's own
// reset of its stream (a timeout, a rejected request), and that must not cost the client
// its other streams.
var h2specDepartures = map[string]bool{
	"http2/5.1/closed: Sends a HEADERS frame":                                       true,
	"http2/5.1.1/Sends stream identifier that is numerically smaller than previous": true,
}

// TestH2Spec runs h2spec, the HTTP/2 conformance suite (145 cases: framing, streams, flow
// control, settings, HPACK, messages), against a listener of the proxy in front of a Go
// HTTP/2 server; every case passes but the two departures above. `make test` installs h2spec
// and says where (H2SPEC).
func TestH2Spec(t *testing.T) {
	bin := os.Getenv("H2SPEC")
	if bin == "" {
		t.Skip("needs h2spec: run `make test` (or set H2SPEC to its path)")
	}
	// The backend answers once the request ended, and 50 ms later: the cases that send a
	// frame the stream no longer takes (DATA after END_STREAM, a second header block) want
	// it refused while the stream is still open; had the answer closed the stream first,
	// the frame would be one on a closed stream, which the proxy ignores.
	backend := h2cBackend(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		time.Sleep(50 * time.Millisecond)
		fmt.Fprint(w, "hello")
	})
	_, addr, _ := serve(t, proxy.Config{Protocol: proxy.HTTP2, Algorithm: proxy.RoundRobin, Backends: []netip.AddrPort{backend}})
	report := filepath.Join(t.TempDir(), "h2spec.xml")
	out, err := exec.Command(bin, "-h", addr.Addr().String(), "-p", strconv.Itoa(int(addr.Port())), "-o", "3", "-j", report).CombinedOutput()
	if _, ok := err.(*exec.ExitError); err != nil && !ok { // it exits 1 when a case fails
		t.Fatalf("h2spec: %v\n%s", err, out)
	}
	data, err := os.ReadFile(report)
	if err != nil {
		t.Fatalf("h2spec wrote no report: %v\n%s", err, out)
	}
	var r struct {
		Suites []struct {
			Package string `xml:"package,attr"`
			Cases   []struct {
				Name    string  `xml:"classname,attr"`
				Error   *string `xml:"error"`
				Failure *string `xml:"failure"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	if err := xml.Unmarshal(data, &r); err != nil {
		t.Fatal(err)
	}
	cases, passed := 0, 0
	for _, s := range r.Suites {
		for _, c := range s.Cases {
			cases++
			name := s.Package + "/" + c.Name
			switch {
			case c.Error == nil && c.Failure == nil:
				passed++
				if h2specDepartures[name] {
					t.Logf("passes now, though listed as a departure: %s", name)
				}
			case !h2specDepartures[name]:
				why := c.Error
				if why == nil {
					why = c.Failure
				}
				t.Errorf("%s: expected\n%s", name, *why)
			}
		}
	}
	if cases < 140 {
		t.Fatalf("h2spec ran %d cases; want its 145\n%s", cases, out)
	}
	t.Logf("h2spec: %d of %d cases pass", passed, cases)
}
