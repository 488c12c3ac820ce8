package allocator

import (
	"errors"
	"fmt"
)

// canShare says why two Services may not share an address (nil: they may).
func canShare(x, y Sharing) error {
	switch {
	case x.Key == "" || y.Key == "":
		return errors.New("sharing needs the same sharing key on both Services")
	case x.Key != y.Key:
		return fmt.Errorf("sharing keys differ (%q and %q)", x.Key, y.Key)
	case (x.Local || y.Local) && x.Backends != y.Backends:
		return errors.New("Services with externalTrafficPolicy Local share an address only with the same pod selector")
	}
	for _, p := range x.Ports {
		for _, q := range y.Ports {
			if p == q {
				return fmt.Errorf("both expose port %s", p)
			}
		}
	}
	return nil
}
