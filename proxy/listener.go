package proxy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Listener is one public listening socket as the gateway uses it: accept4 straight from the
// socket, so accepted connections never touch Go's poller (the gateway never reads them; it only
// passes them on).
//
// A net.TCPListener's RawConn refuses Read (EINVAL), so the Listener accepts on its own
// duplicate of the listening fd, wrapped in an os.File whose RawConn parks on the poller until a
// connection is pending. The duplicate is F_DUPFD_CLOEXEC'd through Control, never Fd().
type Listener struct {
	name   string
	ln     *net.TCPListener // not owned, but closed by Close so that accepting stops at once
	f      *os.File         // owned duplicate of ln's fd
	raw    syscall.RawConn
	local  netip.AddrPort // the bound address; unspecified IP means ask the kernel per connection
	closed atomic.Bool    // Close was called: an accept error then means "stop", not a failure
	done   chan struct{}  // closed by Close: ends a coalescing pause at once
	once   sync.Once
	pp     *ProxyProtocol // set by ExpectProxy: every connection starts with a PROXY header
}

// NewListener wraps a TCP listener (from systemd, tableflip or net.Listen). Close closes both
// the Listener's duplicate and ln.
func NewListener(name string, ln *net.TCPListener) (*Listener, error) {
	lraw, err := ln.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("proxy: listener %s: %w", name, err)
	}
	dup, derr := -1, error(nil)
	if err := lraw.Control(func(fd uintptr) {
		dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, fmt.Errorf("proxy: listener %s: %w", name, err)
	}
	if derr != nil {
		return nil, fmt.Errorf("proxy: listener %s: %w", name, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", derr))
	}
	// The duplicate shares the (already non-blocking) open file description, so os.NewFile
	// registers it with the poller.
	f := os.NewFile(uintptr(dup), name)
	raw, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("proxy: listener %s: %w", name, err)
	}
	local := ln.Addr().(*net.TCPAddr).AddrPort()
	return &Listener{name: name, ln: ln, f: f, raw: raw, local: netip.AddrPortFrom(local.Addr().Unmap(), local.Port()), done: make(chan struct{})}, nil
}

// Close stops accepting on this listener in this process. Other processes holding the same
// listening socket (the next batond, systemd) keep it open.
func (l *Listener) Close() error {
	l.closed.Store(true)
	l.once.Do(func() { close(l.done) })
	err := l.f.Close()
	if cerr := l.ln.Close(); err == nil {
		err = cerr
	}
	return err
}

// Name is the listener's name as sent to workers in CONN.
func (l *Listener) Name() string { return l.name }

// Addr is the bound address.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// SetNoDelay sets TCP_NODELAY on a listening socket: Linux copies it to every accepted socket,
// so game traffic is not Nagle-delayed and workers need not set it again.
func SetNoDelay(ln *net.TCPListener) error {
	raw, err := ln.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}); err != nil {
		return err
	}
	return os.NewSyscallError("setsockopt TCP_NODELAY", serr)
}

// acceptor holds one accept loop's state, so that the RawConn callbacks are method values made
// once and accepting allocates nothing of its own.
type acceptor struct {
	l     *Listener
	fn    func(uintptr) bool // accept4, parking on the poller while nothing is pending
	tryFn func(uintptr) bool // accept4, never parking
	fd    int
	rsa   unix.RawSockaddrAny
	err   error

	// coalesce is the shortest time between two wake-ups of the loop (see accept); 0 wakes
	// for every connection.
	coalesce time.Duration
	woke     time.Time // when the loop last woke
	quiet    bool      // clients come one at a time: park at once, no pause
	timer    *time.Timer
}

func newAcceptor(l *Listener, coalesce time.Duration) *acceptor {
	// Starting counts as a wake-up: a loop that finds clients already waiting takes them all
	// before it pauses.
	a := &acceptor{l: l, coalesce: coalesce, woke: time.Now()}
	a.fn = a.try
	a.tryFn = func(s uintptr) bool { a.try(s); return true }
	return a
}

func (a *acceptor) try(s uintptr) bool {
	for {
		// Non-blocking, because the workers that care (Go's runtime) ask for it (HELLO
		// NONBLOCK) and would otherwise spend two fcntls per connection setting it; dispatch
		// clears it for a worker that wants blocking fds. The gateway itself never does I/O
		// on it. CLOEXEC so that no worker we spawn inherits it.
		// Raw accept4: x/sys's Accept4 turns the address into a Sockaddr with an allocation and,
		// for AF_INET, a getsockopt(SO_PROTOCOL) syscall per connection.
		// A raw syscall (it never blocks: the socket is non-blocking) so that accepting does
		// not wake the runtime's sysmon thread (see handoff's Channel.doSend).
		n := uint32(unix.SizeofSockaddrAny)
		fd, _, errno := unix.RawSyscall6(unix.SYS_ACCEPT4, s, uintptr(unsafe.Pointer(&a.rsa)), uintptr(unsafe.Pointer(&n)), unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0, 0)
		a.fd, a.err = int(fd), nil
		if errno != 0 {
			a.fd, a.err = -1, errno
		}
		if a.err == unix.EINTR {
			continue
		}
		return a.err != unix.EAGAIN
	}
}

// accept returns one connected fd with its client and local addresses.
//
// Wake-ups, not handoffs, are what a connection costs an idle gateway: at a few thousand
// connections a second, being woken (epoll, the scheduler, a VM's interrupt path) costs more
// than accept4 and sendmsg together, and each wake-up of batond is followed by one of the
// worker's. So once the backlog is empty, a loop that woke less than coalesce ago does not park
// on the poller at once: it pauses for the rest of the interval and then takes everything that
// arrived meanwhile in one go (and its worker gets them in one go). When a pause finds nobody,
// the loop goes quiet (parks at once) until two wake-ups come less than coalesce apart, so at
// rates below 1/coalesce nothing changes; above, a connection waits at most coalesce longer.
func (a *acceptor) accept() (int, netip.AddrPort, netip.AddrPort, error) {
	park, paused := false, false
	for {
		fn := a.tryFn
		if a.coalesce == 0 || park {
			fn = a.fn
		}
		if err := a.l.raw.Read(fn); err != nil {
			if a.l.closed.Load() {
				err = net.ErrClosed
			}
			return -1, netip.AddrPort{}, netip.AddrPort{}, err
		}
		if a.err == unix.EAGAIN {
			// Only tryFn returns on EAGAIN: the backlog is empty.
			if wait := a.coalesce - time.Since(a.woke); wait > 0 && !a.quiet && !paused {
				if !a.pause(wait) {
					return -1, netip.AddrPort{}, netip.AddrPort{}, net.ErrClosed
				}
				a.woke, paused = time.Now(), true
				continue
			}
			if paused {
				// The pause found nobody: clients come one at a time. Park without pausing
				// until they come faster again (quiet), so that a lone client costs no timer
				// wake-up on top of its own.
				a.quiet = true
			}
			park = true
			continue
		}
		if park {
			// Woken by the poller: clients come quickly if the last wake-up was recent.
			now := time.Now()
			a.quiet = now.Sub(a.woke) >= a.coalesce
			a.woke = now
		}
		break
	}
	return a.result()
}

// tryAccept accepts one more connection if one is waiting, never pausing or parking; an empty
// backlog is an error (EAGAIN).
func (a *acceptor) tryAccept() (int, netip.AddrPort, netip.AddrPort, error) {
	if err := a.l.raw.Read(a.tryFn); err != nil {
		return -1, netip.AddrPort{}, netip.AddrPort{}, err
	}
	return a.result()
}

// result returns what the last accept4 got.
func (a *acceptor) result() (int, netip.AddrPort, netip.AddrPort, error) {
	if a.err != nil {
		return -1, netip.AddrPort{}, netip.AddrPort{}, os.NewSyscallError("accept4", a.err)
	}
	local := a.l.local
	if !local.Addr().IsValid() || local.Addr().IsUnspecified() {
		if sa, err := unix.Getsockname(a.fd); err == nil {
			local = sockaddrAddrPort(sa)
		}
	}
	return a.fd, rawAddrPort(&a.rsa), local, nil
}

// pause sleeps for d, or until the listener is closed (false).
func (a *acceptor) pause(d time.Duration) bool {
	if a.timer == nil {
		a.timer = time.NewTimer(d)
	} else {
		a.timer.Reset(d)
	}
	select {
	case <-a.timer.C:
		return true
	case <-a.l.done:
		a.timer.Stop()
		return false
	}
}

// rawAddrPort decodes an AF_INET or AF_INET6 socket address.
func rawAddrPort(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		p := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(netip.AddrFrom4(p.Addr), ntohs(p.Port))
	case unix.AF_INET6:
		p := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(netip.AddrFrom16(p.Addr).Unmap(), ntohs(p.Port))
	}
	return netip.AddrPort{}
}

// ntohs reads a port as the kernel stores it (network byte order) in a uint16.
func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

func sockaddrAddrPort(sa unix.Sockaddr) netip.AddrPort {
	switch v := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(v.Addr), uint16(v.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(v.Addr).Unmap(), uint16(v.Port))
	}
	return netip.AddrPort{}
}

// closeFD closes batond's copy of a handed-off socket, the one per-connection syscall of batond
// that used to go through the runtime's entersyscall: at saturation it woke batond's sysmon
// thread about once per burst, and on one core each of those wake-ups is a switch away from a
// worker and back (raw: 13.6-14.0k -> 15.2-15.5k conn/s, 71 -> 64 us per connection, in
// interleaved hand runs). A raw close must not block, though, and close can: if the worker
// already closed its copy (a short session) batond's is the last reference, and with SO_LINGER
// set to a timeout the kernel waits for the FIN to be acknowledged. So a socket with a linger
// timeout is closed the ordinary way (the runtime lets other goroutines run meanwhile). A worker
// that sets it in the microsecond between the check and the close would stall batond's accept
// loop until the runtime's preemption signal interrupts the wait (14-18 ms in
// TestCloseFDLingerDoesNotStallTheRuntime with the check removed), not longer.
func closeFD(fd int) {
	var l unix.Linger
	n := uint32(unsafe.Sizeof(l))
	_, _, errno := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER,
		uintptr(unsafe.Pointer(&l)), uintptr(unsafe.Pointer(&n)), 0)
	if errno != 0 || (l.Onoff != 0 && l.Linger > 0) {
		unix.Close(fd)
		return
	}
	unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0)
}

// temporary reports whether an accept error is resource exhaustion (back off and retry) rather
// than the end of the listener.
func temporary(err error) bool {
	return errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) ||
		errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.ENOMEM)
}

// retryAtOnce reports errors that concern only the one connection that failed.
func retryAtOnce(err error) bool {
	return errors.Is(err, unix.ECONNABORTED) || errors.Is(err, unix.EPROTO) ||
		errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENETDOWN) || errors.Is(err, unix.EHOSTUNREACH)
}

// Backoff for fd exhaustion: 5 ms doubling to 1 s.
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)
