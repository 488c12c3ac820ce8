package proxy

import (
	"testing"
	"time"
)

func TestGRPCTimeout(t *testing.T) {
	for _, c := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"300m", 300 * time.Millisecond, true},
		{"5S", 5 * time.Second, true},
		{"2H", 2 * time.Hour, true},
		{"99999999u", 99999999 * time.Microsecond, true},
		{"1n", time.Nanosecond, true},
		{"99999999H", 0, false},  // beyond a Duration
		{"123456789S", 0, false}, // nine digits
		{"10", 0, false},
		{"m", 0, false},
		{"-5S", 0, false},
		{"5s", 0, false},
		{"", 0, false},
	} {
		if got, ok := grpcTimeout(c.in); got != c.want || ok != c.ok {
			t.Errorf("grpcTimeout(%q) = %v, %v; want %v, %v", c.in, got, ok, c.want, c.ok)
		}
	}
}
