package load

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/stats"
)

// SessionsConfig configures the sessions scenario.
type SessionsConfig struct {
	Addr     string
	Proto    *Proto
	Sessions int
	// Interval paces each session: a request every Interval. Zero sends the next request as
	// soon as the reply is in (ping-pong at full speed).
	Interval time.Duration
	// Depth is the number of requests each session has out at once: they go in one write, and
	// the next batch goes when every reply of this one is in (pipelining, as a chatty game
	// client does; 0 or 1: strict ping-pong). It makes the load generator's syscalls per message
	// fewer, so that it takes less of the CPU the servers share with it; messages/s counts every
	// request, the round trip is that of a batch.
	Depth        int
	Warmup       time.Duration
	Duration     time.Duration
	Timeout      time.Duration // a reply must come within this; connect and greeting too
	SetupTimeout time.Duration // all sessions must be established within this
	ServerPIDs   []int
	Label        string
	// ProxyV2 sends a PROXY v2 header (a made-up client, the real destination) before each
	// session's first bytes: in the same write as its first request, or alone on connect when
	// the server speaks first (a greeting: it is handed the client only after the header).
	ProxyV2 bool
}

func (c *SessionsConfig) defaults() error {
	if c.Proto == nil || c.Sessions <= 0 || c.Duration <= 0 {
		return errors.New("sessions: need a protocol, sessions > 0 and a duration > 0")
	}
	if c.Timeout <= 0 {
		c.Timeout = 5 * time.Second
	}
	if c.SetupTimeout <= 0 {
		c.SetupTimeout = 30 * time.Second
	}
	if c.Depth > maxDepth {
		return fmt.Errorf("sessions: depth %d: at most %d requests in one write", c.Depth, maxDepth)
	}
	c.Depth = max(c.Depth, 1)
	return nil
}

// maxDepth bounds Depth: a batch (64 bytes a request) must go in one non-blocking write into a
// fresh socket's send buffer (16 KiB by default), with room to spare.
const maxDepth = 64

// errBadReply is a reply byte that is not what the request asked for.
var errBadReply = errors.New("reply differs from the expected answer")

// Session phases.
const (
	phConnecting = iota
	phGreeting   // connected, reading the greeting
	phReady      // established, no request out
	phWaiting    // request out, reply expected
	phPaced      // reply in, next request at the timer
	phDone       // failed or finished
)

// sessions drives long-lived ping-pong connections. It is also one half of the reload scenario.
type sessions struct {
	e       *engine
	p       *Proto
	dst     *unix.SockaddrInet4
	pp      *proxyPrefix // nil: no PROXY header
	timeout int64
	// setupTimeout bounds a session's connect and greeting (not measured: a SYN the server
	// dropped is retried after 1, 3, 7 s…).
	setupTimeout int64
	interval     int64
	// batch is what send writes: depth requests, back to back.
	batch []byte
	depth int
	// check: every reply byte is compared with the expected answer (Proto.Reply). Off for the
	// reload scenario, where the lobby also tells its players about the drain.
	check    bool
	conns    []*conn
	opened   int // dials made
	ready    int // established
	running  bool
	stopAt   int64 // no new request from then on
	outstand int   // requests out

	from, to int64
	lat      stats.Samples // replies that ended in the window
	all      stats.Samples // every reply (reload keeps these)
	ops      int64
	msgs     int64
	setupErr int
	broken   int
	res      *Result
}

func newSessions(e *engine, p *Proto, dst *unix.SockaddrInet4, n int, interval, timeout time.Duration, res *Result) *sessions {
	s := &sessions{e: e, p: p, dst: dst, timeout: int64(timeout), setupTimeout: int64(timeout), interval: int64(interval), res: res,
		batch: p.Session, depth: 1}
	s.conns = make([]*conn, n)
	for i := range s.conns {
		s.conns[i] = &conn{fd: -1, h: s, hidx: -1}
	}
	return s
}

// maxConnecting bounds the sessions being set up at once: below the listen backlog of an
// asyncio server (100), so that no SYN is dropped and retried seconds later.
const maxConnecting = 64

// open dials the sessions, at most maxConnecting at once; it returns true once every dial has
// been made.
func (s *sessions) open(now int64) bool {
	for s.opened < len(s.conns) && s.opened-s.ready-s.setupErr < maxConnecting {
		c := s.conns[s.opened]
		s.opened++
		c.phase = phConnecting
		c.owed = s.pp != nil
		if err := s.e.dial(c, s.dst, netip.Addr{}); err != nil {
			s.setupFail(c, err)
			continue
		}
		s.e.setTimer(c, now+s.setupTimeout)
		if c.connected {
			s.connected(c, now)
		}
	}
	return s.opened == len(s.conns)
}

func (s *sessions) connected(c *conn, now int64) {
	c.connected = true
	if g := s.p.greeting(); g > 0 {
		if c.owed {
			hdr := s.pp.with(nil)
			n, err := unix.Write(c.fd, hdr)
			if err == nil && n < len(hdr) {
				err = io.ErrShortWrite
			}
			if err != nil {
				s.setupFail(c, sysErr("write", err))
				return
			}
			c.owed = false
		}
		c.phase, c.need = phGreeting, g
		return
	}
	s.established(c)
}

func (s *sessions) established(c *conn) {
	if s.check && s.depth > 1 {
		// Wake for a batch only when all of its replies are in: one epoll wake-up and one read
		// per batch instead of one per reply (the server answers each request with its own
		// write). A short or wrong answer still wakes at EOF, or ends at the reply timeout.
		if err := unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, s.depth*len(s.p.Reply)); err != nil {
			s.setupFail(c, sysErr("setsockopt", err))
			return
		}
	}
	c.phase = phReady
	s.ready++
	s.e.clearTimer(c)
	if s.running {
		s.send(c, s.e.now())
	}
}

// begin starts the requests on every established session.
func (s *sessions) begin(now int64) {
	s.running = true
	for _, c := range s.conns {
		if c.phase == phReady {
			s.send(c, now)
		}
	}
}

func (s *sessions) send(c *conn, now int64) {
	if now >= s.stopAt {
		c.phase = phReady
		return
	}
	req := s.batch
	if c.owed {
		req = s.pp.with(req)
		c.owed = false
	}
	n, err := unix.Write(c.fd, req)
	if err == nil && n < len(req) {
		err = io.ErrShortWrite
	}
	if err != nil {
		s.breakSession(c, sysErr("write", err))
		return
	}
	c.phase, c.begin, c.need = phWaiting, now, s.depth*s.p.expect(s.p.Session)
	s.outstand++
	s.e.setTimer(c, now+s.timeout)
}

func (s *sessions) event(c *conn, ev uint32) {
	now := s.e.now()
	if c.phase == phConnecting {
		if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			err := soError(c.fd)
			if err == nil {
				err = unix.ECONNRESET
			}
			s.setupFail(c, sysErr("connect", err))
			return
		}
		if ev&unix.EPOLLOUT == 0 {
			return
		}
		s.connected(c, now)
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) == 0 {
		return
	}
	buf := s.e.rbuf
	for c.phase != phDone {
		n, err := unix.Read(c.fd, buf)
		switch {
		case err == unix.EAGAIN:
			return
		case err == unix.EINTR:
			continue
		case err != nil:
			s.lost(c, sysErr("read", err))
			return
		case n == 0:
			s.lost(c, sysErr("read", io.EOF))
			return
		}
		got := s.p.consume(buf[:n])
		switch c.phase {
		case phGreeting:
			c.need -= got
			if c.need <= 0 {
				s.established(c)
			}
		case phWaiting:
			if s.check {
				var ok bool
				if c.off, ok = s.p.checkReply(c.off, buf[:n]); !ok {
					s.breakSession(c, errBadReply)
					return
				}
			}
			c.need -= got
			if c.need <= 0 {
				s.reply(c, now)
			}
		}
		if n < len(buf) {
			return
		}
	}
}

func (s *sessions) reply(c *conn, now int64) {
	s.outstand--
	rtt := time.Duration(now - c.begin)
	s.msgs += int64(s.depth)
	s.all.Add(rtt)
	if now >= s.from && now < s.to {
		s.ops += int64(s.depth)
		s.lat.Add(rtt)
	}
	if s.interval == 0 {
		s.send(c, now)
		return
	}
	c.phase = phPaced
	s.e.setTimer(c, max(c.begin+s.interval, now))
}

func (s *sessions) timer(c *conn) {
	switch c.phase {
	case phPaced:
		s.send(c, s.e.now())
	case phConnecting, phGreeting:
		s.setupFail(c, errors.New("setup timeout"))
	case phWaiting:
		s.breakSession(c, errors.New("reply timeout"))
	}
}

// lost handles a read error or EOF: a setup failure before the session was established, a
// broken session after.
func (s *sessions) lost(c *conn, err error) {
	if c.phase == phConnecting || c.phase == phGreeting {
		s.setupFail(c, err)
		return
	}
	s.breakSession(c, err)
}

func (s *sessions) setupFail(c *conn, err error) {
	s.setupErr++
	s.res.addError("setup " + errKind(err))
	c.phase = phDone
	s.e.closeConn(c)
}

func (s *sessions) breakSession(c *conn, err error) {
	if c.phase == phWaiting {
		s.outstand--
	}
	s.broken++
	s.res.addError("session " + errKind(err))
	c.phase = phDone
	s.e.closeConn(c)
}

// setupDone reports whether every session is established or failed.
func (s *sessions) setupDone() bool {
	return s.opened == len(s.conns) && s.ready+s.setupErr == len(s.conns)
}

// Sessions runs the sessions scenario: it establishes every session first (not measured), then
// runs the requests for Warmup+Duration and measures the window.
func Sessions(cfg SessionsConfig) (*Result, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	dst, err := parseDst(cfg.Addr)
	if err != nil {
		return nil, err
	}
	e, err := newEngine()
	if err != nil {
		return nil, err
	}
	defer e.close()
	e.nodelay = true
	res := &Result{Scenario: "sessions", Label: cfg.Label, Proto: cfg.Proto.Name, Runs: 1, Conns: cfg.Sessions, Depth: cfg.Depth}
	s := newSessions(e, cfg.Proto, dst, cfg.Sessions, cfg.Interval, cfg.Timeout, res)
	s.batch, s.depth, s.check = bytes.Repeat(cfg.Proto.Session, cfg.Depth), cfg.Depth, true
	s.setupTimeout = int64(cfg.SetupTimeout)
	if cfg.ProxyV2 {
		s.pp = newProxyPrefix(dst)
		res.ProxyV2 = true
	}
	s.stopAt = 1 << 62
	setupDeadline := e.now() + int64(cfg.SetupTimeout)
	err = e.run(setupDeadline, func(now int64) (int64, bool) {
		s.open(now)
		return 0, s.setupDone()
	})
	if err != nil {
		return nil, err
	}
	if s.ready < cfg.Sessions {
		return res, fmt.Errorf("sessions: %d of %d established within %v (%s)", s.ready, cfg.Sessions, cfg.SetupTimeout, kinds(res.ErrorKinds))
	}
	probe := newCPUProbe(cfg.ServerPIDs)
	t0 := e.now()
	s.from, s.to = t0+int64(cfg.Warmup), t0+int64(cfg.Warmup+cfg.Duration)
	s.stopAt = s.to
	s.begin(t0)
	var marked, ended bool
	var d cpuDelta
	err = e.run(s.to+int64(cfg.Timeout)+int64(time.Second), func(now int64) (int64, bool) {
		if !marked && now >= s.from {
			probe.mark()
			marked = true
		}
		if marked && !ended && now >= s.to {
			d = probe.delta()
			ended = true
		}
		wake := s.from
		if marked {
			wake = s.to
		}
		return wake, ended && s.outstand == 0
	})
	if err != nil {
		return nil, err
	}
	if !ended {
		d = probe.delta()
	}
	res.Window = cfg.Duration.Seconds()
	res.Ops = s.ops
	res.PerSec = float64(s.ops) / res.Window
	res.setLatency(&s.lat)
	res.setCPU(d, s.ops)
	return res, nil
}
