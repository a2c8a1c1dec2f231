package proxy

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/baton-gw/baton/handoff"
)

// maxBurst bounds the connections one wake-up of an accept loop takes from the backlog before
// handing them over: enough for a few full CONNS, few enough that the first of them does not
// wait long for the last to be accepted.
const maxBurst = 4 * handoff.MaxConns

// burst is one accept loop's scratch space for handing over what one wake-up accepted: the
// accepted sockets, then, per worker, copies of what goes into its messages. Everything is
// reused from burst to burst, so a handoff allocates nothing.
type burst struct {
	acc    []accepted
	groups []group
	bad    []*clientConn // could not be settled (blocking mode); closed after the lock
	msg    []byte
	scr    []byte // for dispatch, when a send fails
	// counted: its connections were counted accepted and in flight before (the header stage's
	// burst); dispatchBurst counts the others.
	counted bool
}

type accepted struct {
	fd            int
	client, local netip.AddrPort
}

// group is what one burst hands to one backend. Its connections are published in b.pending
// under the gateway's lock; ids, fds and infos are copies made then, because once the lock is
// released the clientConns may belong to someone else (fail, refused).
type group struct {
	b     *Backend
	cs    []*clientConn
	infos []handoff.ConnInfo
	fds   []int
}

func newBurst() *burst {
	return &burst{
		acc: make([]accepted, 0, maxBurst),
		msg: make([]byte, 0, handoff.MaxMessage),
		scr: make([]byte, 0, handoff.MaxMessage),
	}
}

func (bu *burst) add(fd int, client, local netip.AddrPort) {
	bu.acc = append(bu.acc, accepted{fd: fd, client: client, local: local})
}

func (bu *burst) groupFor(b *Backend) *group {
	for i := range bu.groups {
		if bu.groups[i].b == b {
			return &bu.groups[i]
		}
	}
	if len(bu.groups) < cap(bu.groups) {
		bu.groups = bu.groups[:len(bu.groups)+1]
	} else {
		bu.groups = append(bu.groups, group{})
	}
	gr := &bu.groups[len(bu.groups)-1]
	gr.b = b
	return gr
}

func (bu *burst) reset() {
	bu.acc = bu.acc[:0]
	for i := range bu.groups {
		gr := &bu.groups[i]
		clear(gr.cs)
		gr.b, gr.cs, gr.infos, gr.fds = nil, gr.cs[:0], gr.infos[:0], gr.fds[:0]
	}
	bu.groups = bu.groups[:0]
	clear(bu.bad)
	bu.bad = bu.bad[:0]
}

// dispatchBurst hands the connections of one accept wake-up to backends: each to the least
// loaded one, as dispatch does, all under one lock; then each backend gets them in as few
// messages as it takes (CONNS of up to handoff.MaxConns, for workers that asked for them).
func (g *Gateway) dispatchBurst(l *Listener, bu *burst, now time.Time) {
	defer bu.reset()
	queued := false
	var prev *Backend
	g.mu.Lock()
	for _, a := range bu.acc {
		c := g.newConnLocked()
		c.fd, c.since, c.nonblock = a.fd, now, true
		c.info = handoff.ConnInfo{ID: g.epoch | g.seq.Add(1)&0xffffffff, Client: a.client, Local: a.local, Listener: l.name}
		if !bu.counted {
			g.stats.accepted.Add(1)
			g.inflight++
		}
		var b *Backend
		if len(g.waiting) == 0 {
			// Others waiting already: a new client does not overtake them.
			b = g.pickLocked()
			if b != prev && prev != nil && prev.available() && prev.load() < burstAffinity {
				// A nearly idle worker takes the rest of the burst: one message and one
				// wake-up instead of one per worker (see burstAffinity).
				b = prev
			}
		}
		if b == nil {
			c.queued = true
			g.waiting = append(g.waiting, c)
			queued = true
			continue
		}
		if err := g.settleLocked(b, c, now); err != nil {
			bu.bad = append(bu.bad, c)
			continue
		}
		b.pending[c.info.ID] = c
		prev = b
		gr := bu.groupFor(b)
		gr.cs = append(gr.cs, c)
		gr.infos = append(gr.infos, c.info)
		gr.fds = append(gr.fds, c.fd)
	}
	g.mu.Unlock()
	for _, c := range bu.bad {
		g.closeConn(c, ReasonSocket)
	}
	if queued {
		g.poke()
	}
	for i := range bu.groups {
		g.sendGroup(&bu.groups[i], bu)
	}
}

// burstAffinity: a worker holding fewer connections than this (live and in flight) takes the
// rest of the burst it got the first of, least loaded or not. With short connections (a storm
// of connect, request, reply, close) every worker's load is a handful, strict least-loaded
// order deals a burst out across all of them, and each one is woken for its share: keeping the
// burst together cut the server's CPU per connection by a sixth at 4,000/s. Once workers hold
// more than this, as game servers do, the choice is strictly least-loaded again, so held
// sessions end up as even as ever (the counts of a worker that took a burst are evened out by
// the next connections, which go to the others).
const burstAffinity = handoff.MaxConns

// sendGroup sends a group's connections to its backend. If a send fails, that message's
// connections and every later one's are taken back (if the backend still has them: a failure
// elsewhere may have re-dispatched them already) and dispatched one by one, as dispatch does
// after a failed send.
func (g *Gateway) sendGroup(gr *group, bu *burst) {
	b := gr.b
	for i := 0; i < len(gr.cs); {
		n, size := 0, handoff.ConnsOverhead
		for i+n < len(gr.cs) && n < handoff.MaxConns && b.info.Batch {
			size += handoff.ConnEntryLen(&gr.infos[i+n])
			if n > 0 && size > handoff.MaxMessage {
				break
			}
			n++
		}
		if n <= 1 {
			n = 1
			bu.msg = handoff.AppendConn(bu.msg[:0], &gr.infos[i])
		} else {
			infos := gr.infos[i : i+n]
			bu.msg = handoff.AppendConns(bu.msg[:0], n, func(k int) *handoff.ConnInfo { return &infos[k] })
		}
		err := b.ch.TrySendFDs(bu.msg, gr.fds[i:i+n])
		if err == nil {
			i += n
			continue
		}
		g.takeBack(gr, i, err, bu)
		return
	}
}

// takeBack undoes the publication of gr's connections from index i on after a failed send and
// dispatches them again.
func (g *Gateway) takeBack(gr *group, i int, err error, bu *burst) {
	b := gr.b
	back := gr.cs[i:i:len(gr.cs)] // reuses gr.cs's tail: taken back in order, never ahead of i
	g.mu.Lock()
	for k := i; k < len(gr.cs); k++ {
		c := gr.cs[k]
		if b.pending[gr.infos[k].ID] != c {
			continue // the backend failed meanwhile and took c with it; its failure path re-dispatches
		}
		delete(b.pending, gr.infos[k].ID)
		c.attempts--
		back = append(back, c)
	}
	wouldBlock := errors.Is(err, handoff.ErrWouldBlock)
	if wouldBlock {
		b.full = true // not reading; skip it until it sends something
	}
	g.mu.Unlock()
	if !wouldBlock {
		g.fail(b, fmt.Errorf("%w: send: %w", ErrChannel, err), 0)
	}
	for _, c := range back {
		g.dispatch(c, &bu.scr)
	}
}
