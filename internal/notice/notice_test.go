package notice

import "testing"

func TestLastTellsOncePerChange(t *testing.T) {
	var l Last[string]
	steps := []struct {
		key, msg string
		tell     bool
	}{
		{"a", "no interface", true},
		{"a", "no interface", false}, // the same again: not told
		{"b", "no interface", true},  // another key
		{"a", "no port", true},       // changed
		{"a", "", true},              // gone: forgotten
		{"a", "", false},
		{"a", "no port", true}, // back: told again
	}
	for i, s := range steps {
		if got := l.Changed(s.key, s.msg); got != s.tell {
			t.Fatalf("step %d (%s %q): Changed = %v, want %v", i, s.key, s.msg, got, s.tell)
		}
	}
	l.Keep(func(k string) bool { return k == "a" })
	if !l.Changed("b", "no interface") {
		t.Fatal("b was not forgotten by Keep: its problem is not told again")
	}
	if l.Changed("a", "no port") {
		t.Fatal("a was forgotten by Keep though kept")
	}
}
