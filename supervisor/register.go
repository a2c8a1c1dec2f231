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
		s.mu.Lock()
		if s.stopping {
			s.mu.Unlock()
			c.Close()
			continue
		}
		s.admits[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
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
	ch.SendError(code, reason)
	ch.Close()
}

// errRejected: the handshake ended with an ERROR already sent (or nothing owed).
var errRejected = errors.New("registration rejected")

func (s *Supervisor) admit(c *net.UnixConn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.admits, c)
		s.mu.Unlock()
	}()
	ch, err := handoff.NewChannel(c)
	if err != nil {
		c.Close()
		return
	}
	h, cred, err := s.handshake(ch)
	if err != nil {
		return
	}
	info := proxy.BackendInfo{
		Slot: int(h.Slot), Generation: h.Generation, PID: int(cred.Pid), Capacity: int(h.Capacity),
		Ready: h.Flags&handoff.HelloReady != 0, Draining: h.Flags&handoff.HelloDraining != 0, Live: int(h.Live),
		Nonblock: h.Flags&handoff.HelloNonblock != 0, Batch: h.Flags&handoff.HelloBatch != 0,
		Migrate: h.Flags&handoff.HelloMigrate != 0,
	}
	version, _ := handoff.ChooseVersion(h.MinVersion, h.MaxVersion)
	w := handoff.Welcome{Version: version, PingInterval: s.gw.PingInterval(), Generation: s.cfg.Generation, Flags: handoff.WelcomeRefuse}
	if info.Nonblock {
		w.Flags |= handoff.WelcomeNonblock
	}
	if info.Batch {
		w.Flags |= handoff.WelcomeBatch
	}
	if info.Migrate {
		w.Flags |= handoff.WelcomeMigrate
	}
	welcome := handoff.AppendWelcome(nil, &w)
	// A pidfd on the registering process first: from here on its pid cannot be recycled
	// under the checks that follow.
	peer, err := OpenProcess(info.PID)
	if err != nil {
		s.reject(ch, handoff.CodePeer, fmt.Sprintf("cannot open pidfd for pid %d: %v", info.PID, err))
		return
	}
	if h.Generation == s.cfg.Generation {
		s.admitOwn(ch, info, welcome, peer)
		return
	}
	s.admitOther(ch, info, welcome, peer)
}

// handshake reads and checks the peer's HELLO: credentials, protocol version, pid, token.
func (s *Supervisor) handshake(ch *handoff.Channel) (handoff.Hello, *unix.Ucred, error) {
	var h handoff.Hello
	cred, err := ch.PeerCred()
	if err != nil {
		s.reject(ch, handoff.CodePeer, "cannot read peer credentials", "error", err)
		return h, nil, errRejected
	}
	if h, err = s.readHello(ch, cred); err != nil {
		return h, nil, err
	}
	// Checked after HELLO is read: closing with the HELLO unread would reset the peer's end
	// before it could read why.
	if int(cred.Uid) != os.Getuid() && !slices.Contains(s.cfg.AllowUIDs, cred.Uid) {
		s.reject(ch, handoff.CodePeer, fmt.Sprintf("uid %d may not register (allowed: %d and -allow-uid)", cred.Uid, os.Getuid()), "pid", cred.Pid)
		return h, nil, errRejected
	}
	if _, ok := handoff.ChooseVersion(h.MinVersion, h.MaxVersion); !ok {
		s.reject(ch, handoff.CodeVersion, fmt.Sprintf("worker speaks protocol versions %d..%d, batond speaks %d", h.MinVersion, h.MaxVersion, handoff.Version), "pid", cred.Pid)
		return h, nil, errRejected
	}
	if h.PID != 0 && int32(h.PID) != cred.Pid {
		s.reject(ch, handoff.CodePeer, fmt.Sprintf("HELLO says pid %d but the socket peer is pid %d", h.PID, cred.Pid))
		return h, nil, errRejected
	}
	if !checkToken(s.cfg.Key, h.Generation, int(h.Slot), h.Token) {
		s.reject(ch, handoff.CodeToken, fmt.Sprintf("bad token for slot %d of generation %d", h.Slot, h.Generation), "pid", cred.Pid)
		return h, nil, errRejected
	}
	return h, cred, nil
}

// readHello reads the first message, which must be a HELLO, within helloTimeout.
func (s *Supervisor) readHello(ch *handoff.Channel, cred *unix.Ucred) (handoff.Hello, error) {
	_ = ch.Conn().SetReadDeadline(time.Now().Add(helloTimeout))
	buf := make([]byte, handoff.MaxMessage)
	msg, fd, err := ch.Recv(buf)
	if fd >= 0 {
		unix.Close(fd) // a CONN (with its fd) instead of HELLO: never keep what a stranger sends
	}
	if err != nil {
		code := handoff.RecvErrorCode(err)
		if code == 0 {
			// The peer went away (or batond is stopping): no ERROR is owed.
			s.log.Debug("registration channel closed before HELLO", "pid", cred.Pid, "error", err)
			ch.Close()
			return handoff.Hello{}, errRejected
		}
		reason := fmt.Sprintf("no valid HELLO: %v", err)
		if code == handoff.CodeStalled {
			reason = fmt.Sprintf("no HELLO within %v", helloTimeout)
		}
		s.reject(ch, code, reason, "pid", cred.Pid)
		return handoff.Hello{}, errRejected
	}
	_ = ch.Conn().SetReadDeadline(time.Time{})
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
		return h, errRejected
	}
	return h, nil
}
