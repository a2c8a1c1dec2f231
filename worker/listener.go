package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/baton-gw/baton/handoff"
)

// Listener is a net.Listener whose connections are handed over by batond. It also speaks for
// the worker to batond: see the package documentation. All its methods are safe for concurrent
// use.
//
// The Listener runs one goroutine while registered (two while connected to batond); they end
// when Close returns, except as described at Close.
type Listener struct {
	opts options
	env  env
	addr net.Addr
	log  *slog.Logger
	fb   net.Listener // non-nil in fallback mode: accept from here instead of batond
	// pipes are the splice pipes of this Listener's connections (io.Copy between sockets).
	pipes *pipePool

	avail      chan struct{} // capacity 1: "the queue may be non-empty", for Accept
	acceptDone chan struct{} // closed once Accept must not wait any more (closed, draining, fatal)
	drainCh    chan struct{} // closed on the first DRAIN
	quit       chan struct{} // closed when the registration ends (shutdown)
	done       chan struct{} // closed when the registration goroutine has exited
	quitOnce   sync.Once

	mu            sync.Mutex
	queue         []*Conn // delivered, not yet accepted
	open          int     // connections handed to this process and not yet closed (queued included)
	idle          chan struct{}
	idleClosed    bool     // idle is closed: open is 0
	pending       []uint64 // ids whose CLOSED batond has not received yet
	ready         bool     // READY requested (sent, or to be sent, or flagged in HELLO)
	draining      bool
	drainDeadline time.Time
	closed        bool  // Close was called
	gaveUp        bool  // Accept has returned ErrDraining: nobody will accept again
	fatal         error // batond refused this worker for good
	lingering     bool  // closed while draining: stay registered until the last conn closes
	lingerTimer   *time.Timer
	quitting      bool             // shutdown has begun: no new session may start
	cur           *session         // the registered channel, nil while disconnected
	dialing       *handoff.Channel // a channel mid-handshake, so that shutdown can abort it
	acceptDoneSet bool             // acceptDone is closed
	nextID        uint64           // fallback mode: local connection ids
	// conns are the connections counted in open, by id: what a MIGRATE may name.
	conns map[uint64]*connState
}

var _ net.Listener = (*Listener)(nil)

// Listen registers this process with batond and returns the Listener that yields the client
// connections batond hands over.
//
// It reads BATON_SOCKET, BATON_WORKER, BATON_GENERATION and BATON_TOKEN, connects, sends HELLO
// and waits for WELCOME. If batond answers ERROR, the error returned wraps the *handoff.Error
// (use errors.As). Without BATON_SOCKET it returns an error wrapping ErrNotUnderBaton, unless a
// fallback address is configured (WithFallback or BATON_FALLBACK_LISTEN): then it listens on
// that TCP address and the returned Listener behaves the same minus batond (Draining never
// fires).
//
// The worker becomes eligible for connections when it reports READY: automatically on the
// first call to Accept, or earlier with Ready.
//
// If the channel drops later, the Listener re-registers by itself, with backoff, keeping every
// connection. A final rejection (VERSION, TOKEN, PEER or SLOT: handoff.ErrorCode.Final) ends the
// registration for good: Accept and Ready then return it, wrapping the *handoff.Error. Every
// other ERROR from batond (SHUTDOWN, say) ends only the channel, and the Listener registers
// again.
//
// Listen leaves the process's signal dispositions alone, SIGPIPE included. A worker's stdout and
// stderr are a pipe that outlives the batond that started it (batond leaves the pipe's read end
// open in the worker, at fd 3, BATON_OUTPUT_FD), so writing a log line never raises SIGPIPE, and
// Go's runtime already turns SIGPIPE on every other descriptor into an EPIPE error. Do not close
// fd 3 (PROTOCOL.md, "Worker output").
func Listen(opts ...Option) (*Listener, error) {
	o := options{handshakeTimeout: defaultHandshakeTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	if o.log == nil {
		o.log = slog.New(slog.DiscardHandler)
	}
	e, err := readEnv()
	if err != nil {
		return nil, fmt.Errorf("worker: %w", err)
	}
	l := &Listener{
		pipes:      newPipePool(),
		opts:       o,
		env:        e,
		log:        o.log,
		avail:      make(chan struct{}, 1),
		acceptDone: make(chan struct{}),
		drainCh:    make(chan struct{}),
		quit:       make(chan struct{}),
		done:       make(chan struct{}),
		idle:       make(chan struct{}),
		idleClosed: true,
		conns:      map[uint64]*connState{},
	}
	close(l.idle)

	if e.socket == "" {
		addr := o.fallback
		if v := os.Getenv(envFallback); v != "" {
			addr = v
		}
		if addr == "" {
			return nil, fmt.Errorf("worker: %w", ErrNotUnderBaton)
		}
		fb, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("worker: fallback listener (not started by batond): %w", err)
		}
		l.fb, l.addr = fb, fb.Addr()
		close(l.done) // no registration goroutine in fallback mode
		return l, nil
	}

	l.addr = &net.UnixAddr{Name: e.socket, Net: "unixpacket"}
	s, err := l.register()
	if err != nil {
		return nil, fmt.Errorf("worker: register with batond at %s: %w", e.socket, err)
	}
	go l.run(s)
	return l, nil
}

// Accept waits for and returns the next connection handed to this worker, as a *Conn.
//
// The first call reports READY to batond (see Ready). After DRAIN, Accept returns every
// connection already delivered, then an error wrapping ErrDraining (and so net.ErrClosed). After
// Close it returns an error wrapping net.ErrClosed at once. If batond rejected this worker for
// good (a wrong token or protocol version, a disallowed peer, a slot that belongs to another
// process), it returns that rejection, wrapping the *handoff.Error; the program should exit
// once its sessions end.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.AcceptConn()
	if err != nil {
		return nil, err // a typed nil *Conn must not become a non-nil net.Conn
	}
	return c, nil
}

// AcceptConn is Accept returning the concrete type.
func (l *Listener) AcceptConn() (*Conn, error) {
	if l.fb != nil {
		return l.acceptFallback()
	}
	// Its error is not ours to return here: the loop below reports closed and fatal states, and
	// after a rejection the connections already delivered must still be handed out first.
	_ = l.Ready()
	for {
		l.mu.Lock()
		switch {
		case l.closed:
			l.mu.Unlock()
			return nil, l.opError("accept", net.ErrClosed)
		case len(l.queue) > 0:
			c := l.queue[0]
			l.queue[0] = nil // do not keep an accepted Conn reachable from the backing array
			l.queue = l.queue[1:]
			more := len(l.queue) > 0
			l.mu.Unlock()
			if more {
				l.signalAvail() // another Accept may be waiting
			}
			return c, nil
		case l.fatal != nil:
			err := l.fatal
			l.mu.Unlock()
			return nil, l.opError("accept", err)
		case l.draining:
			l.gaveUp = true
			l.mu.Unlock()
			return nil, l.opError("accept", ErrDraining)
		}
		l.mu.Unlock()
		select {
		case <-l.avail:
		case <-l.acceptDone:
		}
	}
}

func (l *Listener) acceptFallback() (*Conn, error) {
	c, err := l.fb.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.nextID++
	info := handoff.ConnInfo{ID: l.nextID}
	cn := newConn(l, c, &info, false)
	l.holdLocked(cn.st)
	l.mu.Unlock()
	return cn, nil
}

// Ready tells batond that this worker is serving, which makes it eligible for connections. Accept
// calls it on its first call, so most programs never need it; call it yourself when the accept
// loop starts later than the point where the program can take connections (they wait in the
// Listener until accepted). It is idempotent. The flag survives re-registration (HELLO carries
// it). It returns an error only if the Listener is closed or was rejected by batond.
func (l *Listener) Ready() error {
	if l.fb != nil {
		return nil
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return net.ErrClosed
	}
	if l.fatal != nil {
		err := l.fatal
		l.mu.Unlock()
		return err
	}
	if l.ready {
		l.mu.Unlock()
		return nil
	}
	l.ready = true
	s := l.cur
	l.mu.Unlock()
	if s != nil {
		s.flushSoon()
	}
	return nil
}

// Close stops accepting: Accept returns an error wrapping net.ErrClosed. Connections delivered
// but not yet accepted are closed; connections already accepted stay open and the program keeps
// owning them.
//
// Close ends the registration with batond, which then stops handing connections to this
// process. One exception: while draining (after DRAIN, when batond sends no more connections),
// the registration stays until the last connection is closed or the drain deadline passes, so
// that batond keeps seeing each close and this worker keeps answering PING. This matters because
// http.Serve closes its listener as soon as Accept fails, that is, right at DRAIN.
func (l *Listener) Close() error {
	if l.fb != nil {
		return l.fb.Close()
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return l.opError("close", net.ErrClosed)
	}
	l.closed = true
	l.signalAcceptDoneLocked()
	queued := l.queue
	l.queue = nil
	held := l.open - len(queued)
	if l.draining && held > 0 && time.Now().Before(l.drainDeadline) && !l.quitting {
		l.lingering = true
		l.lingerTimer = time.AfterFunc(time.Until(l.drainDeadline), l.shutdown)
	}
	linger := l.lingering
	l.mu.Unlock()

	for _, c := range queued {
		c.Close() // reports CLOSED: batond counted them when they were acked
	}
	if linger {
		return nil // release ends the registration when the last connection closes
	}
	l.shutdown()
	<-l.done
	return nil
}

// Addr is the registration socket's address (a *net.UnixAddr), or in fallback mode the TCP
// address listened on. Under batond the public addresses are batond's, not the worker's.
func (l *Listener) Addr() net.Addr { return l.addr }

// Draining is closed when batond tells this worker to drain: no new connections will come, and
// the process should exit once its sessions end (see Wait), before DrainDeadline.
func (l *Listener) Draining() <-chan struct{} { return l.drainCh }

// DrainDeadline is when batond will stop this worker (SIGTERM, then SIGKILL) if it has not
// exited by then. It is the zero time until DRAIN arrives. A later DRAIN replaces it, earlier or
// later (a worker of an old generation is drained again by each batond it re-registers with,
// and the latest one enforces its own deadline), so read it again rather than keep a copy.
func (l *Listener) DrainDeadline() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.drainDeadline
}

// Wait waits until every connection handed to this process has been closed (Live is 0), or until
// ctx is done, and then returns ctx.Err(). Call it after the accept loop has stopped (after
// DRAIN or Close); while connections keep arriving it may return at any moment Live touches 0.
func (l *Listener) Wait(ctx context.Context) error {
	l.mu.Lock()
	idle := l.idle
	l.mu.Unlock()
	select {
	case <-idle:
		return nil // checked first: with both ready, select would pick at random
	default:
	}
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Live is the number of connections this process holds: handed over (or accepted, in fallback
// mode) and not yet closed or handed back (Conn.HandBack), including those waiting for Accept.
func (l *Listener) Live() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open
}

// Slot is this worker's slot (BATON_WORKER); 0 in fallback mode.
func (l *Listener) Slot() int { return int(l.env.slot) }

// Generation is the generation that started this worker (BATON_GENERATION); 0 in fallback mode.
func (l *Listener) Generation() uint64 { return l.env.generation }

// opError shapes an error the way net's listeners do, so that code written for them (checks of
// net.ErrClosed, *net.OpError) keeps working.
func (l *Listener) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: l.addr.Network(), Addr: l.addr, Err: err}
}

func (l *Listener) signalAvail() {
	select {
	case l.avail <- struct{}{}:
	default:
	}
}

func (l *Listener) signalAcceptDoneLocked() {
	if !l.acceptDoneSet {
		l.acceptDoneSet = true
		close(l.acceptDone)
	}
}

// holdLocked counts one more connection held by this process.
func (l *Listener) holdLocked(st *connState) {
	l.open++
	l.conns[st.id] = st
	if l.idleClosed {
		l.idle = make(chan struct{})
		l.idleClosed = false
	}
}

// deliver queues a handed-off connection for Accept. If no Accept will ever come (closed, or the
// accept loop already stopped on ErrDraining: a CONN that crossed DRAIN on the wire), the
// connection is closed at once, which reports it to batond as closed, rather than held forever
// where nobody serves it and Wait never returns.
func (l *Listener) deliver(c *Conn) {
	l.mu.Lock()
	l.holdLocked(c.st)
	if l.closed || l.gaveUp {
		l.mu.Unlock()
		c.Close()
		return
	}
	l.queue = append(l.queue, c)
	l.mu.Unlock()
	l.signalAvail()
}

// release is called once per connection when it is closed or handed back: it counts it and,
// under batond, queues its CLOSED (report) and sends it at once.
func (l *Listener) release(st *connState, report bool) {
	id := st.id
	l.mu.Lock()
	l.open--
	if l.conns[id] == st {
		delete(l.conns, id)
	}
	st.ask = nil
	if report {
		l.pending = append(l.pending, id)
	}
	s := l.cur
	zero := l.open == 0
	endLinger := zero && l.lingering
	l.mu.Unlock()

	switch {
	case !report || s == nil:
	case zero:
		// The last one: sent before Wait wakes (below), so a program that exits then does not
		// lose it.
		s.flushSoon()
	default:
		// The session's writer sends it. When many connections close together, it finds them
		// all pending and sends one CLOSED for the lot instead of one sendmsg each.
		s.wake()
	}
	if endLinger {
		l.shutdown()
	}
	// Wake Wait only now, after the CLOSED went out, so that a program that exits as soon as
	// Wait returns does not lose its last CLOSED. open is checked again: a connection may have
	// arrived meanwhile.
	if zero {
		l.mu.Lock()
		if l.open == 0 && !l.idleClosed {
			l.idleClosed = true
			close(l.idle)
		}
		l.mu.Unlock()
	}
}

// reportUnusable accounts for a handed-off fd that could not become a connection: it was acked
// (batond counted it), so it must be reported closed.
func (l *Listener) reportUnusable(id uint64) {
	l.mu.Lock()
	l.pending = append(l.pending, id)
	s := l.cur
	l.mu.Unlock()
	if s != nil {
		s.flushSoon()
	}
}

// fail records a rejection that re-registering cannot fix and ends the registration.
func (l *Listener) fail(err error) {
	l.mu.Lock()
	if l.fatal == nil {
		l.fatal = err
	}
	l.signalAcceptDoneLocked()
	l.mu.Unlock()
	l.shutdown()
}

// shutdownFlushTimeout bounds the last flush of CLOSED when the registration ends, so that a
// wedged batond cannot make Close hang.
const shutdownFlushTimeout = 250 * time.Millisecond

// shutdown ends the registration: no new session starts, a channel mid-handshake is closed, and
// the current session ends after the message in hand (a CONN being delivered is still counted)
// and a last, bounded flush of CLOSED (see serve). It does not wait (Close does), so any
// goroutine may call it, the reader included.
func (l *Listener) shutdown() {
	l.quitOnce.Do(func() {
		l.mu.Lock()
		l.quitting = true
		s, dialing := l.cur, l.dialing
		if l.lingerTimer != nil {
			l.lingerTimer.Stop()
		}
		l.mu.Unlock()
		close(l.quit)
		if s != nil {
			// Wake the reader; free a writer stuck in Send (it holds the flush lock).
			now := time.Now()
			s.ch.Conn().SetReadDeadline(now)
			s.ch.Conn().SetWriteDeadline(now.Add(shutdownFlushTimeout))
		}
		if dialing != nil {
			dialing.Close()
		}
	})
}

// finalRejection says whether err is batond's rejection of this worker for good: re-sending
// the same HELLO cannot succeed (handoff.ErrorCode.Final, PROTOCOL.md "Errors").
func finalRejection(err error) bool {
	var he *handoff.Error
	return errors.As(err, &he) && he.Code.Final()
}
