package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/baton-gw/baton/roster"
)

// Source is what a reply is computed from.
type Source interface {
	// Workers returns the roster's snapshot.
	Workers() []roster.Worker
	// Generation is the serving generation.
	Generation() uint64
	// HostDrained says whether an operator drained the whole host.
	HostDrained() bool
	// UndrainedAt is when an operator last ended a host drain (batonctl undrain; zero: never),
	// across reloads and restarts.
	UndrainedAt() time.Time
}

// ReadyWindow is how long after an undrain the agent's replies carry "ready" (see Ready):
// long enough for every balancer to see it at least once, checking every few seconds and
// missing a few.
const ReadyWindow = time.Minute

// Ready says whether a reply should carry "ready", the word that sets the server's
// administrative state in HAProxy back to READY. HAProxy keeps one administrative state per
// server, whoever sets it: "ready" cancels the agent's own "drain" and equally a DRAIN or MAINT
// that an operator set through HAProxy's runtime API (verified with HAProxy 2.6: the agent
// check keeps running in MAINT, and the next "ready" ends it). So the agent says "ready" only
// to undo its own "drain": within ReadyWindow of an undrain, and never otherwise.
func Ready(undrainedAt, now time.Time) bool {
	return !undrainedAt.IsZero() && now.Sub(undrainedAt) < ReadyWindow
}

// Reply computes the agent-check line (with its newline) for a host; ready adds "ready" to a
// serving reply (see Ready).
func Reply(ws []roster.Worker, gen uint64, hostDrained, ready bool) string {
	if hostDrained {
		return "drain\n"
	}
	total, free, clients, serving := 0, 0, 0, 0
	for _, w := range ws {
		clients += w.Clients
		if w.Generation != gen || w.State != roster.Ready || !w.Connected {
			continue
		}
		serving++
		total += w.Capacity
		free += max(0, w.Capacity-w.Clients)
	}
	if serving == 0 || total == 0 {
		return "down#no ready workers\n"
	}
	pct := free * 100 / total
	if pct == 0 && free > 0 {
		pct = 1 // some room left: never weight 0, which HAProxy shows as DRAIN
	}
	if ready {
		return fmt.Sprintf("up ready %d%% maxconn:%d\n", pct, clients+free)
	}
	return fmt.Sprintf("up %d%% maxconn:%d\n", pct, clients+free)
}

// writeTimeout bounds one reply: a checker that does not read does not hold a goroutine.
const writeTimeout = 2 * time.Second

// Server answers agent checks on one listener.
type Server struct {
	l   net.Listener
	src Source
	log hclog.Logger
	wg  sync.WaitGroup
}

// NewServer answers on l (which it owns) from src.
func NewServer(l net.Listener, src Source, log hclog.Logger) *Server {
	return &Server{l: l, src: src, log: log}
}

// Serve answers until ctx ends or the listener closes; it returns once every reply under way
// has finished.
func (s *Server) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { s.l.Close() })
	defer stop()
	defer s.wg.Wait()
	var backoff time.Duration
	for {
		c, err := s.l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			// EMFILE and friends: back off instead of spinning; the next check retries.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("agent-check accept failed; backing off", "error", err, "backoff", backoff)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return nil
			}
			continue
		}
		backoff = 0
		s.wg.Add(1)
		go s.answer(c)
	}
}

func (s *Server) answer(c net.Conn) {
	defer s.wg.Done()
	defer c.Close()
	_ = c.SetWriteDeadline(time.Now().Add(writeTimeout))
	ready := Ready(s.src.UndrainedAt(), time.Now())
	_, _ = c.Write([]byte(Reply(s.src.Workers(), s.src.Generation(), s.src.HostDrained(), ready)))
}
