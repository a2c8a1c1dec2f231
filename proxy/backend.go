package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/handoff"
)

// Process is how the gateway stops a worker it can no longer trust with connections.
type Process interface {
	// KillAndWait sends SIGKILL (through a pidfd) and returns once the process has exited, or
	// with an error if that cannot be confirmed before ctx ends.
	KillAndWait(ctx context.Context) error
}

// BackendInfo describes a registered worker, from its HELLO.
type BackendInfo struct {
	Slot       int
	Generation uint64
	PID        int
	Capacity   int  // 0: the gateway's default
	Ready      bool // HELLO carried the READY flag
	Draining   bool // HELLO carried the DRAINING flag
	Live       int  // connections it already holds (re-registration)
	Nonblock   bool // wants its CONN fds non-blocking (HELLO NONBLOCK, granted in WELCOME)
	Batch      bool // takes CONNS, several connections in one message (HELLO BATCH, granted)
	Migrate    bool // answers MIGRATE and takes RESUME (HELLO MIGRATE, granted)
}

// Backend is one registered worker as the gateway sees it: its channel, its counts, and the
// connections handed to it but not yet acked (still owned by the gateway).
type Backend struct {
	g        *Gateway
	info     BackendInfo
	ch       *handoff.Channel
	proc     Process
	log      hclog.Logger
	capacity int
	readyC   chan struct{}
	doneC    chan struct{}
	poll     chan struct{} // capacity 1: the accept loop's prod to collect ACKs and CLOSEDs
	since    time.Time

	// guarded by g.mu
	ready, draining, gone, full bool
	// refusing: the worker REFUSEd a connection (out of descriptors); it gets none until it
	// reports a CLOSED.
	refusing           bool
	live               int // acked − closed (+ reported at registration)
	acked, closed      uint64
	pending            map[uint64]*clientConn
	lastSeen, lastPing time.Time
	lastAck            time.Time // last ACK (or registration)
	err                error
	drainDeadline      time.Time
}

// BackendStatus is a snapshot of a Backend.
type BackendStatus struct {
	Slot          int       `json:"slot"`
	Generation    uint64    `json:"generation"`
	PID           int       `json:"pid"`
	Capacity      int       `json:"capacity"`
	Ready         bool      `json:"ready"`
	Draining      bool      `json:"draining"`
	Refusing      bool      `json:"refusing,omitempty"` // REFUSEd a connection (out of fds) lately
	Live          int       `json:"clients"`
	Pending       int       `json:"pending"`
	Acked         uint64    `json:"acked"`
	Closed        uint64    `json:"closed"`
	Registered    time.Time `json:"registered"`
	DrainDeadline time.Time `json:"drain_deadline,omitzero"`
}

// Add registers a worker whose handshake the caller has completed (WELCOME sent) and starts
// reading its channel. The Backend owns ch from now on. proc may be nil only for processes
// that cannot be signalled; then a failure with unacked connections closes them instead of
// re-dispatching (their owner cannot be confirmed dead).
func (g *Gateway) Add(info BackendInfo, ch *handoff.Channel, proc Process) *Backend {
	now := time.Now()
	b := &Backend{
		g: g, info: info, ch: ch, proc: proc,
		log:      g.log.Named("worker").With("slot", info.Slot, "pid", info.PID, "gen", info.Generation),
		capacity: info.Capacity,
		readyC:   make(chan struct{}),
		doneC:    make(chan struct{}),
		poll:     make(chan struct{}, 1),
		since:    now,
		live:     info.Live,
		pending:  make(map[uint64]*clientConn),
		lastSeen: now,
		lastAck:  now,
		lastPing: now,
		draining: info.Draining,
	}
	if b.capacity <= 0 {
		b.capacity = g.cfg.DefaultCapacity
	}
	if info.Ready {
		b.ready = true
		close(b.readyC)
	}
	g.mu.Lock()
	g.backends = append(g.backends, b)
	g.mu.Unlock()
	go b.read()
	g.poke()
	return b
}

// Info returns what the worker said in its HELLO.
func (b *Backend) Info() BackendInfo { return b.info }

// ReadyC is closed when the worker has sent READY.
func (b *Backend) ReadyC() <-chan struct{} { return b.readyC }

// Done is closed when the backend has been removed and its unacked connections dealt with.
func (b *Backend) Done() <-chan struct{} { return b.doneC }

// Err says why the backend ended (valid after Done).
func (b *Backend) Err() error {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	return b.err
}

// Clients returns the connections handed to the worker: live, and sent but not yet acked (an
// operator's count: the worker has them, batond has not collected its ACK yet).
func (b *Backend) Clients() int {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	return b.load()
}

// Live returns the worker's live connection count (acked − closed).
func (b *Backend) Live() int {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	return b.live
}

// Capacity returns the most connections the worker takes at once (its HELLO's, or the
// gateway's default). It never changes.
func (b *Backend) Capacity() int { return b.capacity }

// Status returns a snapshot.
func (b *Backend) Status() BackendStatus {
	b.g.mu.Lock()
	defer b.g.mu.Unlock()
	return b.statusLocked()
}

func (b *Backend) statusLocked() BackendStatus {
	return BackendStatus{
		Slot: b.info.Slot, Generation: b.info.Generation, PID: b.info.PID, Capacity: b.capacity,
		Ready: b.ready, Draining: b.draining, Refusing: b.refusing, Live: b.live, Pending: len(b.pending),
		Acked: b.acked, Closed: b.closed, Registered: b.since, DrainDeadline: b.drainDeadline,
	}
}

func (b *Backend) available() bool {
	return b.ready && !b.draining && !b.gone && !b.full && !b.refusing && b.load() < b.capacity
}

func (b *Backend) load() int { return b.live + len(b.pending) }

// Drain tells the worker to take no more connections and to finish within deadline. The
// gateway stops sending it connections at once.
func (b *Backend) Drain(deadline time.Duration) error {
	b.g.mu.Lock()
	if b.gone {
		b.g.mu.Unlock()
		return ErrChannel
	}
	b.draining = true
	b.drainDeadline = time.Now().Add(deadline)
	b.g.mu.Unlock()
	// Never a blocking Send on a live backend: a parked write holds the socket's write lock,
	// and every TrySend (pings, CONN, ERROR) would then wait behind it.
	err := b.ch.TrySend(handoff.AppendDrain(nil, &handoff.Drain{Deadline: deadline}), -1)
	if errors.Is(err, handoff.ErrWouldBlock) {
		b.g.fail(b, fmt.Errorf("%w: its queue is full at DRAIN", ErrStalled), handoff.CodeStalled)
	}
	return err
}

// Kick ends the backend as if its channel had failed (used by the supervisor when the process
// behind it is being replaced).
func (b *Backend) Kick(err error) { b.g.fail(b, err, 0) }

// exitGrace bounds how long Exited lets the reader finish a dead worker's channel.
const exitGrace = time.Second

// Exited ends the backend of a worker whose process has exited, once its reader has taken
// what the worker sent before it died (the channel then ends by itself; what is still queued
// may be a HANDBACK, whose socket nobody else holds), or after exitGrace if the channel stays
// open (a child of the worker still holds it).
func (b *Backend) Exited(err error) {
	t := time.NewTimer(exitGrace)
	defer t.Stop()
	select {
	case <-b.doneC:
	case <-t.C:
	}
	b.g.fail(b, err, 0)
}

// recv returns the worker's next message. While the gateway is accepting (busy), the reader
// does not park on the channel: every ACK and CLOSED would then wake batond on its own, and at
// a few thousand connections a second those wake-ups cost more than the handoffs. It collects
// what has arrived whenever the accept loop prods it (at most every pollEvery) or busyWindow
// has passed. Idle, it parks on the channel as usual, so an idle batond is never woken.
func (b *Backend) recv(buf []byte, t *time.Timer) ([]byte, int, error) {
	for {
		if !b.g.busy() {
			return b.ch.Recv(buf)
		}
		msg, fd, err := b.ch.TryRecv(buf)
		if !errors.Is(err, handoff.ErrWouldBlock) {
			return msg, fd, err
		}
		t.Reset(busyWindow)
		select {
		case <-b.poll:
		case <-t.C:
		}
		t.Stop()
	}
}

// read is the backend's one reader: ACK, CLOSED, REFUSE, READY, PONG; anything else, or a
// protocol error, ends it.
func (b *Backend) read() {
	size := handoff.MaxMessage
	if b.info.Migrate {
		size = handoff.MaxLargeMessage // HANDBACK
	}
	buf := make([]byte, size)
	m := &msgScratch{ids: make([]uint64, 0, 64), fds: make([]int, 0, 64)}
	t := time.NewTimer(busyWindow)
	t.Stop()
	reset := false
	for {
		msg, fd, err := b.recv(buf, t)
		if errors.Is(err, unix.ECONNRESET) && !reset {
			// A worker that exits with unread messages in its own queue resets the channel,
			// and the kernel reports that before the messages it sent last (a HANDBACK, a
			// CLOSED): read on until the end of the stream.
			reset = true
			continue
		}
		if errors.Is(err, handoff.ErrNoFD) && len(msg) > 0 && handoff.Type(msg[0]) == handoff.TypeHandback {
			err = nil // batond is out of descriptors: onHandback counts the session lost
		}
		if err != nil {
			code := handoff.RecvErrorCode(err)
			switch {
			case errors.Is(err, io.EOF), errors.Is(err, unix.ECONNRESET):
				err = ErrChannel
			case code != 0:
				err = fmt.Errorf("%w: %w", ErrProtocol, err)
			default:
				err = fmt.Errorf("%w: %w", ErrChannel, err)
			}
			b.g.fail(b, err, code)
			return
		}
		m.fd = fd
		code, err := b.handle(msg, m)
		if m.fd >= 0 {
			unix.Close(m.fd) // only HANDBACK carries an fd to the gateway, and its handler took it
		}
		if err != nil {
			b.g.fail(b, err, code)
			return
		}
	}
}

// msgScratch is the reader's reusable space: a handoff allocates nothing.
type msgScratch struct {
	ids []uint64
	fds []int
	fd  int    // the fd that came with the message, -1 if none; a handler that keeps it sets -1
	out []byte // for re-dispatching a handed-back session
}

// protocolErr is what a handler returns for a worker that broke the protocol: the error and the
// ERROR code it is told.
func protocolErr(code handoff.ErrorCode, err error) (handoff.ErrorCode, error) {
	return code, fmt.Errorf("%w: %w", ErrProtocol, err)
}

// handle acts on one message from the worker; a non-nil error ends the backend (with the code
// the worker is told, 0 for none).
func (b *Backend) handle(msg []byte, m *msgScratch) (handoff.ErrorCode, error) {
	typ, body, err := handoff.Split(msg)
	if err != nil {
		return protocolErr(handoff.CodeMalformed, err)
	}
	now := time.Now()
	switch typ {
	case handoff.TypeAck, handoff.TypeClosed, handoff.TypeRefuse:
		if m.ids, err = handoff.ParseIDs(m.ids[:0], typ, body); err != nil {
			return protocolErr(handoff.CodeMalformed, err)
		}
		switch typ {
		case handoff.TypeAck:
			return b.onAck(m, now)
		case handoff.TypeClosed:
			return b.onClosed(m.ids, now)
		default:
			if err := b.refused(m.ids, now); err != nil {
				return handoff.CodeUnexpected, err
			}
		}
	case handoff.TypeHandback:
		fd := m.fd
		m.fd = -1
		return b.onHandback(body, fd, now, &m.out)
	case handoff.TypeDecline:
		if m.ids, err = handoff.ParseIDs(m.ids[:0], typ, body); err != nil {
			return protocolErr(handoff.CodeMalformed, err)
		}
		b.onDecline(m.ids)
	case handoff.TypeReady:
		b.onReady(now)
	case handoff.TypePong:
		if _, err := handoff.ParseNonce(typ, body); err != nil {
			return protocolErr(handoff.CodeMalformed, err)
		}
		b.g.mu.Lock()
		// A worker that refused may have freed descriptors without closing a client (or
		// hold none to close): it gets another chance each ping interval, not never.
		b.lastSeen, b.full, b.refusing = now, false, false
		b.g.mu.Unlock()
	case handoff.TypeError:
		e, perr := handoff.ParseError(body)
		if perr != nil {
			return protocolErr(handoff.CodeMalformed, perr)
		}
		return 0, fmt.Errorf("%w: worker sent %w", ErrChannel, e)
	default:
		if typ.Optional() {
			return 0, nil
		}
		code := handoff.CodeUnexpected
		if !typ.Known() {
			code = handoff.CodeUnknownType
		}
		return protocolErr(code, fmt.Errorf("unexpected %s", typ))
	}
	return 0, nil
}

// onAck moves acknowledged connections to the worker: it owns them now.
func (b *Backend) onAck(m *msgScratch, now time.Time) (handoff.ErrorCode, error) {
	m.fds = m.fds[:0]
	b.g.mu.Lock()
	var unknown uint64
	clients := 0
	for _, id := range m.ids {
		c := b.pending[id]
		if c == nil {
			unknown = id
			break
		}
		delete(b.pending, id)
		m.fds = append(m.fds, c.fd)
		b.live++
		b.acked++
		switch {
		case c.selfCheck != nil:
			close(c.selfCheck)
		case c.resume != nil:
			b.g.stats.mig.resumed.Add(1)
			b.g.mig.inflight--
		default:
			clients++
			b.g.handoffLat.observe(now.Sub(c.since))
		}
		b.g.freeConnLocked(c)
	}
	b.lastSeen, b.lastAck, b.full = now, now, false
	// Handed-back sessions wait when every worker's channel was full: an ACK frees room, so
	// they go now rather than at the next housekeeping tick.
	resumeQueued := len(b.g.mig.waiting) > 0
	b.g.mu.Unlock()
	if resumeQueued {
		b.g.poke()
	}
	// Drop the gateway's copies, and only then count them out of flight: "nothing in flight"
	// (WaitIdle, status) means batond holds none of them any more.
	for _, fd := range m.fds {
		closeFD(fd)
	}
	b.g.mu.Lock()
	// Counted under the lock with in-flight, so Stats is a consistent snapshot.
	b.g.stats.acked.Add(uint64(clients))
	b.g.doneInflightLocked(len(m.fds))
	b.g.mu.Unlock()
	if unknown != 0 {
		return protocolErr(handoff.CodeUnexpected, fmt.Errorf("ACK for connection %#x never sent to it", unknown))
	}
	return 0, nil
}

// onClosed counts the worker's clients that left.
func (b *Backend) onClosed(ids []uint64, now time.Time) (handoff.ErrorCode, error) {
	b.g.mu.Lock()
	b.lastSeen, b.full, b.refusing = now, false, false
	over := len(ids) > b.live
	if !over {
		b.live -= len(ids)
		b.closed += uint64(len(ids))
	}
	// Freed capacity matters only to connections waiting for it; waking the housekeeper on
	// every close would cost a goroutine switch per connection.
	queued := len(b.g.waiting) > 0 || len(b.g.mig.waiting) > 0
	b.g.mu.Unlock()
	if over {
		return protocolErr(handoff.CodeUnexpected, errors.New("CLOSED for more connections than it holds"))
	}
	if queued {
		b.g.poke()
	}
	return 0, nil
}

func (b *Backend) onReady(now time.Time) {
	b.g.mu.Lock()
	first := !b.ready
	b.ready, b.lastSeen, b.full = true, now, false
	b.g.mu.Unlock()
	if first {
		close(b.readyC)
	}
	b.g.poke()
}

// refused takes back connections the worker could not receive (REFUSE: its fd never reached
// it, so nobody but the gateway holds the socket) and gives them to other workers, as after a
// failed send. The worker gets no more until it reports a CLOSED.
func (b *Backend) refused(ids []uint64, now time.Time) error {
	b.g.mu.Lock()
	for _, id := range ids {
		if b.pending[id] == nil {
			// All or nothing: fail() then deals with what is still pending.
			b.g.mu.Unlock()
			return fmt.Errorf("%w: REFUSE for connection %#x never sent to it (or acked)", ErrProtocol, id)
		}
	}
	back := make([]*clientConn, 0, len(ids))
	for _, id := range ids {
		back = append(back, b.pending[id])
		delete(b.pending, id)
	}
	b.lastSeen, b.refusing = now, true
	b.g.mu.Unlock()
	b.log.Warn("worker could not receive connections (out of file descriptors?); handing them to others", "count", len(back))
	b.g.redispatch(back)
	return nil
}

// redispatch gives connections taken back from a worker (failed, or refusing them) to other
// workers, or closes those that have been handed out MaxAttempts times already.
func (g *Gateway) redispatch(cs []*clientConn) {
	scratch := make([]byte, 0, handoff.MaxMessage)
	for _, c := range cs {
		if c.attempts >= g.cfg.MaxAttempts {
			g.closeConn(c, ReasonRetries)
			continue
		}
		g.stats.redispatched.Add(1)
		g.dispatch(c, &scratch)
	}
}

// fail removes b. A protocol error (code != 0) is reported to the worker before the channel
// closes. If the worker broke the protocol or still had unacked connections, it is killed and
// waited for before those connections go to another worker: no socket is read by two workers.
func (g *Gateway) fail(b *Backend, err error, code handoff.ErrorCode) {
	g.mu.Lock()
	if b.gone {
		g.mu.Unlock()
		return
	}
	b.gone = true
	b.err = err
	for i, x := range g.backends {
		if x == b {
			g.backends = append(g.backends[:i], g.backends[i+1:]...)
			break
		}
	}
	pend := make([]*clientConn, 0, len(b.pending))
	for _, c := range b.pending {
		pend = append(pend, c)
	}
	b.pending = nil
	g.mig.forgetLocked(b, true, true)
	joined := !g.closed
	if joined {
		g.kills.Add(1)
	}
	g.mu.Unlock()

	if code != 0 {
		b.ch.SendError(code, err.Error())
	}
	b.ch.Close()
	kill := code != 0 || len(pend) > 0
	level := hclog.Info
	if code != 0 || errors.Is(err, ErrStalled) || errors.Is(err, ErrNoPong) {
		level = hclog.Error
	}
	b.log.Log(level, "worker disconnected", "reason", err, "unacked", len(pend), "kill", kill)
	go func() {
		if joined {
			defer g.kills.Done()
		}
		defer close(b.doneC)
		if !kill {
			return
		}
		confirmed := false
		if b.proc != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			kerr := b.proc.KillAndWait(ctx)
			cancel()
			if kerr != nil {
				b.log.Error("could not confirm the worker is dead", "error", kerr)
			} else {
				confirmed = true
			}
		}
		if !confirmed {
			for _, c := range pend {
				g.closeConn(c, ReasonWorkerLost)
			}
			return
		}
		g.redispatch(pend)
	}()
}
