package proxy

import (
	"errors"
	"fmt"
	"time"
)

// Alive's errors: ErrNotAlive always, with ErrClosed too once Close has been called.
var (
	ErrNotAlive = errors.New("gateway not alive")
	ErrClosed   = errors.New("gateway closed")
)

// Alive says whether the gateway still works, for a watchdog (systemd's WatchdogSec=): nil if
// its housekeeping goroutine went round its loop within maxAge, an error wrapping ErrNotAlive
// otherwise (also wrapping ErrClosed once Close has been called).
//
// That goroutine is the proof because it ticks whatever the traffic (at most every 250 ms) and
// takes the dispatch lock on every round: the lock every accept loop, backend reader and
// failure path takes, so a deadlock or a goroutine hogging it stops the heartbeat; and it is
// what enforces the handoff and queue timeouts and feeds queued clients to workers. An accept
// loop parked in the poller waiting for clients is healthy and needs no proof; one cannot hang
// elsewhere, since every send to a worker is non-blocking. Alive itself takes no lock: a
// wedged gateway makes it say so instead of hanging the watchdog.
func (g *Gateway) Alive(maxAge time.Duration) error {
	select {
	case <-g.quit:
		return fmt.Errorf("%w: %w", ErrNotAlive, ErrClosed)
	default:
	}
	last := time.Duration(g.beat.Load())
	if age := time.Since(g.start) - last; age > maxAge {
		return fmt.Errorf("%w: its housekeeping (timeouts, queue, the dispatch lock) last went round %v ago", ErrNotAlive, age.Round(time.Millisecond))
	}
	return nil
}
