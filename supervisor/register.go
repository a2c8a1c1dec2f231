package supervisor

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/handoff"
	"github.com/baton-gw/baton/proxy"
)

// helloTimeout bounds how long a connected peer may take to say HELLO: a client that connects
// and sends nothing costs one goroutine for this long, then is dropped.
const helloTimeout = 5 * time.Second

// Serve admits workers on the registration listener until it is closed. Each connection gets
// its own goroutine for the handshake, so a silent peer holds up nobody.
func (s *Supervisor) Serve(l *net.UnixListener) error {
	s.mu.Lock()
	s.regL = l
	s.mu.Unlock()
	var backoff time.Duration
	for {
		s.mu.Lock()
		resume, quit := s.resume, s.quit
		paused := s.paused
		s.mu.Unlock()
		if paused {
			select {
			case <-resume:
			case <-quit:
				return nil
			}
			continue
		}
		c, err := l.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue // PauseRegistrations interrupted the accept
			}
			if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("registration accept failed; backing off", "error", err, "backoff", backoff)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("registration accept: %w", err)
		}
		backoff = 0
		go s.admit(c)
	}
}

// PauseRegistrations stops admitting workers while a newer batond starts on the same
// (inherited) registration socket, so that its new workers register with it and not with us.
// Connections wait in the socket's backlog meanwhile.
func (s *Supervisor) PauseRegistrations() {
	s.mu.Lock()
	s.paused = true
	s.resume = make(chan struct{})
	l := s.regL
	s.mu.Unlock()
	if l != nil {
		_ = l.SetDeadline(time.Now()) // wake a blocked accept
	}
}

// ResumeRegistrations undoes PauseRegistrations (the newer batond failed to start).
func (s *Supervisor) ResumeRegistrations() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.paused {
		return
	}
	s.paused = false
	if s.regL != nil {
		_ = s.regL.SetDeadline(time.Time{})
	}
	close(s.resume)
}

// reject tells the peer why, best effort, and closes the channel.
func (s *Supervisor) reject(ch *handoff.Channel, code handoff.ErrorCode, reason string, kv ...any) {
	s.log.Warn("registration rejected: "+reason, append([]any{"code", code}, kv...)...)
	_ = ch.TrySend(handoff.AppendError(nil, &handoff.Error{Code: code, Reason: reason}), -1)
	ch.Close()
}

func (s *Supervisor) admit(c *net.UnixConn) {
	ch, err := handoff.NewChannel(c)
	if err != nil {
		c.Close()
		return
	}
	cred, err := ch.PeerCred()
	if err != nil {
		s.reject(ch, handoff.CodePeer, "cannot read peer credentials", "error", err)
		return
	}
	_ = c.SetReadDeadline(time.Now().Add(helloTimeout))
	buf := make([]byte, handoff.MaxMessage)
	msg, fd, err := ch.Recv(buf)
	if fd >= 0 {
		unix.Close(fd) // a CONN (with its fd) instead of HELLO: never keep what a stranger sends
	}
	if err != nil {
		code := handoff.CodeMalformed
		switch {
		case errors.Is(err, handoff.ErrTruncated):
			code = handoff.CodeTooBig
		case errors.Is(err, handoff.ErrFDs):
			code = handoff.CodeFDs
		}
		s.reject(ch, code, fmt.Sprintf("no valid HELLO: %v", err), "pid", cred.Pid)
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	typ, body, err := handoff.Split(msg)
	if err == nil && typ != handoff.TypeHello {
		err = fmt.Errorf("first message is %s, not HELLO", typ)
	}
	var h handoff.Hello
	if err == nil {
		h, err = handoff.ParseHello(body)
	}
	if err != nil {
		s.reject(ch, handoff.CodeMalformed, err.Error(), "pid", cred.Pid)
		return
	}
	// Checked after HELLO is read: closing with the HELLO unread would reset the peer's end
	// before it could read why.
	if int(cred.Uid) != os.Getuid() && !slices.Contains(s.cfg.AllowUIDs, cred.Uid) {
		s.reject(ch, handoff.CodePeer, fmt.Sprintf("uid %d may not register (allowed: %d and -allow-uid)", cred.Uid, os.Getuid()), "pid", cred.Pid)
		return
	}
	version, ok := handoff.ChooseVersion(h.MinVersion, h.MaxVersion)
	if !ok {
		s.reject(ch, handoff.CodeVersion, fmt.Sprintf("worker speaks protocol versions %d..%d, batond speaks %d", h.MinVersion, h.MaxVersion, handoff.Version), "pid", cred.Pid)
		return
	}
	if h.PID != 0 && int32(h.PID) != cred.Pid {
		s.reject(ch, handoff.CodePeer, fmt.Sprintf("HELLO says pid %d but the socket peer is pid %d", h.PID, cred.Pid))
		return
	}
	if !checkToken(s.cfg.Key, h.Generation, int(h.Slot), h.Token) {
		s.reject(ch, handoff.CodeToken, fmt.Sprintf("bad token for slot %d of generation %d", h.Slot, h.Generation), "pid", cred.Pid)
		return
	}
	info := proxy.BackendInfo{
		Slot: int(h.Slot), Generation: h.Generation, PID: int(cred.Pid), Capacity: int(h.Capacity),
		Ready: h.Flags&handoff.HelloReady != 0, Draining: h.Flags&handoff.HelloDraining != 0, Live: int(h.Live),
		Nonblock: h.Flags&handoff.HelloNonblock != 0, Batch: h.Flags&handoff.HelloBatch != 0,
	}
	w := handoff.Welcome{Version: version, PingInterval: s.gw.PingInterval(), Generation: s.cfg.Generation, Flags: handoff.WelcomeRefuse}
	if info.Nonblock {
		w.Flags |= handoff.WelcomeNonblock
	}
	if info.Batch {
		w.Flags |= handoff.WelcomeBatch
	}
	welcome := handoff.AppendWelcome(nil, &w)
	if h.Generation == s.cfg.Generation {
		s.admitOwn(ch, info, welcome)
		return
	}
	s.admitOther(ch, info, welcome)
}

// admitOwn attaches a worker of this generation to its slot. The slot's process must be the
// peer: a second process presenting the same slot's token gets nothing.
func (s *Supervisor) admitOwn(ch *handoff.Channel, info proxy.BackendInfo, welcome []byte) {
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		s.reject(ch, handoff.CodeShutdown, "batond is stopping")
		return
	}
	if info.Slot >= len(s.slots) {
		s.mu.Unlock()
		s.reject(ch, handoff.CodeSlot, fmt.Sprintf("slot %d does not exist (%d workers)", info.Slot, len(s.slots)))
		return
	}
	sl := s.slots[info.Slot]
	if sl.proc == nil || sl.pid != info.PID {
		s.mu.Unlock()
		s.reject(ch, handoff.CodeSlot, fmt.Sprintf("slot %d belongs to pid %d, not %d", info.Slot, sl.pid, info.PID))
		return
	}
	old := sl.backend
	proc := sl.proc
	if err := ch.Send(welcome); err != nil {
		s.mu.Unlock()
		ch.Close()
		return
	}
	sl.backend = s.gw.Add(info, ch, proc)
	s.mu.Unlock()
	if old != nil {
		old.Kick(errors.New("worker re-registered"))
	}
	select {
	case sl.reg <- struct{}{}:
	default:
	}
	s.log.Debug("worker registered", "slot", info.Slot, "pid", info.PID, "live", info.Live)
}

// admitOther takes a worker of another generation: after a reload (older) or one that
// outlived a crashed batond. It keeps its sessions, gets no new clients, and is drained.
func (s *Supervisor) admitOther(ch *handoff.Channel, info proxy.BackendInfo, welcome []byte) {
	if info.Generation > s.cfg.Generation {
		// A worker of a newer batond that reached us in the instant before we paused
		// registrations: it belongs to the newer one. SHUTDOWN is not fatal; it retries.
		s.reject(ch, handoff.CodeShutdown, fmt.Sprintf("generation %d belongs to a newer batond (this is %d); retry", info.Generation, s.cfg.Generation))
		return
	}
	proc, err := OpenProcess(info.PID)
	if err != nil {
		s.reject(ch, handoff.CodePeer, fmt.Sprintf("cannot open pidfd for pid %d: %v", info.PID, err))
		return
	}
	if err := ch.Send(welcome); err != nil {
		proc.Close()
		ch.Close()
		return
	}
	info.Draining = true // no CONN before DRAIN reaches it
	s.mu.Lock()
	b := s.gw.Add(info, ch, proc)
	o := &other{backend: b, proc: proc, deadline: time.Now().Add(s.cfg.DrainTimeout)}
	s.others[b] = o
	s.mu.Unlock()
	_ = b.Drain(s.cfg.DrainTimeout)
	s.log.Info("worker of another generation registered; draining it", "slot", info.Slot, "pid", info.PID, "generation", info.Generation, "clients", info.Live)
	go s.watchOther(o)
}

// watchOther forgets the worker when it exits or its channel ends, and enforces its drain
// deadline: SIGTERM, then SIGKILL.
func (s *Supervisor) watchOther(o *other) {
	defer func() {
		s.mu.Lock()
		delete(s.others, o.backend)
		s.mu.Unlock()
		o.proc.Close()
	}()
	t := time.NewTimer(time.Until(o.deadline))
	defer t.Stop()
	select {
	case <-o.proc.Exited():
		o.backend.Kick(errors.New("worker exited"))
		return
	case <-o.backend.Done():
		return // it may register again, as a new other
	case <-t.C:
	}
	s.log.Warn("drain deadline passed; sending SIGTERM", "pid", o.proc.PID())
	_ = o.proc.Signal(unix.SIGTERM)
	select {
	case <-o.proc.Exited():
	case <-time.After(s.cfg.KillGrace):
		_ = o.proc.Signal(unix.SIGKILL)
		<-o.proc.Exited()
	}
	o.backend.Kick(errors.New("worker exited at its drain deadline"))
}
