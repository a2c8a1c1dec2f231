package load

import (
	"container/heap"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"runtime"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// handler receives a connection's events. Handlers run on the engine's goroutine only.
type handler interface {
	// event is called with the epoll events of c's socket.
	event(c *conn, ev uint32)
	// timer is called when c's timer fires.
	timer(c *conn)
}

// conn is one client socket and the state a scenario keeps for it. An engine owns its conns'
// descriptors: closeConn closes them.
type conn struct {
	fd        int
	gen       uint32 // distinguishes this socket from an earlier one with the same fd number
	h         handler
	connected bool
	timerAt   int64 // engine time; meaningful while hidx >= 0
	hidx      int   // index in the timer heap, -1 when no timer is set

	// Scenario state.
	begin int64 // engine time the current operation began
	need  int   // bytes (echo) or lines (line protocol) still expected for the current reply
	phase int   // the scenario's own states
	// owed: the PROXY header has not been sent yet (sessions with ProxyV2).
	owed bool
	// off is the position within the expected reply (Proto.Reply) of the next byte read, for
	// sessions that check their replies.
	off int
}

// engine is an epoll loop over non-blocking client sockets. Not safe for concurrent use: one
// goroutine, locked to its thread while running, drives it.
type engine struct {
	epfd  int
	evs   []unix.EpollEvent
	conns []*conn // by fd
	gen   uint32
	epoch time.Time
	th    timerHeap
	rbuf  []byte
	// nodelay sets TCP_NODELAY on every new socket.
	nodelay bool
	// stop makes run return at its next iteration.
	stop bool
}

func newEngine() (*engine, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	return &engine{epfd: fd, evs: make([]unix.EpollEvent, 256), epoch: time.Now(), rbuf: make([]byte, 64<<10)}, nil
}

// close closes every socket still open, then the epoll descriptor.
func (e *engine) close() {
	for _, c := range e.conns {
		if c != nil {
			e.closeConn(c)
		}
	}
	unix.Close(e.epfd)
}

// now is the engine's clock: monotonic nanoseconds since the engine was made.
func (e *engine) now() int64 { return int64(time.Since(e.epoch)) }

// at converts an engine time back to a wall-clock time.
func (e *engine) at(t int64) time.Time { return e.epoch.Add(time.Duration(t)) }

// dial opens a non-blocking TCP socket to dst (from src, if valid, with the port chosen at
// connect time) and registers it, edge-triggered. SO_LINGER is {on, 0}: close sends RST and
// leaves no TIME_WAIT behind. On success c is open (c.connected tells whether connect already
// finished); on error nothing is left open.
func (e *engine) dial(c *conn, dst *unix.SockaddrInet4, src netip.Addr) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return sysErr("socket", err)
	}
	fail := func(op string, err error) error {
		unix.Close(fd)
		return sysErr(op, err)
	}
	if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}); err != nil {
		return fail("setsockopt", err)
	}
	if e.nodelay {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
			return fail("setsockopt", err)
		}
	}
	if src.IsValid() {
		// Port chosen at connect time, per 4-tuple: each source address then has the whole
		// ephemeral range towards one destination.
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1); err != nil {
			return fail("setsockopt", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: src.As4()}); err != nil {
			return fail("bind", err)
		}
	}
	err = unix.Connect(fd, dst)
	if err != nil && !errors.Is(err, unix.EINPROGRESS) {
		return fail("connect", err)
	}
	e.gen++
	c.fd, c.gen, c.connected, c.hidx = fd, e.gen, err == nil, -1
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(fd), Pad: int32(c.gen)}
	if err := unix.EpollCtl(e.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fail("epoll_ctl", err)
	}
	for fd >= len(e.conns) {
		e.conns = append(e.conns, make([]*conn, len(e.conns)+1024)...)
	}
	e.conns[fd] = c
	return nil
}

// closeConn closes c's socket (RST, see dial) and cancels its timer.
func (e *engine) closeConn(c *conn) {
	e.clearTimer(c)
	if c.fd >= 0 {
		e.conns[c.fd] = nil
		unix.Close(c.fd)
		c.fd = -1
	}
}

// setTimer makes c's handler's timer run at engine time t (replacing an earlier one).
func (e *engine) setTimer(c *conn, t int64) {
	c.timerAt = t
	if c.hidx >= 0 {
		heap.Fix(&e.th, c.hidx)
		return
	}
	heap.Push(&e.th, c)
}

func (e *engine) clearTimer(c *conn) {
	if c.hidx >= 0 {
		heap.Remove(&e.th, c.hidx)
	}
}

// run drives the loop until tick reports done, until the engine time deadline, or until
// e.stop. tick is called at every iteration with the current time; it returns the time it wants
// to be called next (0: no wish) and whether the run is over.
func (e *engine) run(deadline int64, tick func(now int64) (wake int64, done bool)) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// Timers of a thread default to 50 µs of slack: an open-loop schedule wants better.
	_ = unix.Prctl(unix.PR_SET_TIMERSLACK, 1, 0, 0, 0)
	e.stop = false
	for !e.stop {
		now := e.now()
		for len(e.th) > 0 && e.th[0].timerAt <= now {
			c := heap.Pop(&e.th).(*conn)
			c.h.timer(c)
		}
		wake, done := tick(now)
		if done || now >= deadline {
			return nil
		}
		next := deadline
		if wake > 0 && wake < next {
			next = wake
		}
		if len(e.th) > 0 && e.th[0].timerAt < next {
			next = e.th[0].timerAt
		}
		wait := min(max(next-now, 0), int64(20*time.Millisecond))
		n, err := e.wait(wait)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return sysErr("epoll_pwait2", err)
		}
		for i := range n {
			ev := &e.evs[i]
			fd := int(ev.Fd)
			if fd >= len(e.conns) {
				continue
			}
			c := e.conns[fd]
			if c == nil || c.gen != uint32(ev.Pad) {
				continue // closed (and maybe reused) earlier in this batch
			}
			c.h.event(c, ev.Events)
		}
	}
	return nil
}

// wait is epoll_pwait2 with a nanosecond timeout (epoll_wait has only milliseconds).
func (e *engine) wait(ns int64) (int, error) {
	ts := unix.NsecToTimespec(ns)
	r, _, errno := unix.Syscall6(unix.SYS_EPOLL_PWAIT2, uintptr(e.epfd), uintptr(unsafe.Pointer(&e.evs[0])),
		uintptr(len(e.evs)), uintptr(unsafe.Pointer(&ts)), 0, 0)
	if errno == unix.ENOSYS {
		return unix.EpollWait(e.epfd, e.evs, int((ns+999_999)/1_000_000))
	}
	if errno != 0 {
		return 0, errno
	}
	return int(r), nil
}

// soError returns the pending error of fd (SO_ERROR), for a failed connect.
func soError(fd int) error {
	v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return err
	}
	if v == 0 {
		return nil
	}
	return unix.Errno(v)
}

// sysErr wraps a syscall error with the name of the call (as os.NewSyscallError does).
func sysErr(op string, err error) error {
	if err == nil {
		return nil
	}
	return &syscallError{op, err}
}

type syscallError struct {
	op  string
	err error
}

func (e *syscallError) Error() string { return e.op + ": " + e.err.Error() }
func (e *syscallError) Unwrap() error { return e.err }

// errKind names an error for the per-kind error counts: "connect ECONNREFUSED", "read EOF"...
func errKind(err error) string {
	var se *syscallError
	op := ""
	if errors.As(err, &se) {
		op, err = se.op+" ", se.err
	}
	var en unix.Errno
	if errors.As(err, &en) {
		if name := unix.ErrnoName(en); name != "" {
			return op + name
		}
	}
	if errors.Is(err, io.EOF) {
		return op + "EOF"
	}
	return op + err.Error()
}

// timerHeap orders conns by timerAt.
type timerHeap []*conn

func (h timerHeap) Len() int           { return len(h) }
func (h timerHeap) Less(i, j int) bool { return h[i].timerAt < h[j].timerAt }
func (h timerHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].hidx, h[j].hidx = i, j
}
func (h *timerHeap) Push(x any) {
	c := x.(*conn)
	c.hidx = len(*h)
	*h = append(*h, c)
}
func (h *timerHeap) Pop() any {
	old := *h
	c := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	c.hidx = -1
	return c
}

// parseDst resolves a "127.x.y.z:port" address. Only IPv4 loopback is accepted: the benchmark
// never sends traffic off the machine.
func parseDst(addr string) (*unix.SockaddrInet4, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("address %q: %w", addr, err)
	}
	if !ap.Addr().Is4() || !ap.Addr().IsLoopback() {
		return nil, fmt.Errorf("address %q: only IPv4 loopback (127.0.0.0/8) targets are allowed", addr)
	}
	return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}, nil
}
