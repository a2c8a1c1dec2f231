package proxy

import (
	"time"

	"github.com/baton-gw/baton/handoff"
)

// SetHostDrain drains the whole host (on) or ends that (off). A drained host takes no new
// clients: each one accepted is closed at once and counted (ReasonDrained), so that a client
// that reaches it anyway (the balancer learns of the drain at its next agent check) is told at
// once instead of waiting for the queue timeout; a balancer retries it elsewhere. Sessions on
// the workers are not touched.
func (g *Gateway) SetHostDrain(on bool) { g.hostDrained.Store(on) }

// HostDrained says whether the host is drained.
func (g *Gateway) HostDrained() bool { return g.hostDrained.Load() }

// refuseBurst closes a wake-up's connections on a drained host, counting each as accepted and
// closed by the gateway.
func (g *Gateway) refuseBurst(l *Listener, bu *burst, now time.Time) {
	g.mu.Lock()
	for _, a := range bu.acc {
		c := g.newConnLocked()
		c.fd, c.since = a.fd, now
		c.info = handoff.ConnInfo{ID: g.epoch | g.seq.Add(1)&0xffffffff, Client: a.client, Local: a.local, Listener: l.name}
		g.stats.accepted.Add(1)
		g.inflight++
		bu.bad = append(bu.bad, c)
	}
	g.mu.Unlock()
	for _, c := range bu.bad {
		g.closeConn(c, ReasonDrained)
	}
}
