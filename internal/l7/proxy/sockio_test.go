package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// loopbackPair is a connected TCP pair on loopback; both ends close with the test.
func loopbackPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close(); _ = b.Close() })
	return a, b
}

// A write larger than the socket buffers waits for the reader and loses nothing; a read
// waits for data, sees the end as io.EOF, and a closed connection's blocked read returns.
func TestSockIO(t *testing.T) {
	a, b := loopbackPair(t)
	w, r := newSockIO(a), newSockIO(b)
	if w.raw == nil || r.raw == nil {
		t.Fatal("a TCP connection has no raw socket")
	}
	want := make([]byte, 16<<20) // well past what the kernel buffers on both sides
	for i := range want {
		want[i] = byte(i * 7)
	}
	wrote := make(chan error, 1)
	go func() {
		n, err := w.Write(want)
		if err == nil && n != len(want) {
			err = io.ErrShortWrite
		}
		_ = a.(*net.TCPConn).CloseWrite()
		wrote <- err
	}()
	time.Sleep(100 * time.Millisecond) // the writer fills the buffers and waits
	got, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if err := <-wrote; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes, not the %d written (or not in order)", len(got), len(want))
	}

	_, d := loopbackPair(t)
	read := make(chan error, 1)
	go func() {
		_, err := newSockIO(d).Read(make([]byte, 10))
		read <- err
	}()
	time.Sleep(50 * time.Millisecond)
	_ = d.Close()
	select {
	case err := <-read:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("a read of a closed connection: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a read blocked on a closed connection does not return")
	}
}
