// Package version tells which Portico this binary is: the operator rolls the agents when it
// changes, and each agent reports it in its NodeAgent.
package version

import "runtime/debug"

// version is set at build time:
// -ldflags "-X github.com/portico-dev/portico/internal/version.version=v0.1.0".
var version = ""

// Get returns the version set at build time, or else the module version Go recorded.
func Get() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		return bi.Main.Version
	}
	return "unknown"
}
