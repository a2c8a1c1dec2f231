package worker

import (
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/handoff"
)

// Re-registration backoff (PROTOCOL.md §8): quick enough that a restarted batond sees its
// workers within a second or two, slow enough that a worker never hammers a gateway that keeps
// refusing it.
const (
	backoffMin = 100 * time.Millisecond
	backoffMax = 2 * time.Second
)

// errBusy says another goroutine is flushing right now; the writer goroutine takes over.
var errBusy = errors.New("flush in progress")

// session is one registered channel to batond, from WELCOME until it drops. The registration
// goroutine reads it (readLoop, which also sends ACK and PONG); CLOSED and READY go out through
// flush, from whichever goroutine caused them or, when that would block, from the session's
// writer goroutine.
type session struct {
	l     *Listener
	ch    *handoff.Channel
	rbuf  []byte             // Recv buffer; reader goroutine only
	fds   []int              // the fds of the message read last; reader goroutine only
	infos []handoff.ConnInfo // a CONNS's connections; reader goroutine only
	wbuf  []byte             // ACK, PONG and ERROR encoding; reader goroutine only
	// CONNs read in one burst, acked together by ackBatch; reader goroutine only.
	acks     []uint64
	batch    []*Conn
	unusable []uint64 // acked ids whose fd was no usable connection
	refused  []uint64 // ids whose fd never arrived, to REFUSE (refuse: batond understands it)
	refuse   bool
	// batch: batond may send CONNS (WELCOME granted HELLO's BATCH).
	connsOK bool
	// nonblock: batond sends CONN fds already non-blocking (WELCOME granted HELLO's NONBLOCK).
	nonblock bool
	// migrateOK: batond may send MIGRATE and RESUME (WELCOME granted HELLO's MIGRATE).
	migrateOK bool
	// The MIGRATEs received on this channel whose deadline has not passed, and the ids to
	// DECLINE (sent by flush); guarded by Listener.mu (migrate.go).
	rounds   []*migrateRound
	declines []uint64

	kick       chan struct{} // capacity 1: the writer has something to flush
	stop       chan struct{} // closed when the session ends
	writerDone chan struct{}

	// sendMu serializes flushes. A flush removes ids from Listener.pending only after they were
	// sent, and the session end takes sendMu before the next HELLO is built, so every id is
	// counted exactly once: in the next HELLO's live, or in a CLOSED that was sent.
	sendMu    sync.Mutex
	readySent bool // READY sent on this channel, or flagged in its HELLO
	dead      bool // the session ended: flushes do nothing (the next session sends)
	fbuf      []byte
	ids       []uint64
}

// register dials batond and registers, returning a session ready to serve. On every error path
// it closes the channel it opened.
func (l *Listener) register() (*session, error) {
	ch, err := handoff.Dial(l.env.socket)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	if l.quitting {
		l.mu.Unlock()
		ch.Close()
		return nil, net.ErrClosed
	}
	l.dialing = ch // shutdown closes it, aborting the handshake
	h := handoff.Hello{
		MinVersion: handoff.Version,
		MaxVersion: handoff.Version,
		PID:        uint32(os.Getpid()),
		Slot:       l.env.slot,
		Generation: l.env.generation,
		Capacity:   l.opts.capacity,
		// Closes batond has not been told of are still live in its eyes: the CLOSED for them
		// follows right after WELCOME and is counted against this number (PROTOCOL.md §8).
		Live:  uint32(l.open + len(l.pending)),
		Token: l.env.token,
		// Go's poller wants non-blocking sockets: batond can hand them over that way and save
		// two fcntls per connection here (granted in WELCOME).
		// BATCH: batond may hand over what it accepted in one wake-up in one CONNS (one
		// recvmsg here for up to 16 connections).
		Flags: handoff.HelloNonblock | handoff.HelloBatch,
	}
	if l.opts.migration {
		h.Flags |= handoff.HelloMigrate
	}
	if l.ready {
		h.Flags |= handoff.HelloReady
	}
	if l.draining {
		h.Flags |= handoff.HelloDraining
	}
	l.mu.Unlock()

	s, err := l.handshake(ch, &h)
	l.mu.Lock()
	l.dialing = nil
	l.mu.Unlock()
	if err != nil {
		ch.Close()
		return nil, err
	}
	return s, nil
}

// handshake sends HELLO and waits for WELCOME (PROTOCOL.md, "Conversation" 1).
func (l *Listener) handshake(ch *handoff.Channel, h *handoff.Hello) (*session, error) {
	timeout := l.opts.handshakeTimeout
	if err := ch.Conn().SetDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	if err := ch.Send(handoff.AppendHello(nil, h)); err != nil {
		return nil, fmt.Errorf("send HELLO: %w", err)
	}
	buf := make([]byte, handoff.MaxMessage)
	for {
		msg, fd, err := ch.Recv(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return nil, fmt.Errorf("no WELCOME from batond within %v: %w", timeout, err)
			}
			return nil, fmt.Errorf("waiting for WELCOME: %w", recvError(ch, err))
		}
		closeFD(fd) // only a CONN carries one, and a CONN before WELCOME is refused below
		t, body, err := handoff.Split(msg)
		if err != nil {
			return nil, protocolError(ch, handoff.CodeMalformed, err)
		}
		switch {
		case t == handoff.TypeWelcome:
			w, err := handoff.ParseWelcome(body)
			if err != nil {
				return nil, protocolError(ch, handoff.CodeMalformed, err)
			}
			if w.Version != handoff.Version {
				// batond must choose within our range; if it did not, nothing later can work.
				e := &handoff.Error{Code: handoff.CodeVersion, Reason: fmt.Sprintf(
					"WELCOME chose protocol version %d; this worker speaks only %d", w.Version, handoff.Version)}
				ch.SendError(e.Code, e.Reason)
				return nil, e
			}
			if err := ch.Conn().SetDeadline(time.Time{}); err != nil {
				return nil, err
			}
			migrateOK := w.Flags&handoff.WelcomeMigrate != 0 && h.Flags&handoff.HelloMigrate != 0
			if migrateOK {
				// HANDBACK and RESUME may exceed MaxMessage; a RESUME carries its state.
				buf = make([]byte, handoff.MaxLargeMessage)
			}
			return &session{
				l:          l,
				ch:         ch,
				rbuf:       buf,
				fds:        make([]int, 0, handoff.MaxConns+4),
				kick:       make(chan struct{}, 1),
				stop:       make(chan struct{}),
				writerDone: make(chan struct{}),
				readySent:  h.Flags&handoff.HelloReady != 0,
				nonblock:   w.Flags&handoff.WelcomeNonblock != 0,
				refuse:     w.Flags&handoff.WelcomeRefuse != 0,
				connsOK:    w.Flags&handoff.WelcomeBatch != 0,
				migrateOK:  migrateOK,
			}, nil
		case t == handoff.TypeError:
			e, err := handoff.ParseError(body)
			if err != nil {
				return nil, protocolError(ch, handoff.CodeMalformed, err)
			}
			return nil, e
		case t.Optional():
			continue // an extension this version does not know: ignore, as the protocol says
		default:
			return nil, protocolError(ch, handoff.CodeUnexpected, fmt.Errorf("%s before WELCOME", t))
		}
	}
}

// run is the registration goroutine: it serves the current session and, when the channel drops,
// re-registers with backoff, until shutdown or a final rejection (PROTOCOL.md "Errors": VERSION,
// TOKEN, PEER, SLOT), which ends the registration for good: a worker that retried it would
// knock on batond's door forever. Every other ERROR (SHUTDOWN, a protocol error) ends only
// the channel.
func (l *Listener) run(s *session) {
	defer close(l.done)
	delay := backoffMin
	for {
		err := l.serve(s)
		if l.registrationOver() || l.giveUpIfFinal(err) {
			return
		}
		l.log.Warn("lost the channel to batond; keeping connections, re-registering", "err", err, "live", l.Live())
		for {
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-l.quit:
				t.Stop()
				return
			}
			s, err = l.register()
			if err == nil {
				break
			}
			if l.registrationOver() || l.giveUpIfFinal(err) {
				return
			}
			delay = min(2*delay, backoffMax)
			l.log.Warn("re-registration failed", "err", err, "retry_in", delay)
		}
		delay = backoffMin
		l.log.Info("re-registered with batond", "live", l.Live())
	}
}

// giveUpIfFinal ends the registration if err is a final rejection: Accept and Ready then return
// it, naming the code. The connections already held stay the program's.
func (l *Listener) giveUpIfFinal(err error) bool {
	if !finalRejection(err) {
		return false
	}
	l.log.Error("batond rejected this worker for good; not registering again", "err", err, "live", l.Live())
	l.fail(fmt.Errorf("worker: batond rejected this worker: %w", err))
	return true
}

func (l *Listener) registrationOver() bool {
	select {
	case <-l.quit:
		return true
	default:
		return false
	}
}

// serve runs one session until its channel drops and returns why. When it returns, the channel
// is closed, the writer has exited and no flush is in flight on it.
func (l *Listener) serve(s *session) error {
	l.mu.Lock()
	if l.quitting {
		l.mu.Unlock()
		s.ch.Close()
		return net.ErrClosed
	}
	l.cur = s
	l.mu.Unlock()

	go s.writeLoop()
	s.flushSoon() // CLOSED queued while disconnected, READY requested meanwhile
	err := s.readLoop()

	l.mu.Lock()
	l.cur = nil
	final := l.quitting
	l.mu.Unlock()
	if final {
		// The registration ends here rather than drops: tell batond of the last closes (those
		// of the connections Close dropped among them) before hanging up.
		s.ch.Conn().SetWriteDeadline(time.Now().Add(shutdownFlushTimeout))
		_ = s.flush(true)
	}
	s.ch.Close() // unblocks a writer stuck in Send
	close(s.stop)
	<-s.writerDone
	s.sendMu.Lock() // wait out a flush or a HANDBACK in flight from another goroutine
	s.dead = true
	s.sendMu.Unlock()
	s.endMigrations()
	return err
}

// readLoop reads batond's messages. CONNs that arrive together (batond hands over what it
// accepted in one wake-up in one go) are acked with one ACK: after a CONN the loop reads on
// without waiting, and sends the ACK as soon as nothing more is queued.
func (s *session) readLoop() error {
	for {
		var (
			msg []byte
			err error
		)
		if len(s.acks)+len(s.refused) == 0 {
			msg, s.fds, err = s.ch.RecvFDs(s.rbuf, s.fds[:0])
		} else if len(s.acks)+handoff.MaxConns <= handoff.MaxIDs && len(s.refused)+handoff.MaxConns <= handoff.MaxIDs {
			msg, s.fds, err = s.ch.TryRecvFDs(s.rbuf, s.fds[:0])
		} else {
			err = handoff.ErrWouldBlock
		}
		if errors.Is(err, handoff.ErrWouldBlock) {
			if err := s.ackBatch(); err != nil {
				return err
			}
			continue
		}
		if err == nil || errors.Is(err, handoff.ErrNoFD) {
			// ErrNoFD: (some of) the fds of a CONN or CONNS could not be installed here; the
			// connections without one are refused (see take and noFD).
			err = s.handle(msg, s.fds)
		} else {
			err = recvError(s.ch, err)
		}
		if err != nil {
			// The connections read so far are ours (their fds are): try to ack them, serve
			// them either way (PROTOCOL.md §8).
			_ = s.ackBatch()
			return err
		}
	}
}

// noFD deals with a connection whose fd the kernel could not give this process (out of
// descriptors). Where batond understands REFUSE, the connection goes back to it for another
// worker; else it is acked and reported closed at once, so batond closes it (the client is
// lost, and logged here, rather than this worker's channel and every session with it).
func (s *session) noFD(id uint64) {
	if s.refuse {
		s.l.log.Warn("could not receive a connection's descriptor (out of file descriptors?); batond gives it to another worker", "id", id)
		s.refused = append(s.refused, id)
		return
	}
	s.l.log.Error("could not receive a connection's descriptor (out of file descriptors?); the client is closed", "id", id)
	s.acks = append(s.acks, id)
	s.unusable = append(s.unusable, id)
}

// ackBatch sends one ACK for the CONNs read since the last one and only then delivers them to
// Accept: nothing reads a client byte before batond has the ACK. Even if the ACK failed (the
// channel dropped), the connections are kept: the fds are ours now, the next HELLO counts them,
// and a gateway that is still alive will not hand them to anyone else before this process is
// gone.
func (s *session) ackBatch() error {
	if len(s.refused) > 0 {
		s.wbuf = handoff.AppendIDs(s.wbuf[:0], handoff.TypeRefuse, s.refused)
		s.refused = s.refused[:0]
		if err := s.ch.Send(s.wbuf); err != nil && len(s.acks) == 0 {
			return err
		}
	}
	if len(s.acks) == 0 {
		return nil
	}
	s.wbuf = handoff.AppendIDs(s.wbuf[:0], handoff.TypeAck, s.acks)
	err := s.ch.Send(s.wbuf)
	for i, c := range s.batch {
		s.l.deliver(c)
		s.batch[i] = nil
	}
	for _, id := range s.unusable {
		// Acked, so counted by batond: report it closed so the count stays right.
		s.l.reportUnusable(id)
	}
	s.acks, s.batch, s.unusable = s.acks[:0], s.batch[:0], s.unusable[:0]
	return err
}

// handle acts on one message from batond and the fds that came with it (those of a CONN or
// CONNS; fewer than it carries if this process ran out of descriptors). A non-nil error ends the
// session; every fd is this function's to keep or close.
func (s *session) handle(msg []byte, fds []int) error {
	t, body, err := handoff.Split(msg)
	if err != nil {
		closeFDs(fds)
		return protocolError(s.ch, handoff.CodeMalformed, err)
	}
	switch t {
	case handoff.TypeConn:
		var info handoff.ConnInfo
		if err := handoff.ParseConn(body, &info); err != nil {
			closeFDs(fds)
			return protocolError(s.ch, handoff.CodeMalformed, err)
		}
		s.take(&info, fds, nil)
		return nil
	case handoff.TypeConns:
		if !s.connsOK {
			closeFDs(fds)
			return protocolError(s.ch, handoff.CodeUnexpected, errors.New("CONNS on a channel whose WELCOME did not grant BATCH"))
		}
		s.infos, err = handoff.ParseConns(s.infos[:0], body)
		if err != nil {
			closeFDs(fds)
			return protocolError(s.ch, handoff.CodeMalformed, err)
		}
		for i := range s.infos {
			s.take(&s.infos[i], fds[min(i, len(fds)):], nil)
		}
		clear(s.infos) // the listener names
		return nil
	case handoff.TypePing:
		nonce, err := handoff.ParseNonce(t, body)
		if err != nil {
			return protocolError(s.ch, handoff.CodeMalformed, err)
		}
		s.wbuf = handoff.AppendNonce(s.wbuf[:0], handoff.TypePong, nonce)
		return s.ch.Send(s.wbuf)
	case handoff.TypeDrain:
		d, err := handoff.ParseDrain(body)
		if err != nil {
			return protocolError(s.ch, handoff.CodeMalformed, err)
		}
		s.l.drain(d.Deadline)
		return nil
	case handoff.TypeMigrate, handoff.TypeResume:
		if !s.migrateOK {
			closeFDs(fds)
			return protocolError(s.ch, handoff.CodeUnexpected, fmt.Errorf("%s on a channel whose WELCOME did not grant MIGRATE", t))
		}
		if t == handoff.TypeResume {
			return s.resume(body, fds)
		}
		m, err := handoff.ParseMigrate(nil, body)
		if err != nil {
			return protocolError(s.ch, handoff.CodeMalformed, err)
		}
		// The connections read before it are held too: ack and deliver them first, so that an
		// empty list names them.
		if err := s.ackBatch(); err != nil {
			return err
		}
		s.migrate(m)
		return nil
	case handoff.TypeError:
		e, err := handoff.ParseError(body)
		if err != nil {
			return protocolError(s.ch, handoff.CodeMalformed, err)
		}
		return e
	}
	switch {
	case t.Optional():
		return nil
	case t.Known():
		return protocolError(s.ch, handoff.CodeUnexpected, fmt.Errorf("%s from batond after WELCOME", t))
	default:
		return protocolError(s.ch, handoff.CodeUnknownType, fmt.Errorf("unknown message %s", t))
	}
}

// resume takes a RESUME: a CONN carrying a migrated session's state.
func (s *session) resume(body []byte, fds []int) error {
	r, err := handoff.ParseResume(body)
	if err != nil {
		closeFDs(fds)
		return protocolError(s.ch, handoff.CodeMalformed, err)
	}
	s.take(&r.Conn, fds, &Resumed{State: r.State, PreviousID: r.PreviousID, Hops: r.Hops, Group: r.Group})
	return nil
}

// take takes ownership of the client fd fds[0] of the connection info, or refuses it if no
// fd came (fds is empty). resumed is non-nil for a RESUME.
func (s *session) take(info *handoff.ConnInfo, fds []int, resumed *Resumed) {
	if len(fds) == 0 {
		s.noFD(info.ID)
		return
	}
	// Acked by ackBatch, before anything can read from the client: until batond has the ACK
	// it owns the connection, and a late ACK gets this process killed.
	s.acks = append(s.acks, info.ID)
	nc, err := fdConn(fds[0], info, s.nonblock, s.l.pipes)
	if err != nil {
		s.l.log.Warn("handed-off fd is not a usable connection; reporting it closed", "id", info.ID, "err", err)
		s.unusable = append(s.unusable, info.ID)
		return
	}
	c := newConn(s.l, nc, info, true)
	c.st.resumed = resumed
	s.batch = append(s.batch, c)
}

// drain records a DRAIN. A later DRAIN (after a reload the old batond drains its workers, and
// the new one drains them again when they re-register) replaces the deadline, earlier or later:
// the batond that sent the latest DRAIN is the one that enforces it (PROTOCOL.md "DRAIN"). A
// Listener closed while draining stays registered until the new deadline.
func (l *Listener) drain(d time.Duration) {
	l.mu.Lock()
	l.drainDeadline = time.Now().Add(d)
	if !l.draining {
		l.draining = true
		close(l.drainCh)
	}
	if l.lingerTimer != nil && !l.quitting {
		l.lingerTimer.Reset(d)
	}
	l.signalAcceptDoneLocked()
	l.mu.Unlock()
}

// flushSoon sends what is pending without ever blocking its caller (a program's Conn.Close, the
// reader): if the channel is busy or full, the writer goroutine sends it instead.
func (s *session) flushSoon() {
	switch err := s.flush(false); {
	case err == nil:
	case errors.Is(err, errBusy), errors.Is(err, handoff.ErrWouldBlock):
		s.wake()
	default:
		s.ch.Close() // the reader sees the drop and the worker re-registers
	}
}

func (s *session) wake() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// writeLoop sends what flushSoon could not, waiting for room in the channel, and the CLOSEDs
// of connections that ended while others were still open.
func (s *session) writeLoop() {
	defer close(s.writerDone)
	for {
		select {
		case <-s.kick:
		case <-s.stop:
			return
		}
		// Woken by a close, the writer would run next and send that one id alone. Yielding
		// first lets the goroutines already runnable (a burst of sessions ending together)
		// close theirs too, and one CLOSED carries the lot: a sendmsg here and a recvmsg in
		// batond per connection were a tenth of the CPU of a storm of short connections. It
		// costs no wake-up: with nothing else runnable, Gosched returns at once.
		runtime.Gosched()
		if err := s.flush(true); err != nil {
			s.ch.Close()
			return
		}
	}
}

// flush sends READY if it is due, every pending CLOSED and then every DECLINE due, in batches of up to MaxIDs ids. With
// block false it neither waits for another flush (errBusy) nor for room in the channel
// (handoff.ErrWouldBlock); ids stay pending until sent.
func (s *session) flush(block bool) error {
	if block {
		s.sendMu.Lock()
	} else if !s.sendMu.TryLock() {
		return errBusy
	}
	defer s.sendMu.Unlock()
	if s.dead {
		return nil
	}
	l := s.l
	for {
		l.mu.Lock()
		needReady := l.ready && !s.readySent && !l.draining // never READY after DRAIN (PROTOCOL.md)
		n := min(len(l.pending), handoff.MaxIDs)
		s.ids = append(s.ids[:0], l.pending[:n]...)
		l.mu.Unlock()

		if needReady {
			s.fbuf = handoff.AppendEmpty(s.fbuf[:0], handoff.TypeReady)
			if err := s.send(s.fbuf, block); err != nil {
				return err
			}
			s.readySent = true
		}
		if n == 0 {
			return s.flushDeclines(block)
		}
		s.fbuf = handoff.AppendIDs(s.fbuf[:0], handoff.TypeClosed, s.ids)
		if err := s.send(s.fbuf, block); err != nil {
			return err
		}
		l.mu.Lock()
		// Only flushes remove from pending, and they are serialized, so the first n are the
		// ones just sent.
		l.pending = append(l.pending[:0], l.pending[n:]...)
		l.mu.Unlock()
	}
}

// flushDeclines sends DECLINE for the connections the program declined and for those of
// MIGRATEs past their deadline that it did not answer (the protocol counts them as declined
// anyway; saying so lets batond stop waiting for them). Called by flush, under sendMu.
func (s *session) flushDeclines(block bool) error {
	l := s.l
	for {
		l.mu.Lock()
		if len(s.rounds) > 0 {
			s.expireLocked(time.Now())
		}
		n := min(len(s.declines), handoff.MaxIDs)
		s.ids = append(s.ids[:0], s.declines[:n]...)
		l.mu.Unlock()
		if n == 0 {
			return nil
		}
		s.fbuf = handoff.AppendIDs(s.fbuf[:0], handoff.TypeDecline, s.ids)
		if err := s.send(s.fbuf, block); err != nil {
			return err
		}
		l.mu.Lock()
		s.declines = append(s.declines[:0], s.declines[n:]...)
		l.mu.Unlock()
	}
}

func (s *session) send(msg []byte, block bool) error {
	if block {
		return s.ch.Send(msg)
	}
	return s.ch.TrySend(msg, -1)
}

// protocolError tells batond what was wrong (best effort, PROTOCOL.md "Errors") and returns the
// error that ends the session.
func protocolError(ch *handoff.Channel, code handoff.ErrorCode, err error) error {
	ch.SendError(code, err.Error())
	return fmt.Errorf("%w: %w", errProtocol, err)
}

// recvError turns a failed receive into the error that ends the channel, telling batond first
// when the fault is its (handoff.RecvErrorCode). A deadline is never batond's fault here: the
// worker's deadlines are its own (shutdown waking the reader, the handshake timeout), so it owes
// no STALLED.
func recvError(ch *handoff.Channel, err error) error {
	if code := handoff.RecvErrorCode(err); code != 0 && code != handoff.CodeStalled {
		return protocolError(ch, code, err)
	}
	return err
}

func closeFD(fd int) {
	if fd >= 0 {
		unix.Close(fd)
	}
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		closeFD(fd)
	}
}
