package cli

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// UninstallNode removes what Portico's agent leaves on a node when it stops without
// uninstalling (a node the DaemonSet no longer selects, an agent stopped by hand): its pins
// under pinDir, <bpffs>/portico/<node>. They are the maps and the links that attach its
// programs to the node's interfaces and cgroup; with the last reference to a link gone,
// the kernel detaches its program. A running agent holds them in force: agentUp says
// whether one answers, and then nothing is removed.
func UninstallNode(w io.Writer, pinDir string, agentUp bool) error {
	if agentUp {
		return errors.New("the node's agent is running: stop it first (take the node out of the DaemonSet's nodeSelector), or delete the DaemonSet to remove Portico from every node")
	}
	entries, err := os.ReadDir(pinDir)
	if errors.Is(err, fs.ErrNotExist) {
		fmt.Fprintf(w, "%s: nothing of Portico's on this node\n", pinDir)
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "portico_") && !strings.HasPrefix(e.Name(), "link_") {
			return fmt.Errorf("%s holds %s, which is not Portico's: not removing anything", pinDir, e.Name())
		}
	}
	if err := os.RemoveAll(pinDir); err != nil {
		return fmt.Errorf("remove %s: %w", pinDir, err)
	}
	// The parent, <bpffs>/portico, goes too when no other node's pins are in it (a lab).
	_ = os.Remove(filepath.Dir(pinDir))
	fmt.Fprintf(w, "removed %d pins from %s: Portico's programs are detached from this node\n", len(entries), pinDir)
	return nil
}
