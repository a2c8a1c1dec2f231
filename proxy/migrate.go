package proxy

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/baton-gw/baton/handoff"
	"golang.org/x/sys/unix"
)

// Session migration (handoff/PROTOCOL.md "Migration"): a worker asked with MIGRATE hands
// sessions back (HANDBACK: the socket and an opaque state); the gateway owns each such socket
// until another worker ACKs the RESUME that carries it. Everything here runs on the paths a
// CONN already takes (dispatch, pending, ACK, fail's re-dispatch), so a handed-back session
// has a CONN's guarantees: one owner at a time, re-delivered if its worker dies before ACK.

// ErrNoMigrate: the worker did not ask for MIGRATE in its HELLO (or its channel is gone).
var ErrNoMigrate = errors.New("worker does not take part in migration")

// resumed is what a handed-back session carries to its next worker.
type resumed struct {
	from      *Backend // the worker that handed it back: never chosen for it
	prev      uint64
	hops      uint32
	group     string
	groupSize int
	state     []byte
	since     time.Time // when the HANDBACK arrived
}

func (r *resumed) append(b []byte, c *handoff.ConnInfo) []byte {
	// The state was bounded when the HANDBACK was decoded: this cannot fail.
	b, _ = handoff.AppendResume(b, &handoff.Resume{Conn: *c, PreviousID: r.prev, Hops: r.hops, Group: r.group, State: r.state})
	return b
}

// groupKey names a group: keys are the sending worker's own (PROTOCOL.md).
type groupKey struct {
	from *Backend
	key  string
}

// migrations is the gateway's migration state, guarded by Gateway.mu.
type migrations struct {
	waiting  []*clientConn         // handed back, no worker could take them yet
	groups   map[groupKey]*Backend // where each group's sessions go
	inflight int                   // handed back, not yet acked or lost (also in Gateway.inflight)
}

// lostLocked counts a handed-back session the gateway closed.
func (m *migrations) lostLocked(s *migStats) {
	m.inflight--
	s.lost.Add(1)
}

func (m *migrations) waitLocked(c *clientConn) {
	if !c.queued {
		c.queued, c.since = true, time.Now()
	}
	m.waiting = append(m.waiting, c)
}

// expireLocked removes and returns the sessions that waited longer than d.
func (m *migrations) expireLocked(now time.Time, d time.Duration) []*clientConn {
	var out []*clientConn
	keep := m.waiting[:0]
	for _, c := range m.waiting {
		if now.Sub(c.since) > d {
			out = append(out, c)
		} else {
			keep = append(keep, c)
		}
	}
	clear(m.waiting[len(keep):])
	m.waiting = keep
	return out
}

// forgetLocked drops the group placements to or from b (it is gone, or asked again).
func (m *migrations) forgetLocked(b *Backend, asFrom, asTo bool) {
	for k, to := range m.groups {
		if (asFrom && k.from == b) || (asTo && to == b) {
			delete(m.groups, k)
		}
	}
}

// migStats count migration; atomics, read by Stats.
type migStats struct {
	asked, handedBack, declined, resumed, lost atomic.Uint64
}

// MigrationStats is a snapshot of the migration counters.
type MigrationStats struct {
	Asked      uint64 `json:"asked"`       // MIGRATE requests sent to workers
	HandedBack uint64 `json:"handed_back"` // sessions workers handed back
	Declined   uint64 `json:"declined"`    // sessions workers chose to keep
	Resumed    uint64 `json:"resumed"`     // handed-back sessions another worker acked
	// Lost: handed back, then closed by batond (no worker took it within the queue timeout,
	// its fd could not be received, it failed MaxAttempts workers, batond stopped).
	Lost      uint64 `json:"lost"`
	Migrating int    `json:"migrating"` // handed back, not yet acked by a new worker
}

// takesResume says whether b may get the handed-back session c now.
func (b *Backend) takesResume(c *clientConn) bool {
	return b.info.Migrate && b != c.resume.from && b.available()
}

// pickResumeLocked chooses the worker for a handed-back session: its group's worker if it
// still has room, else the least-loaded worker with room for the whole group (or, if none
// has, the least loaded), which then becomes the group's.
func (g *Gateway) pickResumeLocked(c *clientConn) *Backend {
	r := c.resume
	key := groupKey{r.from, r.group}
	if r.group != "" {
		if b := g.mig.groups[key]; b != nil && b.takesResume(c) {
			return b
		}
	}
	need := max(r.groupSize, 1)
	var best *Backend
	bestFits := false
	for _, b := range g.backends {
		if !b.takesResume(c) {
			continue
		}
		fits := b.capacity-b.load() >= need
		switch {
		case best == nil, fits && !bestFits:
		case fits == bestFits && b.load()*best.capacity < best.load()*b.capacity:
		default:
			continue
		}
		best, bestFits = b, fits
	}
	if best != nil && r.group != "" {
		if g.mig.groups == nil {
			g.mig.groups = make(map[groupKey]*Backend)
		}
		g.mig.groups[key] = best
	}
	return best
}

// runResumeQueue offers every waiting handed-back session a worker once; those that find
// none wait again (until the queue timeout).
func (g *Gateway) runResumeQueue(scratch *[]byte) {
	g.mu.Lock()
	w := g.mig.waiting
	g.mig.waiting = nil
	g.mu.Unlock()
	for _, c := range w {
		g.dispatch(c, scratch)
	}
}

// Migrate asks the worker to hand back the sessions listed (every one it holds if ids is
// empty) within deadline. The caller drains the worker first if it should get no new ones.
func (b *Backend) Migrate(deadline time.Duration, ids []uint64) error {
	b.g.mu.Lock()
	if b.gone || !b.info.Migrate {
		b.g.mu.Unlock()
		return ErrNoMigrate
	}
	// A new request: the worker's groups are placed afresh.
	b.g.mig.forgetLocked(b, true, false)
	b.g.mu.Unlock()
	for first := true; first || len(ids) > 0; first = false {
		n := min(len(ids), handoff.MaxIDs-1)
		msg := handoff.AppendMigrate(nil, &handoff.Migrate{Deadline: deadline, IDs: ids[:n]})
		ids = ids[n:]
		// Never a blocking send on a live backend (see Drain).
		if err := b.ch.TrySend(msg, -1); err != nil {
			return fmt.Errorf("%w: MIGRATE: %w", ErrChannel, err)
		}
	}
	b.g.stats.mig.asked.Add(1)
	b.log.Info("asked the worker to hand its sessions back", "deadline", deadline, "clients", b.Live())
	return nil
}

// onHandback takes a session the worker handed back: from now on the gateway owns the socket
// (fd, -1 if it could not be received) and delivers it as a RESUME.
func (b *Backend) onHandback(body []byte, fd int, now time.Time, scratch *[]byte) (handoff.ErrorCode, error) {
	h, err := handoff.ParseHandback(body)
	if err != nil {
		closeFD(fd)
		return protocolErr(handoff.CodeMalformed, err)
	}
	g := b.g
	g.mu.Lock()
	if !b.info.Migrate || b.live < 1 {
		g.mu.Unlock()
		closeFD(fd)
		return protocolErr(handoff.CodeUnexpected, fmt.Errorf("HANDBACK of %#x from a worker that holds %d sessions (migrate %v)", h.Conn.ID, b.live, b.info.Migrate))
	}
	// A HANDBACK counts as the session's CLOSED for this worker.
	b.live--
	b.closed++
	b.lastSeen = now
	g.stats.mig.handedBack.Add(1)
	if fd < 0 {
		g.stats.mig.lost.Add(1)
		g.mu.Unlock()
		b.log.Error("a handed-back session arrived without its socket (out of file descriptors?); it is lost", "conn", h.Conn.ID)
		return 0, nil
	}
	c := g.newConnLocked()
	c.info = h.Conn
	c.info.ID = g.epoch | g.seq.Add(1)&0xffffffff
	c.fd, c.since, c.nonblock = fd, now, isNonblock(fd)
	c.resume = &resumed{from: b, prev: h.Conn.ID, hops: h.Hops + 1, group: h.Group, groupSize: int(h.GroupSize), state: h.State, since: now}
	g.inflight++
	g.mig.inflight++
	g.mu.Unlock()
	g.dispatch(c, scratch)
	return 0, nil
}

// isNonblock reports the socket's O_NONBLOCK: a handed-back socket is in whatever mode its
// worker left it, and dispatch sets the next worker's.
func isNonblock(fd int) bool {
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	return err == nil && fl&unix.O_NONBLOCK != 0
}

// onDecline counts sessions the worker keeps.
func (b *Backend) onDecline(ids []uint64) {
	b.g.stats.mig.declined.Add(uint64(len(ids)))
	b.log.Info("worker keeps sessions it was asked to hand back", "count", len(ids))
}

// MigrationStats returns the migration counters.
func (g *Gateway) MigrationStats() MigrationStats {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := &g.stats.mig
	return MigrationStats{
		Asked: m.asked.Load(), HandedBack: m.handedBack.Load(), Declined: m.declined.Load(),
		Resumed: m.resumed.Load(), Lost: m.lost.Load(), Migrating: g.mig.inflight,
	}
}
