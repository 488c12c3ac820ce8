package proxy

import (
	"io"
	"net"
	"syscall"
	"time"
	"unsafe"
)

// writeStall is how long a write may wait for a peer that reads nothing.
const writeStall = 30 * time.Second

// sockIO reads and writes a connection's socket with system calls that Go's scheduler is not
// told may block. They do not: the socket is non-blocking, and the call returns EAGAIN
// instead, upon which the scheduler's poller waits for it as for any read or write. Told
// that a call may block (syscall.Syscall, which net.Conn's Read and Write use), the
// scheduler wakes its monitor thread, which polls every 20 µs from then on and hands the
// proxy's one P to another thread when a call lasts longer than that; a loopback write,
// which delivers the segment to the reader in the same call, often does. With one stream
// that cost more CPU per request than all HTTP/2 work (docs/l7.md, "Latency").
type sockIO struct {
	nc  net.Conn
	raw syscall.RawConn // nil for a connection without a socket: plain Read and Write
}

func newSockIO(nc net.Conn) *sockIO {
	s := &sockIO{nc: nc}
	if sc, ok := nc.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			s.raw = raw
		}
	}
	return s
}

// Read reads what the socket has, waiting until it has something.
func (s *sockIO) Read(p []byte) (int, error) {
	if s.raw == nil || len(p) == 0 {
		return s.nc.Read(p)
	}
	var n uintptr
	var errno syscall.Errno
	err := s.raw.Read(func(fd uintptr) bool {
		for {
			n, _, errno = syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)))
			if errno != syscall.EINTR {
				return errno != syscall.EAGAIN
			}
		}
	})
	switch {
	case err != nil:
		return 0, err
	case errno != 0:
		return 0, errno
	case n == 0:
		return 0, io.EOF
	}
	return int(n), nil
}

// Write writes all of p. What the socket takes at once costs no timer; when it has to wait
// for the peer to read, it gives up after writeStall.
func (s *sockIO) Write(p []byte) (int, error) {
	if s.raw == nil {
		_ = s.nc.SetWriteDeadline(time.Now().Add(writeStall))
		return s.nc.Write(p)
	}
	n, err := s.write(p, false)
	if err != nil || n == len(p) {
		return n, err
	}
	_ = s.nc.SetWriteDeadline(time.Now().Add(writeStall))
	m, err := s.write(p[n:], true)
	_ = s.nc.SetWriteDeadline(time.Time{})
	return n + m, err
}

// tryWrite writes what of p the socket takes at once, if it is a socket; for last words
// before a close.
func (s *sockIO) tryWrite(p []byte) {
	if s.raw != nil {
		_, _ = s.write(p, false)
	}
}

// write writes p until the socket takes no more; wait says whether to wait for it then.
func (s *sockIO) write(p []byte, wait bool) (int, error) {
	done := 0
	var errno syscall.Errno
	err := s.raw.Write(func(fd uintptr) bool {
		for done < len(p) {
			n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(unsafe.SliceData(p[done:]))), uintptr(len(p)-done))
			switch {
			case e == syscall.EAGAIN:
				return !wait
			case e == syscall.EINTR:
				continue
			case e != 0:
				errno = e
				return true
			}
			done += int(n)
		}
		return true
	})
	if err == nil && errno != 0 {
		err = errno
	}
	return done, err
}
