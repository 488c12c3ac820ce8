package lab

import (
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// In runs f on a thread inside network namespace ns; sockets f opens stay in ns. The thread
// is discarded afterwards, so no other code runs in ns by accident.
func In(ns string, f func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		h, err := os.Open("/run/netns/" + ns)
		if err != nil {
			done <- fmt.Errorf("open namespace: %w", err)
			return
		}
		err = unix.Setns(int(h.Fd()), unix.CLONE_NEWNET)
		h.Close()
		if err != nil {
			done <- fmt.Errorf("enter namespace %s: %w", ns, err)
			return
		}
		done <- f()
	}()
	return <-done
}

// Forward listens on listen inside namespace ns and copies each connection to and from a
// connection to target, dialled from the caller's namespace: processes in ns reach the API
// server on the root namespace's loopback this way. stop closes the listener and every
// connection.
func Forward(ns, listen, target string) (stop func(), err error) {
	var ln net.Listener
	if err := In(ns, func() (err error) { ln, err = net.Listen("tcp", listen); return err }); err != nil {
		return nil, fmt.Errorf("forward in %s: %w", ns, err)
	}
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	track := func(c net.Conn, add bool) {
		mu.Lock()
		defer mu.Unlock()
		if add {
			conns[c] = struct{}{}
		} else {
			delete(conns, c)
		}
	}
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				out, err := net.Dial("tcp", target)
				if err != nil {
					in.Close()
					return
				}
				track(in, true)
				track(out, true)
				go func() { _, _ = io.Copy(out, in); out.Close() }()
				_, _ = io.Copy(in, out)
				in.Close()
				track(in, false)
				track(out, false)
			}()
		}
	}()
	return func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for c := range conns {
			c.Close()
		}
	}, nil
}
