package worker

import (
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/handoff"
)

// Live session migration (PROTOCOL.md "Migration (1.4)"): with WithMigration, batond may ask
// this worker (MIGRATE) to hand sessions back; the program learns it per connection
// (Conn.MigrateRequested) and answers per connection (Conn.HandBack or Conn.Decline). A session
// handed back elsewhere arrives here through Accept like any other, and Conn.Resumed says so.
//
// All migration state of a connection lives in its connState and is guarded by Listener.mu. A
// request belongs to the session (channel) its MIGRATE came on: when that channel drops, the
// request lapses (the next batond knows nothing of it and will ask again if it wants to).

// ErrNotAsked is returned (wrapped) by HandBack and Decline for a connection batond has not
// asked for: no MIGRATE named it, the request was already answered, its deadline passed (the
// Listener declined it), or the channel it came on dropped meanwhile. The connection is still
// the program's.
var ErrNotAsked = errors.New("batond has not asked for this connection")

// Resumed describes a session another worker handed back to batond, which delivered it here
// (a RESUME). The program restores the session from State.
type Resumed struct {
	// State is the opaque state the previous worker handed back with the session (at most
	// handoff.MaxState bytes). The slice is the program's.
	State []byte
	// PreviousID is the id the session had with the worker that handed it back.
	PreviousID uint64
	// Hops is how many times this session has been handed back (≥ 1).
	Hops uint32
	// Group is the group key the previous worker gave the session ("" for none). It is not
	// this connection's group: call SetGroup to keep it together again at the next migration.
	Group string
}

// migrateRound is one MIGRATE: the connections it named and when the Listener declines those
// the program has not answered. It belongs to the session it came on.
type migrateRound struct {
	deadline time.Time
	timer    *time.Timer // wakes the session's writer at the deadline
	members  []*connState
}

// migrateAsk is a connection's pending request: which round asked, and the group and its size
// as they were when the MIGRATE arrived (what HANDBACK carries).
type migrateAsk struct {
	s     *session
	round *migrateRound
	group string
	size  uint32
}

// WithMigration asks batond for live session migration (HELLO's MIGRATE bit). If batond grants
// it (WELCOME), it may ask for sessions (see Conn.MigrateRequested) and deliver sessions other
// workers handed back (see Conn.Resumed). Without it, neither ever happens.
func WithMigration() Option {
	return func(o *options) { o.migration = true }
}

// MigrateRequested returns a channel that is closed when batond asks for this connection: the
// program should then stop reading it, finish its writes and call HandBack (or Decline) before
// MigrateDeadline. The Listener never touches the connection's deadlines: to wake a goroutine
// blocked in Read, the program sets a read deadline itself, for instance
//
//	go func() {
//		select {
//		case <-c.MigrateRequested():
//			c.SetReadDeadline(time.Now()) // the reader sees a timeout and hands back
//		case <-done:
//		}
//	}()
//
// Once the request is answered (Decline, a failed HandBack, or the deadline passed and the
// Listener declined it) or its channel to batond dropped, a later call returns a new channel,
// closed at the next request: call it again rather than keep the first.
func (c *Conn) MigrateRequested() <-chan struct{} {
	l := c.st.l
	l.mu.Lock()
	defer l.mu.Unlock()
	if c.st.asked == nil {
		c.st.asked = make(chan struct{})
		if c.st.ask != nil {
			close(c.st.asked)
		}
	}
	return c.st.asked
}

// MigrateDeadline is when the Listener declines this connection if the program has not
// answered batond's request; the zero time when there is no request. batond's clock started a
// little earlier: answer well before it.
func (c *Conn) MigrateDeadline() time.Time {
	l := c.st.l
	l.mu.Lock()
	defer l.mu.Unlock()
	if c.st.ask == nil {
		return time.Time{}
	}
	return c.st.ask.round.deadline
}

// SetGroup sets the connection's group key, at any time (when a player joins a room, say).
// Sessions this worker hands back with the same key in answer to one MIGRATE land on the same
// worker. Keys are this worker's own: the same key from two workers names two groups. The key
// and its size (how many of the connections named by the MIGRATE share it) are taken when the
// MIGRATE arrives. "" (the default) is no group.
func (c *Conn) SetGroup(key string) {
	l := c.st.l
	l.mu.Lock()
	c.st.group = key
	l.mu.Unlock()
}

// Resumed says whether this connection is a migrated session, and gives its state.
func (c *Conn) Resumed() (Resumed, bool) {
	if c.st.resumed == nil {
		return Resumed{}, false
	}
	return *c.st.resumed, true
}

// HandBack gives the connection back to batond with state, which the next worker reads from
// Resumed.State, in answer to batond's request (MigrateRequested). Before calling it:
//
//   - stop reading the connection: no goroutine may still be in Read (set a read deadline to
//     wake one, and wait for it to return);
//   - finish writing: Go's writes are synchronous, so make sure no goroutine is still in Write;
//     bytes written after the hand-back would interleave with the next worker's;
//   - put into state whatever the program read but did not process (a partial line in a
//     bufio.Reader, say). Bytes the client sent that the program did not read stay in the
//     kernel's buffer and travel with the socket.
//
// On success the connection is batond's: this process's descriptor is closed (without
// shutdown, which would end it for everyone), Read, Write and Close return errors wrapping
// net.ErrClosed, no CLOSED is sent for it, and Live drops by one.
//
// A state longer than handoff.MaxState cannot travel: HandBack declines the session and returns
// an error wrapping handoff.ErrStateTooBig. Without a pending request it returns an error
// wrapping ErrNotAsked. If sending fails (the channel to batond dropped), it returns that
// error and the connection is still the program's, usable as before: keep serving it (batond
// may ask again) or close it.
func (c *Conn) HandBack(state []byte) error {
	if err := c.handBack(state); err != nil {
		return fmt.Errorf("worker: hand back connection %d: %w", c.st.id, err)
	}
	return nil
}

func (c *Conn) handBack(state []byte) error {
	st, l := c.st, c.st.l
	if len(state) > handoff.MaxState {
		if c.decline() == nil {
			return fmt.Errorf("%w (%d bytes, at most %d); declined", handoff.ErrStateTooBig, len(state), handoff.MaxState)
		}
		return fmt.Errorf("%w (%d bytes, at most %d)", handoff.ErrStateTooBig, len(state), handoff.MaxState)
	}
	l.mu.Lock()
	ask := st.ask
	l.mu.Unlock()
	if ask == nil {
		return ErrNotAsked
	}
	s := ask.s
	// Under sendMu, as CLOSED is: the session's end takes it before the next HELLO counts live,
	// so this connection is counted there exactly when the HANDBACK was not sent.
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	l.mu.Lock()
	if st.ask != ask || s.dead {
		l.mu.Unlock()
		return ErrNotAsked
	}
	if !time.Now().Before(ask.round.deadline) {
		// Too late: batond counts it declined already. Say so (the writer sends it once this
		// HandBack lets go of the flush lock).
		st.answered()
		s.declines = append(s.declines, st.id)
		l.mu.Unlock()
		s.wake()
		return fmt.Errorf("%w: the deadline passed", ErrNotAsked)
	}
	l.mu.Unlock()
	if !st.claim() {
		return net.ErrClosed // the program closed it meanwhile
	}
	h := handoff.Handback{Conn: st.info, Group: ask.group, GroupSize: ask.size, State: state}
	msg, err := handoff.AppendHandback(nil, &h)
	if err == nil {
		err = c.sendWithFD(s.ch, msg)
	}
	if err != nil {
		st.closed.Store(false) // still the program's
		l.mu.Lock()
		st.answered()
		l.mu.Unlock()
		return err
	}
	// batond holds the socket now: close only this process's descriptor.
	c.gc.Stop()
	_ = c.c.Close()
	l.mu.Lock()
	st.answered()
	l.mu.Unlock()
	l.release(st, false) // no CLOSED: the HANDBACK counts as one for batond
	return nil
}

// Decline keeps the connection: batond leaves it here (it drains as without migration). It
// returns an error wrapping ErrNotAsked if there is no pending request. The DECLINE is sent
// without waiting; if the channel drops first, the request lapses anyway.
func (c *Conn) Decline() error {
	if err := c.decline(); err != nil {
		return fmt.Errorf("worker: decline connection %d: %w", c.st.id, err)
	}
	return nil
}

func (c *Conn) decline() error {
	st, l := c.st, c.st.l
	l.mu.Lock()
	ask := st.ask
	if ask == nil {
		l.mu.Unlock()
		return ErrNotAsked
	}
	st.answered()
	ask.s.declines = append(ask.s.declines, st.id)
	l.mu.Unlock()
	ask.s.flushSoon()
	return nil
}

// answered ends the connection's pending request; the next MigrateRequested gets a new channel.
// Called with Listener.mu held.
func (st *connState) answered() {
	st.ask = nil
	if st.asked != nil {
		select {
		case <-st.asked:
			st.asked = nil // closed: the next call makes an open one
		default:
		}
	}
}

// sendWithFD sends msg with the connection's socket attached, waiting on the poller while the
// channel's queue is full (a burst of hand-backs of up to 64 KiB each fills it quickly). The
// descriptor is reached through the raw conn, never (*os.File).Fd, which would make the socket
// blocking for every process sharing it.
func (c *Conn) sendWithFD(ch *handoff.Channel, msg []byte) error {
	sc, ok := c.c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("%w: not a socket", ErrNotAsked)
	}
	craw, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := craw.Control(func(fd uintptr) { serr = sendFDWait(ch, msg, int(fd)) }); err != nil {
		return err
	}
	return serr
}

func sendFDWait(ch *handoff.Channel, msg []byte, fd int) error {
	err := ch.TrySend(msg, fd)
	if !errors.Is(err, handoff.ErrWouldBlock) {
		return err
	}
	raw, err := ch.Conn().SyscallConn()
	if err != nil {
		return err
	}
	oob := unix.UnixRights(fd)
	var serr error
	// Not ch.TrySend inside: it takes the same fd's write lock, held here.
	werr := raw.Write(func(cfd uintptr) bool {
		for {
			serr = unix.Sendmsg(int(cfd), msg, oob, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
			if serr != unix.EINTR {
				return serr != unix.EAGAIN
			}
		}
	})
	if werr != nil {
		return werr
	}
	if serr != nil {
		return fmt.Errorf("sendmsg HANDBACK: %w", serr)
	}
	return nil
}

// migrate acts on a MIGRATE that came on s: it marks the connections named (every one held if
// ids is empty) as asked, computes their group sizes, and arms the round's deadline.
func (s *session) migrate(m handoff.Migrate) {
	l := s.l
	round := &migrateRound{deadline: time.Now().Add(m.Deadline)}
	l.mu.Lock()
	if len(m.IDs) == 0 {
		for _, st := range l.conns {
			round.members = append(round.members, st)
		}
	} else {
		for _, id := range m.IDs {
			if st, ok := l.conns[id]; ok && (len(round.members) == 0 || !contains(round.members, st)) {
				round.members = append(round.members, st)
			}
		}
	}
	sizes := map[string]uint32{}
	for _, st := range round.members {
		if st.group != "" {
			sizes[st.group]++
		}
	}
	for _, st := range round.members {
		// A session still pending from an earlier MIGRATE moves to this one.
		st.ask = &migrateAsk{s: s, round: round, group: st.group, size: sizes[st.group]}
		if st.asked == nil {
			st.asked = make(chan struct{})
		}
		select {
		case <-st.asked:
		default:
			close(st.asked)
		}
	}
	if len(round.members) > 0 {
		s.rounds = append(s.rounds, round)
		round.timer = time.AfterFunc(m.Deadline, s.wake)
	}
	l.mu.Unlock()
	l.log.Info("batond asks for sessions", "asked", len(round.members), "listed", len(m.IDs), "deadline", m.Deadline)
}

func contains(sts []*connState, st *connState) bool {
	for _, x := range sts {
		if x == st {
			return true
		}
	}
	return false
}

// expireLocked declines, for the session's flush, the connections of rounds past their
// deadline that the program did not answer. Called with Listener.mu held.
func (s *session) expireLocked(now time.Time) {
	kept := s.rounds[:0]
	for _, r := range s.rounds {
		if now.Before(r.deadline) {
			kept = append(kept, r)
			continue
		}
		for _, st := range r.members {
			if st.ask != nil && st.ask.round == r {
				st.answered()
				s.declines = append(s.declines, st.id)
			}
		}
	}
	clear(s.rounds[len(kept):])
	s.rounds = kept
}

// endMigrations lapses the requests of a session that ended: the channel they came on is gone,
// and a HANDBACK on the next one would answer a MIGRATE its batond never sent.
func (s *session) endMigrations() {
	l := s.l
	l.mu.Lock()
	for _, r := range s.rounds {
		r.timer.Stop()
		for _, st := range r.members {
			if st.ask != nil && st.ask.s == s {
				st.answered()
			}
		}
	}
	s.rounds, s.declines = nil, nil
	l.mu.Unlock()
}
