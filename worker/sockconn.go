package worker

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// sockConn is a net.Conn straight over a handed-off socket held in an *os.File: the os package
// gives it the poller, deadlines and io.Copy fast paths; sockConn gives it net's error shapes
// (*net.OpError, net.ErrClosed) and the addresses batond sent.
type sockConn struct {
	f             *os.File
	local, remote net.Addr

	mu  sync.Mutex
	tcp *net.TCPConn // made on demand by tcpConn; closed with the conn
}

var _ net.Conn = (*sockConn)(nil)

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

func (s *sockConn) Read(b []byte) (int, error) {
	n, err := s.f.Read(b)
	return n, s.opErr("read", err)
}

func (s *sockConn) Write(b []byte) (int, error) {
	n, err := s.f.Write(b)
	return n, s.opErr("write", err)
}

func (s *sockConn) Close() error {
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

func (s *sockConn) SyscallConn() (syscall.RawConn, error) { return s.f.SyscallConn() }

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
