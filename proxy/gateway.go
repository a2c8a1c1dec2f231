package proxy

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/handoff"
)

// Sentinel errors that end a backend.
var (
	ErrStalled   = errors.New("worker stalled: no ACK within the handoff timeout")
	ErrNoPong    = errors.New("worker stalled: no answer to PING")
	ErrProtocol  = errors.New("worker broke the protocol")
	ErrChannel   = errors.New("worker channel closed")
	ErrShutdown  = errors.New("gateway shutting down")
	ErrNoProcess = errors.New("worker process unknown: cannot confirm it is dead")
)

// Config tunes a Gateway. Zero values take the defaults in brackets.
type Config struct {
	HandoffTimeout  time.Duration // a worker must ACK within this [2s]
	QueueTimeout    time.Duration // a connection waits this long for a worker [5s]
	PingInterval    time.Duration // PING period; three missed = stalled [2s]
	DefaultCapacity int           // for workers that declare 0 [1000]
	MaxAttempts     int           // workers a connection may be handed to before giving up [3]
	// AcceptCoalesce is the shortest interval between two wake-ups of an accept loop while
	// connections keep arriving (see acceptor.accept); 0 wakes for each connection [0].
	AcceptCoalesce time.Duration
	// SummaryInterval: events that can happen per connection (clients closed by the gateway,
	// accept failures, re-dispatches) are logged as one line per kind and interval, with the
	// count and the cause, the first one after a quiet interval at once (see logsum.go) [10s].
	SummaryInterval time.Duration
	// MaxPendingHeaders bounds the connections of PROXY listeners that wait for their header at
	// once; beyond it a new one is closed at once and counted (ReasonProxyBusy), so that a
	// flood of connections that send nothing cannot take every fd batond may open. A balancer
	// sends its header with its first segment: these wait milliseconds, not seconds [1024].
	MaxPendingHeaders int
	Logger            hclog.Logger
}

func (c *Config) defaults() {
	if c.HandoffTimeout <= 0 {
		c.HandoffTimeout = 2 * time.Second
	}
	if c.QueueTimeout <= 0 {
		c.QueueTimeout = 5 * time.Second
	}
	if c.PingInterval <= 0 {
		c.PingInterval = 2 * time.Second
	}
	if c.DefaultCapacity <= 0 {
		c.DefaultCapacity = 1000
	}
	if c.MaxAttempts <= 0 {
		c.MaxAttempts = 3
	}
	if c.SummaryInterval <= 0 {
		c.SummaryInterval = 10 * time.Second
	}
	if c.MaxPendingHeaders <= 0 {
		c.MaxPendingHeaders = 1024
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
}

// clientConn is one accepted connection the gateway still owns.
type clientConn struct {
	info     handoff.ConnInfo
	fd       int
	since    time.Time // accepted, or queued
	sentAt   time.Time
	attempts int
	queued   bool // has waited in g.waiting
	nonblock bool // O_NONBLOCK is set on fd (as accepted); dispatch matches it to the worker
	// selfCheck is set on the gateway's own end-to-end probe (SelfCheck): closed on ACK, and
	// the probe is kept out of the client counters.
	selfCheck chan struct{}
	// resume is set on a session another worker handed back (migrate.go): it goes out as a
	// RESUME, only to a worker that takes them.
	resume *resumed
}

// Gateway accepts connections and hands them to Backends.
type Gateway struct {
	cfg   Config
	log   hclog.Logger
	stats stats
	epoch uint64
	seq   atomic.Uint64
	start time.Time
	// lastAccept is when (since start) a connection was last accepted: while that is recent,
	// backend readers poll instead of parking (see Backend.recv).
	lastAccept atomic.Int64
	// hostDrained: an operator drained the host (drain.go): balancers are told so.
	hostDrained atomic.Bool
	hs          *headerStage // PROXY headers being read (proxyproto.go); nil until needed
	handoffLat  histogram    // accepted → acked (latency.go)
	queueWait   histogram    // accepted → handed to a worker, for connections that waited
	// beat is when (since start) the housekeeping goroutine last went round its loop, which
	// takes the dispatch lock: see Alive.
	beat atomic.Int64
	wake chan struct{}
	quit chan struct{}
	done chan struct{}
	sum  summary // owned by housekeeping, then by Close

	mu        sync.Mutex
	backends  []*Backend
	rr        int
	waiting   []*clientConn
	mig       migrations // handed-back sessions waiting for a worker, and group placements
	listeners []*Listener
	stopping  bool
	serving   sync.WaitGroup // Serve loops, so StopAccepting can wait for their last dispatch
	inflight  int            // handed off, not yet acked (across all backends) + waiting
	idle      chan struct{}
	free      []*clientConn  // recycled, so that a handoff allocates nothing (see newConnLocked)
	kills     sync.WaitGroup // fail's kill-and-redispatch of failed backends; joined by Close
	closed    bool           // Close has begun: kills started from now on are not joined
	causes    causes         // why the events counted for the log summary happened
}

// maxFree bounds the recycled clientConns: a burst of in-flight connections should not pin its
// peak in memory for ever.
const maxFree = 1024

// newConnLocked returns a zeroed clientConn. Recycling them keeps the accept path free of heap
// allocations: batond holds no state for a handed-off session, and the garbage of one
// clientConn per connection was all that made its RSS grow with the connections it passed on.
func (g *Gateway) newConnLocked() *clientConn {
	if n := len(g.free); n > 0 {
		c := g.free[n-1]
		g.free[n-1] = nil
		g.free = g.free[:n-1]
		return c
	}
	return new(clientConn)
}

// freeConnLocked recycles c, which nothing references any more (acked, or closed). The
// self-check's probe is left alone: SelfCheck still waits on it.
func (g *Gateway) freeConnLocked(c *clientConn) {
	if c.selfCheck != nil || len(g.free) >= maxFree {
		return
	}
	*c = clientConn{}
	g.free = append(g.free, c)
}

// New creates a Gateway and starts its housekeeping goroutine (timeouts, pings, the queue).
func New(cfg Config) *Gateway {
	cfg.defaults()
	var e [4]byte
	_, _ = rand.Read(e[:])
	g := &Gateway{
		cfg: cfg,
		log: cfg.Logger,
		// Connection ids are epoch<<32|seq so that ids from a previous batond, which workers
		// report as CLOSED after re-registering, can never collide with ours.
		epoch: uint64(binary.LittleEndian.Uint32(e[:])) << 32,
		start: time.Now(),
		wake:  make(chan struct{}, 1),
		quit:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	go g.housekeeping()
	return g
}

// Polling cadence while accepting (see Backend.recv): ACKs and CLOSEDs are collected at least
// every pollEvery while connections arrive, and within busyWindow otherwise; both are far below
// the handoff timeout, which is what a late ACK could trip.
const (
	pollEvery  = time.Millisecond
	busyWindow = 5 * time.Millisecond
)

func (g *Gateway) busy() bool {
	return time.Duration(g.lastAccept.Load()) > time.Since(g.start)-busyWindow
}

// prodReaders asks every backend reader to collect what its worker sent.
func (g *Gateway) prodReaders() {
	g.mu.Lock()
	for _, b := range g.backends {
		select {
		case b.poll <- struct{}{}:
		default:
		}
	}
	g.mu.Unlock()
}

func (g *Gateway) poke() {
	select {
	case g.wake <- struct{}{}:
	default:
	}
}

// Serve runs the accept loop of l until l is closed. EMFILE/ENFILE back off (5 ms doubling to
// 1 s) instead of spinning; the pending connection stays in the backlog meanwhile.
func (g *Gateway) Serve(l *Listener) error {
	g.mu.Lock()
	if g.stopping {
		g.mu.Unlock()
		return nil
	}
	g.listeners = append(g.listeners, l)
	g.serving.Add(1)
	g.mu.Unlock()
	defer g.serving.Done()
	a := newAcceptor(l, g.cfg.AcceptCoalesce)
	bu := newBurst()
	take := bu.add
	if l.pp != nil {
		// A PROXY listener's connections wait for their header off this loop.
		hs, err := g.headers()
		if err != nil {
			return err
		}
		peek := make([]byte, maxHeader)
		take = func(fd int, client, local netip.AddrPort) {
			if hs.inline(l, fd, client, local, peek, bu) {
				return
			}
			hs.add(l, fd, client, local, time.Now())
		}
	}
	backoff := time.Duration(0)
	var lastProd time.Time
	for {
		fd, client, local, err := a.accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			g.stats.acceptErrors.Add(1)
			if retryAtOnce(err) {
				continue
			}
			if !temporary(err) {
				return fmt.Errorf("proxy: accept on %s: %w", l.name, err)
			}
			// Counted and logged by the summary (one line per interval, not one per failure).
			g.mu.Lock()
			g.causes.acceptErr, g.causes.acceptOn = err, l.name
			g.mu.Unlock()
			g.stats.acceptBackoffs.Add(1)
			if backoff == 0 {
				backoff = acceptBackoffMin
			} else if backoff *= 2; backoff > acceptBackoffMax {
				backoff = acceptBackoffMax
			}
			select {
			case <-time.After(backoff):
			case <-g.quit:
				return nil
			}
			continue
		}
		backoff = 0
		take(fd, client, local)
		// Everything else already in the backlog goes in the same burst, so that each worker
		// gets this wake-up's connections in one message (and is woken once for them). An
		// error here ends the burst; if it is not the empty backlog, the next accept reports it.
		for n := 1; n < maxBurst; n++ {
			fd, client, local, err = a.tryAccept()
			if err != nil {
				break
			}
			take(fd, client, local)
		}
		now := time.Now()
		g.lastAccept.Store(int64(now.Sub(g.start)))
		if len(bu.acc) > 0 {
			g.dispatchBurst(l, bu, now)
		}
		if now.Sub(lastProd) >= pollEvery {
			lastProd = now
			g.prodReaders()
		}
	}
}

// pickLocked returns the least-loaded available backend: fewest (live+pending)/capacity, ties
// going to the first found scanning from a rotating start.
func (g *Gateway) pickLocked() *Backend {
	n := len(g.backends)
	var best *Backend
	bestIdx := 0
	for i := 0; i < n; i++ {
		idx := (g.rr + i) % n
		b := g.backends[idx]
		if !b.available() {
			continue
		}
		if best == nil || b.load()*best.capacity < best.load()*b.capacity {
			best, bestIdx = b, idx
		}
	}
	if best != nil {
		g.rr = bestIdx + 1
	}
	return best
}

// dispatch hands c to a backend, or queues it when none is available.
func (g *Gateway) dispatch(c *clientConn, scratch *[]byte) {
	for {
		g.mu.Lock()
		var b *Backend
		if c.resume != nil {
			b = g.pickResumeLocked(c)
		} else {
			b = g.pickLocked()
		}
		if b == nil && c.resume != nil {
			g.mig.waitLocked(c)
			g.mu.Unlock()
			return
		}
		if b == nil {
			// Waiting since it was accepted: a connection that loses a race for the last free
			// worker keeps its place (the head) and its original queue deadline.
			if c.queued {
				g.waiting = append([]*clientConn{c}, g.waiting...)
			} else {
				c.queued = true
				g.waiting = append(g.waiting, c)
			}
			g.mu.Unlock()
			return
		}
		// Everything about c is settled and copied before c is published in pending: from
		// then on another goroutine (fail, refused, an ACK that recycles it) may own it.
		if err := g.settleLocked(b, c, time.Now()); err != nil {
			g.mu.Unlock()
			g.closeConn(c, ReasonSocket)
			return
		}
		id, fd := c.info.ID, c.fd
		if c.resume != nil {
			*scratch = c.resume.append((*scratch)[:0], &c.info)
		} else {
			*scratch = handoff.AppendConn((*scratch)[:0], &c.info)
		}
		b.pending[id] = c
		g.mu.Unlock()

		err := b.ch.TrySend(*scratch, fd)
		if err == nil {
			return
		}
		g.mu.Lock()
		if b.pending[id] != c {
			// The backend failed meanwhile and took c with it; its failure path re-dispatches.
			g.mu.Unlock()
			return
		}
		delete(b.pending, id)
		c.attempts--
		if errors.Is(err, handoff.ErrWouldBlock) {
			b.full = true // not reading; skip it until it sends something
			g.mu.Unlock()
			continue
		}
		g.mu.Unlock()
		g.fail(b, fmt.Errorf("%w: send: %w", ErrChannel, err), 0)
	}
}

// settleLocked readies c to be handed to b: the fd's blocking mode as b wants it, the attempt
// counted. An error means the socket is unusable; the caller closes it (the log summary says
// why, with the last such error).
func (g *Gateway) settleLocked(b *Backend, c *clientConn, now time.Time) error {
	if want := b.info.Nonblock; c.nonblock != want {
		if err := setNonblock(c.fd, want); err != nil {
			g.causes.socketErr = err
			return err
		}
		c.nonblock = want
	}
	if c.queued && c.attempts == 0 {
		g.queueWait.observe(now.Sub(c.since))
	}
	c.sentAt = now
	c.attempts++
	return nil
}

// setNonblock sets or clears O_NONBLOCK with one fcntl: a TCP socket has no other status flag
// that F_SETFL could change.
func setNonblock(fd int, on bool) error {
	flags := 0
	if on {
		flags = unix.O_NONBLOCK
	}
	_, _, errno := unix.RawSyscall(unix.SYS_FCNTL, uintptr(fd), unix.F_SETFL, uintptr(flags))
	if errno != 0 {
		return os.NewSyscallError("fcntl F_SETFL", errno)
	}
	return nil
}

// closeConn closes a connection the gateway gives up on, counting the reason.
func (g *Gateway) closeConn(c *clientConn, r CloseReason) {
	unix.Close(c.fd)
	g.mu.Lock()
	switch {
	case c.resume != nil:
		g.mig.lostLocked(&g.stats.mig)
	case c.selfCheck == nil:
		g.stats.closed[r].Add(1)
	}
	g.doneInflightLocked(1)
	g.freeConnLocked(c)
	g.mu.Unlock()
}

func (g *Gateway) doneInflightLocked(n int) {
	g.inflight -= n
	if g.inflight == 0 && g.idle != nil {
		close(g.idle)
		g.idle = nil
	}
}

// housekeeping enforces the handoff and queue timeouts, pings workers and feeds queued
// connections to workers as capacity appears.
func (g *Gateway) housekeeping() {
	defer close(g.done)
	tick := g.cfg.HandoffTimeout / 8
	if tick < 10*time.Millisecond {
		tick = 10 * time.Millisecond
	}
	if tick > 250*time.Millisecond {
		tick = 250 * time.Millisecond
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	scratch := make([]byte, 0, handoff.MaxMessage)
	last := time.Now()
	for {
		select {
		case <-g.quit:
			return
		case <-g.wake:
		case now := <-t.C:
			// A tick far later than due means this process (or the whole host) was not
			// running: the workers' answers may be waiting unread in their channels. No
			// verdict on anyone until the readers have had a turn.
			late := now.Sub(last) > 4*tick
			last = now
			if !late {
				g.checkTimeouts()
			}
			g.flushSummary(now, false)
		}
		g.runQueue(&scratch)
		g.beat.Store(int64(time.Since(g.start)))
	}
}

func (g *Gateway) checkTimeouts() {
	now := time.Now()
	type failure struct {
		b   *Backend
		err error
	}
	var fails []failure
	var expired []*clientConn
	var pings []*Backend
	g.mu.Lock()
	for _, b := range g.backends {
		// Stalled: a connection unacked for the handoff timeout, and no ACK at all from the
		// worker for as long. A worker that acks in order but slowly (a busy host) is alive.
		if now.Sub(b.lastAck) > g.cfg.HandoffTimeout {
			for _, c := range b.pending {
				if now.Sub(c.sentAt) > g.cfg.HandoffTimeout {
					fails = append(fails, failure{b, ErrStalled})
					break
				}
			}
		}
		if now.Sub(b.lastSeen) > 3*g.cfg.PingInterval {
			fails = append(fails, failure{b, ErrNoPong})
		} else if now.Sub(b.lastPing) >= g.cfg.PingInterval {
			b.lastPing = now
			pings = append(pings, b)
		}
	}
	keep := g.waiting[:0]
	for _, c := range g.waiting {
		if now.Sub(c.since) > g.cfg.QueueTimeout {
			expired = append(expired, c)
		} else {
			keep = append(keep, c)
		}
	}
	clear(g.waiting[len(keep):])
	g.waiting = keep
	lost := g.mig.expireLocked(now, g.cfg.QueueTimeout)
	if len(expired) > 0 {
		// Why nobody took them, as it is now: the summary line says it (one per interval).
		g.causes.noWorker = g.availabilityLocked()
	}
	g.mu.Unlock()
	for _, f := range fails {
		g.fail(f.b, f.err, handoff.CodeStalled)
	}
	for _, c := range expired {
		g.closeConn(c, ReasonNoWorker)
	}
	for _, c := range lost {
		g.closeConn(c, ReasonNoWorker)
	}
	for _, b := range pings {
		_ = b.ch.TrySend(handoff.AppendNonce(nil, handoff.TypePing, uint64(now.UnixNano())), -1)
	}
}

// runQueue hands queued connections to workers while any is available.
func (g *Gateway) runQueue(scratch *[]byte) {
	g.runResumeQueue(scratch)
	for {
		g.mu.Lock()
		if len(g.waiting) == 0 || g.pickAvailableLocked() == false {
			g.mu.Unlock()
			return
		}
		c := g.waiting[0]
		g.waiting[0] = nil
		g.waiting = g.waiting[1:]
		g.mu.Unlock()
		g.dispatch(c, scratch)
	}
}

func (g *Gateway) pickAvailableLocked() bool {
	for _, b := range g.backends {
		if b.available() {
			return true
		}
	}
	return false
}

// StopAccepting closes every listener this gateway serves (its copies: under tableflip the
// listening sockets live on in the next batond).
func (g *Gateway) StopAccepting() {
	g.mu.Lock()
	ls := g.listeners
	g.listeners = nil
	g.stopping = true
	g.mu.Unlock()
	for _, l := range ls {
		l.Close()
	}
	// A loop may be between accept4 and its dispatch: wait, so WaitIdle counts that one too.
	g.serving.Wait()
}

// WaitIdle waits until every accepted connection has been acked or closed, or ctx ends; then
// it closes what still waits for a worker (ReasonShutdown).
func (g *Gateway) WaitIdle(ctx context.Context) {
	g.mu.Lock()
	var idle chan struct{}
	if g.inflight > 0 {
		if g.idle == nil {
			g.idle = make(chan struct{})
		}
		idle = g.idle
	}
	g.mu.Unlock()
	if idle != nil {
		select {
		case <-idle:
		case <-ctx.Done():
		}
	}
	g.closeWaiting()
}

// closeWaiting closes every connection still waiting for a worker (ReasonShutdown).
func (g *Gateway) closeWaiting() {
	g.mu.Lock()
	w := append(g.waiting, g.mig.waiting...)
	g.waiting, g.mig.waiting = nil, nil
	g.mu.Unlock()
	for _, c := range w {
		g.closeConn(c, ReasonShutdown)
	}
}

// Close stops housekeeping. Backends stay as they are; callers drain them first.
//
// Connections still waiting for a worker (for example re-dispatched from a worker killed
// during shutdown) are closed with ReasonShutdown: nothing is left uncounted.
func (g *Gateway) Close() {
	select {
	case <-g.quit:
	default:
		close(g.quit)
	}
	<-g.done
	g.mu.Lock()
	g.closed = true // no kills.Add after this: Add racing with Wait is not allowed
	g.mu.Unlock()
	g.kills.Wait()
	g.mu.Lock()
	hs := g.hs
	g.mu.Unlock()
	if hs != nil {
		hs.close()
	}
	g.closeWaiting()
	// Housekeeping has ended: what its summary has not said yet is said now.
	g.flushSummary(time.Now(), true)
}

// Stats returns a snapshot of the counters.
func (g *Gateway) Stats() Stats {
	g.mu.Lock()
	defer g.mu.Unlock()
	s := Stats{
		Accepted:     g.stats.accepted.Load(),
		Acked:        g.stats.acked.Load(),
		Redispatched: g.stats.redispatched.Load(),
		AcceptErrors: g.stats.acceptErrors.Load(),
		Closed:       make(map[string]uint64, numReasons),
		InFlight:     g.inflight - g.mig.inflight,
	}
	for r := CloseReason(0); r < numReasons; r++ {
		s.Closed[r.String()] = g.stats.closed[r].Load()
	}
	return s
}

// Backends returns a snapshot of every registered backend.
func (g *Gateway) Backends() []BackendStatus {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]BackendStatus, 0, len(g.backends))
	for _, b := range g.backends {
		out = append(out, b.statusLocked())
	}
	return out
}

// ListenerAddrs returns the addresses being served.
func (g *Gateway) ListenerAddrs() []netip.AddrPort {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []netip.AddrPort
	for _, l := range g.listeners {
		out = append(out, l.local)
	}
	return out
}

// PingInterval is the interval workers are told in WELCOME.
func (g *Gateway) PingInterval() time.Duration { return g.cfg.PingInterval }

// ErrSelfCheck is returned when the end-to-end probe is not acknowledged.
var ErrSelfCheck = errors.New("end-to-end handoff check failed")

// SelfCheck proves the whole path works before batond declares itself ready: it connects to a
// private loopback listener, hands the accepted socket to a worker exactly as a client's, and
// waits for the worker's ACK. The probe then hangs up, like a client that leaves at once.
func (g *Gateway) SelfCheck(ctx context.Context) error {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrSelfCheck, err)
	}
	defer ln.Close()
	client, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		return fmt.Errorf("%w: %v", ErrSelfCheck, err)
	}
	defer client.Close()
	server, err := ln.AcceptTCP()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrSelfCheck, err)
	}
	// A private CLOEXEC duplicate for the worker; the net.Conn (and its poller registration)
	// goes away at once.
	raw, err := server.SyscallConn()
	fd, derr := -1, error(nil)
	if err == nil {
		err = raw.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) })
	}
	server.Close()
	if err == nil {
		err = derr
	}
	if err == nil {
		// Go's accepted socket is non-blocking; a worker gets blocking fds (PROTOCOL.md).
		if err = unix.SetNonblock(fd, false); err != nil {
			unix.Close(fd)
		}
	}
	if err != nil {
		return fmt.Errorf("%w: dup: %w", ErrSelfCheck, err)
	}
	c := &clientConn{fd: fd, since: time.Now(), selfCheck: make(chan struct{})}
	c.info = handoff.ConnInfo{ID: g.epoch | g.seq.Add(1)&0xffffffff,
		Client: client.LocalAddr().(*net.TCPAddr).AddrPort(), Local: ln.Addr().(*net.TCPAddr).AddrPort(), Listener: "baton-selfcheck"}
	g.mu.Lock()
	g.inflight++
	g.mu.Unlock()
	scratch := make([]byte, 0, handoff.MaxMessage)
	g.dispatch(c, &scratch)
	select {
	case <-c.selfCheck:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%w: no worker acknowledged it: %v", ErrSelfCheck, ctx.Err())
	}
}
