package worker

import (
	"errors"
	"io"
	"math"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sockConn is a net.Conn straight over a handed-off socket held in an *os.File: the os package
// gives it the poller and deadlines; sockConn gives it net's error shapes (*net.OpError,
// net.ErrClosed), the addresses batond sent, splice for io.Copy, and raw reads and writes.
//
// Reads and writes are recv/send with MSG_DONTWAIT as raw syscalls inside the file's RawConn
// (which parks on the poller on EAGAIN and enforces deadlines). They cannot block, and the
// ordinary syscall path (entersyscall) wakes the Go runtime's sysmon thread whenever the
// process had been idle: measured at a few thousand connections a second, that was a fifth of
// a worker's CPU.
type sockConn struct {
	f             *os.File
	raw           syscall.RawConn // f's, made once
	local, remote net.Addr
	rd, wr        rawOp

	// pipes caches ReadFrom/WriteTo's splice pipes, shared with the other connections of the
	// Listener; nil makes a pipe per call.
	pipes *pipePool
	// closed is set before f is closed: errors from f's RawConn do not say "closed" in a way
	// errors.Is recognises (see spliceEnd.rawErr).
	closed atomic.Bool

	mu  sync.Mutex
	tcp *net.TCPConn // made on demand by tcpConn; closed with the conn
}

var (
	_ net.Conn      = (*sockConn)(nil)
	_ io.ReaderFrom = (*sockConn)(nil)
	_ io.WriterTo   = (*sockConn)(nil)
	_ spliceable    = (*sockConn)(nil)
)

func (s *sockConn) opErr(op string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	var pe *os.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	if errors.Is(err, os.ErrClosed) {
		err = net.ErrClosed
	}
	return &net.OpError{Op: op, Net: "tcp", Source: s.local, Addr: s.remote, Err: err}
}

// rawOp is one direction's raw I/O: the RawConn callback is a method value made once per
// connection, so a Read or Write allocates nothing, and mu serializes the direction (the
// callback's arguments and results live here) as net's own fd locks do.
type rawOp struct {
	mu    sync.Mutex
	fn    func(uintptr) bool
	buf   []byte
	n     int
	errno syscall.Errno
}

// maxRW bounds one raw write so that a huge Write cannot hold the runtime's P for long in a
// syscall the scheduler does not see (the socket's send buffer bounds it anyway).
const maxRW = 1 << 20

func newSockConn(fd int, pipes *pipePool) *sockConn {
	s := &sockConn{f: os.NewFile(uintptr(fd), "tcp"), pipes: pipes}
	s.raw, _ = s.f.SyscallConn() // fails only for a nil or closed file
	s.rd.fn = func(fd uintptr) bool { return rawIO(fd, &s.rd, unix.SYS_RECVFROM, unix.MSG_DONTWAIT) }
	s.wr.fn = func(fd uintptr) bool { return rawIO(fd, &s.wr, unix.SYS_SENDTO, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL) }
	return s
}

// rawIO is one recvfrom or sendto (trap) of op.buf on fd, for op.fn: EAGAIN hands the wait to
// the poller, EINTR retries.
func rawIO(fd uintptr, op *rawOp, trap, flags uintptr) bool {
	for {
		r, _, errno := unix.RawSyscall6(trap, fd, uintptr(unsafe.Pointer(unsafe.SliceData(op.buf))), uintptr(len(op.buf)), flags, 0, 0)
		switch errno {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		op.n, op.errno = int(r), errno
		return true
	}
}

func (s *sockConn) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	s.rd.mu.Lock()
	s.rd.buf, s.rd.n, s.rd.errno = b, 0, 0
	err := s.raw.Read(s.rd.fn)
	n, errno := s.rd.n, s.rd.errno
	s.rd.buf = nil
	s.rd.mu.Unlock()
	switch {
	case err != nil:
		return 0, s.opErr("read", s.rawErr(err))
	case errno != 0:
		return 0, s.opErr("read", os.NewSyscallError("recvfrom", errno))
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// Write writes all of b (as net's Write does), waiting for room as needed.
func (s *sockConn) Write(b []byte) (int, error) {
	s.wr.mu.Lock()
	defer s.wr.mu.Unlock()
	written := 0
	for written < len(b) || len(b) == 0 {
		s.wr.buf, s.wr.n, s.wr.errno = b[written:min(len(b), written+maxRW)], 0, 0
		err := s.raw.Write(s.wr.fn)
		n, errno := s.wr.n, s.wr.errno
		s.wr.buf = nil
		switch {
		case err != nil:
			return written, s.opErr("write", s.rawErr(err))
		case errno != 0:
			return written, s.opErr("write", os.NewSyscallError("sendto", errno))
		}
		written += n
		if len(b) == 0 {
			break
		}
	}
	return written, nil
}

// rawErr makes what the file's RawConn returned (a deadline, or a closed file) what net
// reports: internal/poll's "use of closed file" matches neither os.ErrClosed nor net.ErrClosed,
// so the closed flag, set before the file is closed, tells it apart.
func (s *sockConn) rawErr(err error) error {
	if s.closed.Load() && !errors.Is(err, os.ErrDeadlineExceeded) {
		return net.ErrClosed
	}
	return err
}

// ReadFrom splices from a TCP socket (a handed-off one, a *net.TCPConn, or either behind an
// *io.LimitedReader) as net does between two *net.TCPConn, so that io.Copy(conn, conn) and
// proxies move bytes without a user-space buffer. Other readers get io.Copy's loop.
func (s *sockConn) ReadFrom(r io.Reader) (int64, error) {
	if s.closed.Load() {
		// Else the copy would first wait for r, maybe for ever, to fail on the first write.
		return 0, s.opErr("readfrom", net.ErrClosed)
	}
	remain, src := int64(math.MaxInt64), r
	lr, limited := r.(*io.LimitedReader)
	if limited {
		if lr.N <= 0 {
			return 0, nil
		}
		remain, src = lr.N, lr.R
	}
	if from, ok := spliceEndOf(src); ok {
		if to, ok := spliceEndOf(s); ok {
			n, handled, err := splice(s.pipes, to, from, remain)
			if limited {
				lr.N -= n
			}
			if handled {
				return n, s.opErr("readfrom", err)
			}
		}
	}
	// The anonymous struct hides ReadFrom, which io.Copy would otherwise call straight back.
	n, err := io.Copy(struct{ io.Writer }{s}, r)
	return n, s.copyErr("readfrom", err)
}

// WriteTo is ReadFrom's mirror: it splices to a TCP socket, and otherwise runs io.Copy's loop.
func (s *sockConn) WriteTo(w io.Writer) (int64, error) {
	if s.closed.Load() {
		return 0, s.opErr("writeto", net.ErrClosed)
	}
	if to, ok := spliceEndOf(w); ok {
		if from, ok := spliceEndOf(s); ok {
			n, handled, err := splice(s.pipes, to, from, math.MaxInt64)
			if handled {
				return n, s.opErr("writeto", err)
			}
		}
	}
	n, err := io.Copy(w, struct{ io.Reader }{s})
	return n, s.copyErr("writeto", err)
}

// copyErr wraps an error of io.Copy's generic loop as net's ReadFrom and WriteTo do. Unlike
// opErr it keeps the cause untouched: it may be the other side's, an *os.File's say.
func (s *sockConn) copyErr(op string, err error) error {
	if err == nil {
		return nil
	}
	return &net.OpError{Op: op, Net: "tcp", Source: s.local, Addr: s.remote, Err: err}
}

func (s *sockConn) spliceConn() net.Conn { return s }

func (s *sockConn) Close() error {
	s.closed.Store(true)
	err := s.f.Close()
	s.mu.Lock()
	if s.tcp != nil {
		s.tcp.Close()
	}
	s.mu.Unlock()
	return s.opErr("close", err)
}

func (s *sockConn) LocalAddr() net.Addr  { return s.local }
func (s *sockConn) RemoteAddr() net.Addr { return s.remote }

func (s *sockConn) SetDeadline(t time.Time) error {
	return s.opErr("set", s.f.SetDeadline(t))
}

func (s *sockConn) SetReadDeadline(t time.Time) error {
	return s.opErr("set", s.f.SetReadDeadline(t))
}

func (s *sockConn) SetWriteDeadline(t time.Time) error {
	return s.opErr("set", s.f.SetWriteDeadline(t))
}

func (s *sockConn) shutdown(how int) error {
	raw, err := s.f.SyscallConn()
	if err != nil {
		return s.opErr("close", err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), how) }); err != nil {
		return s.opErr("close", err)
	}
	return s.opErr("close", os.NewSyscallError("shutdown", serr))
}

func (s *sockConn) CloseWrite() error { return s.shutdown(unix.SHUT_WR) }
func (s *sockConn) CloseRead() error  { return s.shutdown(unix.SHUT_RD) }

func (s *sockConn) SyscallConn() (syscall.RawConn, error) { return s.raw, nil }

// tcpConn makes (once) a *net.TCPConn for the same socket, for code that needs the type.
func (s *sockConn) tcpConn() *net.TCPConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tcp == nil {
		if c, err := net.FileConn(s.f); err == nil {
			if tc, ok := c.(*net.TCPConn); ok {
				s.tcp = tc
			} else {
				c.Close()
			}
		}
	}
	return s.tcp
}
