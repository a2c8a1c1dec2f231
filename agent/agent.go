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
}

// Reply computes the agent-check line (with its newline) for a host.
func Reply(ws []roster.Worker, gen uint64, hostDrained bool) string {
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
	return fmt.Sprintf("up ready %d%% maxconn:%d\n", pct, clients+free)
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
	_, _ = c.Write([]byte(Reply(s.src.Workers(), s.src.Generation(), s.src.HostDrained())))
}
