package admin

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// reserveListener keeps one spare file descriptor for the admin socket. When accept fails
// because the process or the system is out of descriptors (a flood of clients waiting for busy
// workers can take every one), it closes the spare and accepts into the slot that frees, so
// that the operator's `batonctl status` still gets its answer. That connection's descriptor
// then becomes the spare again without its slot ever being free: the listener is dup3'd onto
// it, which closes the connection. (Closing it and opening a new spare would leave the slot
// free for an instant, and the gateway's accept loop, retrying at the same time, would take
// it for good.) One admin connection at a time is served this way.
type reserveListener struct {
	*net.UnixListener
	raw syscall.RawConn

	mu     sync.Mutex
	spare  *os.File // nil while lent out (or if it could not be taken)
	closed bool
}

func newReserveListener(l *net.UnixListener) *reserveListener {
	r := &reserveListener{UnixListener: l}
	r.raw, _ = l.SyscallConn()
	r.mu.Lock()
	r.spare, _ = os.Open(os.DevNull) // O_CLOEXEC, as every os.Open
	r.mu.Unlock()
	return r
}

// lend closes the spare; it reports whether there was one to give.
func (r *reserveListener) lend() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.spare == nil {
		return false
	}
	r.spare.Close()
	r.spare = nil
	return true
}

// keepNew takes a new spare after a lent one was not used.
func (r *reserveListener) keepNew() {
	if f, err := os.Open(os.DevNull); err == nil {
		r.keep(f)
	}
}

// keep makes f the spare (or closes it if there is one, or the listener is closed).
func (r *reserveListener) keep(f *os.File) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.spare != nil || r.closed {
		f.Close()
		return
	}
	r.spare = f
}

func isFDExhaustion(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}

func (r *reserveListener) Accept() (net.Conn, error) {
	c, err := r.UnixListener.Accept()
	if err == nil || !isFDExhaustion(err) || r.raw == nil || !r.lend() {
		return c, err
	}
	// A connection is pending (accept failed on it), so accept4 on the non-blocking socket
	// does not wait. (A listener's RawConn has Control only.) It asks for no peer address:
	// unix.Accept4 fails with EINVAL on the unnamed address of a client that did not bind.
	var nfd uintptr
	var aerr error
	if err := r.raw.Control(func(fd uintptr) {
		var errno unix.Errno
		for {
			nfd, _, errno = unix.Syscall6(unix.SYS_ACCEPT4, fd, 0, 0, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
			if errno != unix.EINTR {
				break
			}
		}
		if errno != 0 {
			aerr = errno
		}
	}); err != nil {
		r.keepNew()
		return nil, err
	}
	if aerr != nil {
		r.keepNew()
		// EAGAIN (the client left) reads as temporary to http.Server, which tries again.
		return nil, &net.OpError{Op: "accept", Net: "unix", Addr: r.Addr(), Err: os.NewSyscallError("accept4", aerr)}
	}
	return &spareConn{f: os.NewFile(nfd, "admin connection"), r: r}, nil
}

// Close closes the listener and the spare.
func (r *reserveListener) Close() error {
	err := r.UnixListener.Close()
	r.lend()
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	return err
}

// spareConn is an admin connection accepted into the spare's slot. It owns f.
type spareConn struct {
	f      *os.File
	r      *reserveListener
	closed atomic.Bool
	once   sync.Once
}

var _ net.Conn = (*spareConn)(nil)

func (c *spareConn) Read(b []byte) (int, error) {
	if c.closed.Load() {
		return 0, net.ErrClosed
	}
	return c.f.Read(b)
}

func (c *spareConn) Write(b []byte) (int, error) {
	if c.closed.Load() {
		return 0, net.ErrClosed
	}
	return c.f.Write(b)
}

func (c *spareConn) LocalAddr() net.Addr                { return c.r.Addr() }
func (c *spareConn) RemoteAddr() net.Addr               { return &net.UnixAddr{Net: "unix"} }
func (c *spareConn) SetDeadline(t time.Time) error      { return c.f.SetDeadline(t) }
func (c *spareConn) SetReadDeadline(t time.Time) error  { return c.f.SetReadDeadline(t) }
func (c *spareConn) SetWriteDeadline(t time.Time) error { return c.f.SetWriteDeadline(t) }

// Close ends the connection and keeps its descriptor as the spare (see reserveListener).
func (c *spareConn) Close() error {
	c.once.Do(func() {
		c.closed.Store(true)
		_ = c.f.SetDeadline(time.Unix(1, 0)) // wake a Read or Write under way
		craw, err := c.f.SyscallConn()
		var derr error = unix.EBADF
		if err == nil {
			_ = c.r.raw.Control(func(lfd uintptr) {
				_ = craw.Control(func(fd uintptr) { derr = unix.Dup3(int(lfd), int(fd), unix.O_CLOEXEC) })
			})
		}
		if derr != nil {
			c.f.Close()
			return
		}
		c.r.keep(c.f)
	})
	return nil
}
