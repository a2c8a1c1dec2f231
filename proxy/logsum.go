package proxy

import (
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Events that can happen once per client connection (or per failed accept) are never logged
// one line each: 3,000 clients closed after the queue timeout would be 3,000 lines saying the
// same. They are counted where they happen (the atomic counters in stats, which the hot path
// keeps anyway: no allocation, no lock), and the housekeeping goroutine turns the counts into
// one line per kind of event and per interval: the first occurrence after a quiet interval at
// once, then what accumulated, at most once every SummaryInterval. Each line says how many and
// why, the cause read from the gateway's state when it happened.

// tally is what was last logged for one kind of event.
type tally struct {
	reported uint64    // the counter's value at the last line
	at       time.Time // of the last line; zero: never logged
}

// due says whether n (the counter now) deserves a line: something new since the last one, and
// that one at least every ago (or final: batond stops, whatever is left is said now).
func (t *tally) due(n uint64, now time.Time, every time.Duration, final bool) (uint64, bool) {
	if n == t.reported || (!final && !t.at.IsZero() && now.Sub(t.at) < every) {
		return 0, false
	}
	d := n - t.reported
	t.reported, t.at = n, now
	return d, true
}

// summary is the housekeeping goroutine's record of what it logged (Close's, once that
// goroutine has ended): one owner, no lock.
type summary struct {
	closed   [numReasons]tally
	backoffs tally
	redisp   tally
}

// causes are what the summary lines say about why, recorded under g.mu where it happens:
// once per housekeeping pass or per failure, never per connection that goes well.
type causes struct {
	noWorker  availability // when the last queued connections expired
	socketErr error        // the last error preparing a socket for its worker
	acceptErr error        // the last accept error that made a loop back off
	acceptOn  string       // on which listener
}

// availability is why no worker could take a connection: the registered backends counted by
// what keeps each from taking more.
type availability struct {
	registered, notReady, draining, refusing, full, atCapacity, available int
	capacity                                                              int // shared by all those at capacity; 0 if they differ
}

// availabilityLocked reads the backends' state as dispatch sees it (pickLocked).
func (g *Gateway) availabilityLocked() availability {
	a := availability{registered: len(g.backends)}
	for _, b := range g.backends {
		switch {
		case b.draining:
			a.draining++
		case !b.ready:
			a.notReady++
		case b.refusing:
			a.refusing++
		case b.full:
			a.full++
		case b.load() >= b.capacity:
			if a.atCapacity == 0 {
				a.capacity = b.capacity
			} else if a.capacity != b.capacity {
				a.capacity = 0
			}
			a.atCapacity++
		default:
			a.available++
		}
	}
	return a
}

// String says it as an operator reads it: "no workers registered", "all 2 workers at capacity
// 1000", "none of the 4 workers available: 3 draining, 1 not ready yet".
func (a availability) String() string {
	if a.registered == 0 {
		return "no workers registered"
	}
	capacity := "at capacity"
	if a.capacity > 0 {
		capacity = fmt.Sprintf("at capacity %d", a.capacity)
	}
	kinds := []struct {
		n    int
		what string
	}{
		{a.atCapacity, capacity},
		{a.draining, "draining"},
		{a.notReady, "not ready yet"},
		{a.refusing, "refusing connections (out of file descriptors?)"},
		{a.full, "with a full channel (not reading it)"},
		{a.available, "free again just now"},
	}
	var parts []string
	for _, k := range kinds {
		if k.n == a.registered {
			if k.n == 1 {
				return "the one worker " + k.what
			}
			return fmt.Sprintf("all %d workers %s", k.n, k.what)
		}
		if k.n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", k.n, k.what))
		}
	}
	return fmt.Sprintf("none of the %d workers available: %s", a.registered, strings.Join(parts, ", "))
}

func clients(n uint64) string {
	if n == 1 {
		return "1 client"
	}
	return fmt.Sprintf("%d clients", n)
}

func times(n uint64) string {
	if n == 1 {
		return "once"
	}
	return fmt.Sprintf("%d times", n)
}

// flushSummary logs a line for each kind of counted event that is due (see tally.due). It
// takes the gateway's lock only when there is something to say.
func (g *Gateway) flushSummary(now time.Time, final bool) {
	s, every := &g.sum, g.cfg.SummaryInterval
	var closed [numReasons]uint64
	var lines [numReasons]bool
	any := false
	for r := range closed {
		closed[r], lines[r] = s.closed[r].due(g.stats.closed[r].Load(), now, every, final)
		any = any || lines[r]
	}
	backoffs, backoffLine := s.backoffs.due(g.stats.acceptBackoffs.Load(), now, every, final)
	redisp, redispLine := s.redisp.due(g.stats.redispatched.Load(), now, every, final)
	if !any && !backoffLine && !redispLine {
		return
	}
	g.mu.Lock()
	c := g.causes
	g.mu.Unlock()
	for r, n := range closed {
		if !lines[r] {
			continue
		}
		reason := CloseReason(r)
		level, msg := hclog.Warn, ""
		switch reason {
		case ReasonNoWorker:
			msg = fmt.Sprintf("closed %s after the queue timeout (%v): %v", clients(n), g.cfg.QueueTimeout, c.noWorker)
		case ReasonShutdown:
			msg = fmt.Sprintf("closed %s still waiting for a worker when batond stopped", clients(n))
		case ReasonRetries:
			msg = fmt.Sprintf("closed %s after %d handoff attempts: every worker they went to failed before acknowledging them", clients(n), g.cfg.MaxAttempts)
		case ReasonWorkerLost:
			level = hclog.Error
			msg = fmt.Sprintf("closed %s handed to a worker that failed and could not be confirmed dead (never handed on: two processes would read them)", clients(n))
		case ReasonSocket:
			level = hclog.Error
			msg = fmt.Sprintf("closed %s whose socket could not be prepared for its worker: %v", clients(n), c.socketErr)
		case ReasonProxyUntrusted:
			msg = fmt.Sprintf("closed %s of a PROXY listener from addresses not among -proxy-from", clients(n))
		case ReasonProxyInvalid:
			msg = fmt.Sprintf("closed %s of a PROXY listener that sent no valid PROXY header", clients(n))
		case ReasonProxyTimeout:
			msg = fmt.Sprintf("closed %s of a PROXY listener whose header did not arrive within -proxy-timeout", clients(n))
		case ReasonProxyBusy:
			msg = fmt.Sprintf("closed %s of a PROXY listener at once: %d connections already waited for their header", clients(n), g.cfg.MaxPendingHeaders)
		case ReasonProxyLocal:
			level = hclog.Debug // the balancer's own health checks: expected, every few seconds
			msg = fmt.Sprintf("closed %s carrying a PROXY LOCAL header (the balancer's health checks)", clients(n))
		}
		g.log.Log(level, msg, "count", n, "reason", reason.String())
	}
	if backoffLine {
		g.log.Warn(fmt.Sprintf("accept failed %s, backing off each time (%v doubling to %v): listener %s: %v",
			times(backoffs), acceptBackoffMin, acceptBackoffMax, c.acceptOn, c.acceptErr), "count", backoffs)
	}
	if redispLine {
		g.log.Info(fmt.Sprintf("handed %s to another worker: the first failed or refused them before acknowledging", clients(redisp)), "count", redisp)
	}
}
