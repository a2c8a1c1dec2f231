package load

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/stats"
)

// StormConfig configures the storm scenario.
type StormConfig struct {
	Addr  string // 127.x.y.z:port
	Proto *Proto
	// Open selects the open loop: new connections at Rate per second whatever the server does
	// (at most MaxInflight at once; starts beyond it are skipped and counted). Otherwise the
	// closed loop keeps Conns connections in flight.
	Open        bool
	Conns       int
	Rate        float64
	MaxInflight int
	Warmup      time.Duration // run, unmeasured, before the window
	Duration    time.Duration // the measured window
	Timeout     time.Duration // per connection, connect to reply
	ServerPIDs  []int         // roots of the server-side process trees whose CPU is measured
	Label       string
	// ProxyV2 sends a PROXY v2 header (a made-up client, the real destination) in front of
	// the request, in the same write, as a balancer does; the reply is still the request's.
	ProxyV2 bool
}

func (c *StormConfig) defaults() error {
	if c.Proto == nil {
		return errors.New("storm: no protocol")
	}
	if c.Open && c.Rate <= 0 {
		return errors.New("storm: open loop needs a rate > 0")
	}
	if !c.Open && c.Conns <= 0 {
		return errors.New("storm: closed loop needs a concurrency > 0")
	}
	if c.Duration <= 0 {
		return errors.New("storm: duration must be > 0")
	}
	if c.Timeout <= 0 {
		c.Timeout = 5 * time.Second
	}
	if c.MaxInflight <= 0 {
		c.MaxInflight = 4096
	}
	return nil
}

// storm drives storm connections on an engine. It is also one half of the reload scenario.
type storm struct {
	e       *engine
	p       *Proto
	dst     *unix.SockaddrInet4
	pp      *proxyPrefix // nil: no PROXY header
	timeout int64
	free    []*conn

	inflight    int
	closed      bool    // closed loop: refill as connections end
	conns       int     // closed loop: connections in flight
	interval    float64 // open loop: nanoseconds between starts
	next        float64 // open loop: engine time of the next start
	maxInflight int     // open loop: starts beyond this many in flight are skipped
	stopAt      int64   // no new connection from then on
	backoff     int64   // no new connection before then (after a failed socket or connect call)

	from, to int64 // the window: connections that end inside it are counted
	lat      stats.Samples
	ops      int64
	attempts int64
	failed   int64
	res      *Result
}

func (s *storm) get() *conn {
	if n := len(s.free); n > 0 {
		c := s.free[n-1]
		s.free = s.free[:n-1]
		return c
	}
	return &conn{fd: -1, h: s, hidx: -1}
}

func (s *storm) start(now int64) {
	c := s.get()
	c.begin = now
	c.need = s.p.greeting() + s.p.expect(s.p.Storm)
	s.attempts++
	if err := s.e.dial(c, s.dst, netip.Addr{}); err != nil {
		s.failed++
		s.res.addError(errKind(err))
		s.free = append(s.free, c)
		s.backoff = now + int64(time.Millisecond)
		return
	}
	s.inflight++
	s.e.setTimer(c, now+s.timeout)
	if c.connected {
		s.send(c, now)
	}
}

func (s *storm) send(c *conn, now int64) bool {
	req := s.p.Storm
	if s.pp != nil {
		req = s.pp.with(req)
	}
	n, err := unix.Write(c.fd, req)
	if err != nil {
		s.fail(c, sysErr("write", err))
		return false
	}
	if n < len(req) {
		s.fail(c, sysErr("write", io.ErrShortWrite))
		return false
	}
	return true
}

func (s *storm) event(c *conn, ev uint32) {
	now := s.e.now()
	if !c.connected {
		if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			err := soError(c.fd)
			if err == nil {
				err = unix.ECONNRESET
			}
			s.fail(c, sysErr("connect", err))
			return
		}
		if ev&unix.EPOLLOUT == 0 {
			return
		}
		c.connected = true
		if !s.send(c, now) {
			return
		}
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) == 0 {
		return
	}
	buf := s.e.rbuf
	for {
		n, err := unix.Read(c.fd, buf)
		switch {
		case err == unix.EAGAIN:
			return
		case err == unix.EINTR:
			continue
		case err != nil:
			s.fail(c, sysErr("read", err))
			return
		case n == 0:
			s.fail(c, sysErr("read", io.EOF))
			return
		}
		c.need -= s.p.consume(buf[:n])
		if c.need <= 0 {
			s.finish(c, now)
			return
		}
		if n < len(buf) {
			return
		}
	}
}

func (s *storm) timer(c *conn) { s.fail(c, errors.New("timeout")) }

func (s *storm) finish(c *conn, now int64) {
	if now >= s.from && now < s.to {
		s.ops++
		s.lat.Add(time.Duration(now - c.begin))
	}
	s.release(c)
	if s.closed && now < s.stopAt && now >= s.backoff && s.inflight < s.conns {
		s.start(now)
	}
}

func (s *storm) fail(c *conn, err error) {
	s.failed++
	s.res.addError(errKind(err))
	s.release(c)
}

func (s *storm) release(c *conn) {
	s.e.closeConn(c)
	s.inflight--
	c.connected = false
	s.free = append(s.free, c)
}

// tick starts what the loop calls for at now and returns when it wants to run next (0: no
// particular time).
func (s *storm) tick(now int64) int64 {
	if now >= s.stopAt {
		return 0
	}
	if now < s.backoff {
		return s.backoff
	}
	if s.closed {
		for s.inflight < s.conns && now >= s.backoff {
			s.start(now)
		}
		return 0
	}
	for int64(s.next) <= now && int64(s.next) < s.stopAt {
		if s.inflight < s.maxInflight {
			s.start(now)
		} else {
			s.res.Skipped++
		}
		s.next += s.interval
	}
	return int64(s.next)
}

// Storm runs the storm scenario.
func Storm(cfg StormConfig) (*Result, error) {
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
	res := &Result{Scenario: "storm", Mode: "closed", Label: cfg.Label, Proto: cfg.Proto.Name, Runs: 1, Conns: cfg.Conns}
	if cfg.Open {
		res.Mode, res.Conns, res.Target = "open", 0, cfg.Rate
	}
	probe := newCPUProbe(cfg.ServerPIDs)
	t0 := e.now()
	s := &storm{e: e, p: cfg.Proto, dst: dst, timeout: int64(cfg.Timeout), res: res,
		closed: !cfg.Open, conns: cfg.Conns, interval: 1e9 / max(cfg.Rate, 1e-9), next: float64(t0), maxInflight: cfg.MaxInflight,
		from: t0 + int64(cfg.Warmup), to: t0 + int64(cfg.Warmup+cfg.Duration)}
	if cfg.ProxyV2 {
		s.pp = newProxyPrefix(dst)
		res.ProxyV2 = true
	}
	s.stopAt = s.to
	var marked, ended bool
	var d cpuDelta
	deadline := s.to + int64(cfg.Timeout) + int64(time.Second)
	err = e.run(deadline, func(now int64) (int64, bool) {
		if !marked && now >= s.from {
			probe.mark()
			marked = true
		}
		if marked && !ended && now >= s.to {
			d = probe.delta()
			ended = true
		}
		wake := s.tick(now)
		if !marked {
			wake = minWake(wake, s.from)
		} else if !ended {
			wake = minWake(wake, s.to)
		}
		return wake, ended && s.inflight == 0
	})
	if err != nil {
		return nil, err
	}
	if !ended {
		d = probe.delta()
	}
	if s.inflight > 0 {
		res.addError(fmt.Sprintf("still in flight at the deadline ×%d", s.inflight))
	}
	res.Window = cfg.Duration.Seconds()
	res.Ops = s.ops
	res.PerSec = float64(s.ops) / res.Window
	res.setLatency(&s.lat)
	res.setCPU(d, s.ops)
	return res, nil
}

func minWake(a, b int64) int64 {
	if a == 0 || b < a {
		return b
	}
	return a
}
