// Package notice keeps the agents from repeating themselves: a problem is told (an Event, a
// log line) once when it appears or changes, not at every sync that finds it again.
package notice

import "sync"

// Last is the last message told about each key. The zero value is ready; it is safe for
// concurrent use.
type Last[K comparable] struct {
	mu sync.Mutex
	m  map[K]string
}

// Changed records msg as the last word on k ("": nothing to tell, k is forgotten) and says
// whether it differs from the one before: whether to tell it.
func (l *Last[K]) Changed(k K, msg string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m[k] == msg {
		return false
	}
	if msg == "" {
		delete(l.m, k)
		return true
	}
	if l.m == nil {
		l.m = map[K]string{}
	}
	l.m[k] = msg
	return true
}

// Keep forgets every key for which keep is false: problems that went away, so that they are
// told again if they come back.
func (l *Last[K]) Keep(keep func(K) bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k := range l.m {
		if !keep(k) {
			delete(l.m, k)
		}
	}
}
