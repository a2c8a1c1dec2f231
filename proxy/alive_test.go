package proxy

import (
	"errors"
	"testing"
	"time"
)

// Alive follows the housekeeping goroutine: fresh while it runs, stale while something holds
// the dispatch lock, fresh again once it is released, and an error after Close.
func TestAlive(t *testing.T) {
	g := New(Config{HandoffTimeout: 400 * time.Millisecond}) // ticks every 50ms
	defer g.Close()
	waitFor(t, 5*time.Second, func() bool { return g.Alive(200*time.Millisecond) == nil })

	g.mu.Lock() // a wedged dispatch: housekeeping cannot go round
	time.Sleep(500 * time.Millisecond)
	err := g.Alive(200 * time.Millisecond)
	g.mu.Unlock()
	if !errors.Is(err, ErrNotAlive) {
		t.Fatalf("Alive with the dispatch lock held for 500ms: %v, want ErrNotAlive", err)
	}
	t.Logf("while wedged: %v", err)
	waitFor(t, 5*time.Second, func() bool { return g.Alive(200*time.Millisecond) == nil })

	g.Close()
	if err := g.Alive(time.Hour); !errors.Is(err, ErrNotAlive) || !errors.Is(err, ErrClosed) {
		t.Errorf("Alive after Close: %v, want ErrNotAlive and ErrClosed", err)
	}
}
