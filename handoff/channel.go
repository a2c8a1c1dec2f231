package handoff

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrWouldBlock is returned by TrySend when the peer's receive queue is full: the peer is not
// reading, and the caller decides whether that is a stall.
var ErrWouldBlock = errors.New("handoff: peer is not reading (send would block)")

// oobRecvSpace leaves room for a few fds so that a peer sending two or three is reported as
// ErrFDs (and the extra fds closed) rather than silently truncated by the kernel.
var oobRecvSpace = unix.CmsgSpace(4 * 4)

// Channel is one SOCK_SEQPACKET connection between the gateway and a worker. Sends are safe for
// concurrent use; Recv must be called from one goroutine at a time.
type Channel struct {
	c   *net.UnixConn
	raw syscall.RawConn

	smu     sync.Mutex // guards the fields below, used by trySend
	sendMsg []byte
	sendOOB []byte
	sendErr error
	sendFn  func(uintptr) bool // method value made once, so sends do not allocate
	rights  []byte             // a ready SCM_RIGHTS header for one fd

	roob []byte
}

// NewChannel wraps c, which must be a connected SOCK_SEQPACKET Unix socket. The Channel owns c.
func NewChannel(c *net.UnixConn) (*Channel, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("handoff: raw conn: %w", err)
	}
	ch := &Channel{c: c, raw: raw, rights: unix.UnixRights(0), roob: make([]byte, oobRecvSpace)}
	ch.sendFn = ch.doSend
	return ch, nil
}

// Dial connects to a registration socket.
func Dial(path string) (*Channel, error) {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, err
	}
	ch, err := NewChannel(c)
	if err != nil {
		c.Close()
		return nil, err
	}
	return ch, nil
}

// Conn returns the underlying connection (for deadlines).
func (ch *Channel) Conn() *net.UnixConn { return ch.c }

// Close closes the channel.
func (ch *Channel) Close() error { return ch.c.Close() }

// Send writes one message, waiting (through the runtime poller) while the peer's queue is full.
func (ch *Channel) Send(msg []byte) error {
	if len(msg) > MaxMessage {
		return ErrTooBig
	}
	_, err := ch.c.Write(msg)
	return err
}

// TrySend writes one message without waiting, with fd (if fd >= 0) attached as SCM_RIGHTS. The
// caller keeps ownership of fd. It returns ErrWouldBlock if the peer's queue is full.
func (ch *Channel) TrySend(msg []byte, fd int) error {
	if len(msg) > MaxMessage {
		return ErrTooBig
	}
	ch.smu.Lock()
	ch.sendMsg = msg
	ch.sendOOB = nil
	if fd >= 0 {
		rightsFD(ch.rights, fd)
		ch.sendOOB = ch.rights
	}
	err := ch.raw.Write(ch.sendFn)
	if err == nil {
		err = ch.sendErr
	}
	ch.sendMsg, ch.sendOOB, ch.sendErr = nil, nil, nil
	ch.smu.Unlock()
	return err
}

func (ch *Channel) doSend(fd uintptr) bool {
	for {
		_, err := unix.SendmsgN(int(fd), ch.sendMsg, ch.sendOOB, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
		switch err {
		case nil:
			ch.sendErr = nil
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			ch.sendErr = ErrWouldBlock
		default:
			ch.sendErr = os.NewSyscallError("sendmsg", err)
		}
		return true // never park: a full queue is the caller's decision
	}
}

// rightsFD writes fd into a one-fd SCM_RIGHTS control message made by unix.UnixRights.
func rightsFD(b []byte, fd int) {
	// The fd is the last 4 bytes of the data part (CmsgLen(4) from the start).
	off := unix.CmsgLen(4) - 4
	binary.NativeEndian.PutUint32(b[off:], uint32(int32(fd)))
}

// Recv reads one message into buf (which should be MaxMessage bytes) and returns it with the fd
// it carried (-1 if none). It enforces the fd rules: exactly one fd on CONN, none on anything
// else. On every error it closes any fds that arrived. At end of stream it returns io.EOF.
func (ch *Channel) Recv(buf []byte) (msg []byte, fd int, err error) {
	n, oobn, flags, _, err := ch.c.ReadMsgUnix(buf, ch.roob)
	fds, perr := parseRights(ch.roob[:oobn])
	fail := func(e error) ([]byte, int, error) {
		for _, f := range fds {
			unix.Close(f)
		}
		return nil, -1, e
	}
	if err != nil {
		return fail(err)
	}
	if perr != nil {
		return fail(perr)
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		return fail(fmt.Errorf("%w (flags 0x%x, %d bytes)", ErrTruncated, flags, n))
	}
	if n == 0 {
		return fail(io.EOF)
	}
	msg = buf[:n]
	t := Type(msg[0])
	switch {
	case t == TypeConn && len(fds) != 1:
		return fail(fmt.Errorf("%w: CONN with %d fds", ErrFDs, len(fds)))
	case t != TypeConn && len(fds) != 0:
		return fail(fmt.Errorf("%w: %s with %d fds", ErrFDs, t, len(fds)))
	}
	if len(fds) == 1 {
		return msg, fds[0], nil
	}
	return msg, -1, nil
}

// parseRights extracts SCM_RIGHTS fds without allocating when there are none.
func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("%w: control message: %v", ErrTruncated, err)
	}
	var fds []int
	for i := range cmsgs {
		if cmsgs[i].Header.Level != unix.SOL_SOCKET || cmsgs[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&cmsgs[i])
		if err != nil {
			for _, f := range fds {
				unix.Close(f)
			}
			return nil, fmt.Errorf("%w: rights: %v", ErrTruncated, err)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// PeerCred returns the peer's credentials as the kernel recorded them at connect time.
func (ch *Channel) PeerCred() (*unix.Ucred, error) {
	var (
		cred *unix.Ucred
		gerr error
	)
	err := ch.raw.Control(func(fd uintptr) {
		cred, gerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if err == nil {
		err = gerr
	}
	if err != nil {
		return nil, os.NewSyscallError("getsockopt SO_PEERCRED", err)
	}
	return cred, nil
}

// Listen creates the registration socket (SOCK_SEQPACKET) at path with the given file mode; see
// ListenUnix.
func Listen(path string, mode os.FileMode) (*net.UnixListener, error) {
	return ListenUnix("unixpacket", path, mode)
}

// ListenUnix creates a Unix socket listener at path with the given file mode, atomically: it
// binds a temporary name, sets the mode, then renames it into place, so that the socket is never
// reachable with the umask's looser mode. A stale socket at path (nobody listening) is replaced;
// a live one is an error wrapping ErrInUse, because another process owns it. The listener does
// not unlink the path on Close: the next batond may inherit it (tableflip).
func ListenUnix(network, path string, mode os.FileMode) (*net.UnixListener, error) {
	if c, err := net.Dial(network, path); err == nil {
		c.Close()
		return nil, fmt.Errorf("%s: %w", path, ErrInUse)
	}
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".%s.%d.tmp", filepath.Base(path), os.Getpid()))
	_ = os.Remove(tmp)
	l, err := net.ListenUnix(network, &net.UnixAddr{Name: tmp, Net: network})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, mode); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, err
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, err
	}
	return l, nil
}

// ErrInUse says another live process serves the socket path.
var ErrInUse = errors.New("socket is in use by a live process")
