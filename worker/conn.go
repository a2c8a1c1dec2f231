package worker

import (
	"io"
	"net"
	"os"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/handoff"
)

// Conn is a client connection handed to this worker by batond (or, in fallback mode, accepted
// by the Listener itself). Accept returns it as a net.Conn; AcceptConn returns it typed.
//
// The program owns a Conn and must Close it: Close is what tells batond the worker holds one
// connection fewer (CLOSED). Closing the *net.TCPConn returned by TCPConn instead closes the
// socket but leaves batond counting the connection until the *net.TCPConn is garbage collected.
type Conn struct {
	c      net.Conn
	tcp    *net.TCPConn // nil if the handed-off socket is not TCP
	remote net.Addr
	local  net.Addr
	name   string
	st     *connState
	gc     runtime.Cleanup // reports a close the program forgot; stopped by Close
}

var _ net.Conn = (*Conn)(nil)

// connState is what a close needs. It is separate from Conn and never points at the socket, so
// that a cleanup attached to the socket can use it (runtime.AddCleanup forbids cycles back to
// the object it watches).
type connState struct {
	l      *Listener
	id     uint64
	report bool // send CLOSED for it (false in fallback mode)
	closed atomic.Bool

	info    handoff.ConnInfo // as batond sent it: what a HANDBACK gives back
	resumed *Resumed         // non-nil for a session another worker handed back; set once

	// Migration (migrate.go), guarded by l.mu.
	group string
	ask   *migrateAsk   // batond's pending request for this connection, nil if none
	asked chan struct{} // MigrateRequested's channel: closed while ask is set
}

// claim makes the caller the one that closes and reports: Close or the cleanup, whoever comes
// first.
func (st *connState) claim() bool { return st.closed.CompareAndSwap(false, true) }

func (st *connState) release() { st.l.release(st, st.report) }

// cleanupConn runs when a handed-off socket was garbage collected without Close.
func cleanupConn(st *connState) {
	if st.claim() {
		st.release()
	}
}

// fdConn turns a received client fd into a net.Conn without net.FileConn's dup and its dozen
// syscalls (fcntls, getsockopt, getsockname, getpeername, setsockopts): batond already sent the
// addresses, and options set on its listener (TCP_NODELAY) are inherited by the socket. The
// fd arrives non-blocking if batond granted it (nonblock), else blocking (PROTOCOL.md) and is
// made non-blocking here; then it is wrapped in an *os.File, which puts it on the runtime
// poller. fdConn always consumes fd.
func fdConn(fd int, info *handoff.ConnInfo, nonblock bool, pipes *pipePool) (net.Conn, error) {
	// One check that it is a stream socket at all (a broken gateway could send anything).
	if typ, err := sockType(fd); err != nil || typ != unix.SOCK_STREAM {
		unix.Close(fd)
		if err == nil {
			err = unix.EPROTOTYPE
		}
		return nil, os.NewSyscallError("getsockopt SO_TYPE", err)
	}
	if !nonblock {
		if err := unix.SetNonblock(fd, true); err != nil {
			unix.Close(fd)
			return nil, os.NewSyscallError("fcntl O_NONBLOCK", err)
		}
	}
	sc := newSockConn(fd, pipes)
	if info.Client.IsValid() {
		sc.remote = net.TCPAddrFromAddrPort(info.Client)
	}
	if info.Local.IsValid() {
		sc.local = net.TCPAddrFromAddrPort(info.Local)
	}
	return sc, nil
}

// sockType is getsockopt(SO_TYPE) as a raw syscall. It cannot block, and an ordinary syscall
// here would be the first of this wake-up to go through the runtime's entersyscall, which wakes
// its sysmon thread when the process was idle: a cost per connection that a worker accepting
// directly does not pay before its first read.
func sockType(fd int) (int, error) {
	var v int32
	n := uint32(unsafe.Sizeof(v))
	_, _, errno := unix.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_TYPE,
		uintptr(unsafe.Pointer(&v)), uintptr(unsafe.Pointer(&n)), 0)
	if errno != 0 {
		return 0, errno
	}
	return int(v), nil
}

// newConn wraps c. The addresses from CONN win over the socket's own: with the PROXY protocol
// or a balancer in front, batond knows the real client and the socket does not.
func newConn(l *Listener, c net.Conn, info *handoff.ConnInfo, report bool) *Conn {
	st := &connState{l: l, id: info.ID, report: report, info: *info}
	cn := &Conn{c: c, name: info.Listener, st: st, remote: c.RemoteAddr(), local: c.LocalAddr()}
	if sc, ok := c.(*sockConn); ok {
		// The fast path's socket: the cleanup watches its *os.File (see below).
		cn.gc = runtime.AddCleanup(sc.f, cleanupConn, st)
	}
	if info.Client.IsValid() {
		cn.remote = net.TCPAddrFromAddrPort(info.Client)
	}
	if info.Local.IsValid() {
		cn.local = net.TCPAddrFromAddrPort(info.Local)
	}
	if tc, ok := c.(*net.TCPConn); ok {
		cn.tcp = tc
		// A game that leaks a session (or closes only the TCPConn) would otherwise look like a
		// full worker to batond forever: report the close when the socket itself becomes
		// garbage. Attached to the *net.TCPConn, not the Conn, because a program may keep only
		// the TCPConn and drop the wrapper while the connection is still in use.
		cn.gc = runtime.AddCleanup(tc, cleanupConn, st)
	}
	return cn
}

// ID is the connection id batond gave this connection (PROTOCOL.md CONN.conn_id); it appears in
// batond's logs and admin output. In fallback mode ids are assigned locally from 1.
func (c *Conn) ID() uint64 { return c.st.id }

// ListenerName is the name of the batond listener the client connected to (empty in fallback
// mode).
func (c *Conn) ListenerName() string { return c.name }

// TCPConn returns the underlying *net.TCPConn, for code that needs the concrete type (socket
// options, SyscallConn, a library that type-asserts). It is nil if batond handed over something
// other than a TCP socket. Its RemoteAddr is the socket's peer, which behind a balancer or the
// PROXY protocol is not the client: prefer c.RemoteAddr. Close c, not the TCPConn, so that
// batond learns of the close at once.
//
// For a handed-off connection the first call makes the *net.TCPConn (net.FileConn, so a second
// descriptor for the same socket, closed with c); keep c, not only the TCPConn.
func (c *Conn) TCPConn() *net.TCPConn {
	if c.tcp == nil {
		if sc, ok := c.c.(*sockConn); ok {
			return sc.tcpConn()
		}
	}
	return c.tcp
}

// Close closes the connection and tells batond (CLOSED) exactly once. A second Close returns an
// error wrapping net.ErrClosed, as net's connections do.
func (c *Conn) Close() error {
	if !c.st.claim() {
		return c.closedErr()
	}
	c.gc.Stop()
	err := c.c.Close()
	// Reported after the close, so that batond's count never drops below what this process
	// really holds.
	c.st.release()
	return err
}

func (c *Conn) closedErr() error {
	return &net.OpError{Op: "close", Net: c.network(), Source: c.local, Addr: c.remote, Err: net.ErrClosed}
}

func (c *Conn) network() string {
	if a := c.c.LocalAddr(); a != nil {
		return a.Network()
	}
	return "tcp"
}

// RemoteAddr is the client's address as batond saw it (a *net.TCPAddr), falling back to the
// socket's peer address when batond sent none.
func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// LocalAddr is the address the client connected to, as batond saw it (a *net.TCPAddr).
func (c *Conn) LocalAddr() net.Addr { return c.local }

func (c *Conn) Read(b []byte) (int, error)         { return c.c.Read(b) }
func (c *Conn) Write(b []byte) (int, error)        { return c.c.Write(b) }
func (c *Conn) SetDeadline(t time.Time) error      { return c.c.SetDeadline(t) }
func (c *Conn) SetReadDeadline(t time.Time) error  { return c.c.SetReadDeadline(t) }
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.c.SetWriteDeadline(t) }

// CloseWrite shuts down the writing side (net/http uses it for a graceful close). It does not
// report CLOSED: the connection is still held until Close.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return &net.OpError{Op: "close", Net: c.network(), Source: c.local, Addr: c.remote, Err: syscall.ENOTSUP}
}

// CloseRead shuts down the reading side. Like CloseWrite, it does not report CLOSED.
func (c *Conn) CloseRead() error {
	if cr, ok := c.c.(interface{ CloseRead() error }); ok {
		return cr.CloseRead()
	}
	return &net.OpError{Op: "close", Net: c.network(), Source: c.local, Addr: c.remote, Err: syscall.ENOTSUP}
}

// spliceConn lets ReadFrom and WriteTo of another connection splice straight from or to this
// one's socket (see splice.go): a Conn adds no buffering of its own.
func (c *Conn) spliceConn() net.Conn { return c.c }

// ReadFrom lets io.Copy into the connection use the socket's fast paths (sendfile, splice).
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.c.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.c}, r)
}

// WriteTo lets io.Copy out of the connection use the socket's fast paths (splice).
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	if wt, ok := c.c.(io.WriterTo); ok {
		return wt.WriteTo(w)
	}
	return io.Copy(w, struct{ io.Reader }{c.c})
}

// SyscallConn gives raw access to the socket, as (*net.TCPConn).SyscallConn does.
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.c.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, &net.OpError{Op: "raw-conn", Net: c.network(), Source: c.local, Addr: c.remote, Err: syscall.ENOTSUP}
}
