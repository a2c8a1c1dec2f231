package handoff

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrWouldBlock is returned by TrySend when the peer's receive queue is full (the peer is not
// reading, and the caller decides whether that is a stall), and by TryRecv when nothing is
// queued.
var ErrWouldBlock = errors.New("handoff: peer is not reading (send would block)")

// oobRecvSpace is room for a whole CONNS's fds and a few more, so that a peer sending too many
// is reported as ErrFDs (and the extra fds closed) rather than silently truncated by the kernel.
var oobRecvSpace = unix.CmsgSpace((MaxConns + 4) * 4)

// Channel is one SOCK_SEQPACKET connection between the gateway and a worker. Sends are safe for
// concurrent use; Recv and TryRecv must be called from one goroutine at a time.
type Channel struct {
	c   *net.UnixConn
	raw syscall.RawConn

	smu     sync.Mutex // guards the fields below, used by trySend
	sendMsg []byte
	sendOOB []byte
	sendErr error
	sendFn  func(uintptr) bool // method value made once, so sends do not allocate
	// sendWaitFn is sendFn for Send: on a full queue it asks the poller to wait for room.
	sendWaitFn func(uintptr) bool
	rights     []byte // room for an SCM_RIGHTS control message of up to MaxConns fds

	roob   []byte
	rbuf   []byte // the buffer of the Recv or TryRecv in progress
	rn     int    // bytes, control bytes and flags of the last recvmsg
	roobn  int
	rflags int
	rerr   error
	rfds   []int              // fds of the last message, for Recv and TryRecv
	recvFn func(uintptr) bool // parks on the poller while nothing is queued (Recv)
	tryFn  func(uintptr) bool // never parks (TryRecv)
}

// NewChannel wraps c, which must be a connected SOCK_SEQPACKET Unix socket. The Channel owns c.
func NewChannel(c *net.UnixConn) (*Channel, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("handoff: raw conn: %w", err)
	}
	ch := &Channel{c: c, raw: raw, rights: make([]byte, unix.CmsgSpace(MaxConns*4)),
		roob: make([]byte, oobRecvSpace), rfds: make([]int, 0, MaxConns+4)}
	ch.sendFn = ch.doSend
	ch.sendWaitFn = func(fd uintptr) bool { ch.doSend(fd); return ch.sendErr != ErrWouldBlock }
	ch.recvFn = func(fd uintptr) bool { return ch.doRecv(fd) != unix.EAGAIN }
	ch.tryFn = func(fd uintptr) bool { ch.doRecv(fd); return true }
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
// It sends like TrySend (a raw, non-blocking sendmsg; see doSend) and parks only on a full
// queue.
func (ch *Channel) Send(msg []byte) error {
	if tooBig(msg) {
		return ErrTooBig
	}
	ch.smu.Lock()
	ch.sendMsg, ch.sendOOB = msg, nil
	err := ch.raw.Write(ch.sendWaitFn)
	if err == nil {
		err = ch.sendErr
	}
	ch.sendMsg, ch.sendErr = nil, nil
	ch.smu.Unlock()
	return err
}

// TrySend writes one message without waiting, with fd (if fd >= 0) attached as SCM_RIGHTS. The
// caller keeps ownership of fd. It returns ErrWouldBlock if the peer's queue is full.
func (ch *Channel) TrySend(msg []byte, fd int) error {
	if fd < 0 {
		return ch.TrySendFDs(msg, nil)
	}
	one := [1]int{fd}
	return ch.TrySendFDs(msg, one[:])
}

// TrySendFDs is TrySend with up to MaxConns fds attached (a CONNS), in order.
func (ch *Channel) TrySendFDs(msg []byte, fds []int) error {
	if tooBig(msg) {
		return ErrTooBig
	}
	if len(fds) > MaxConns {
		return fmt.Errorf("%w: %d fds on one message, at most %d", ErrFDs, len(fds), MaxConns)
	}
	ch.smu.Lock()
	ch.sendMsg = msg
	ch.sendOOB = nil
	if len(fds) > 0 {
		ch.sendOOB = putRights(ch.rights, fds)
	}
	err := ch.raw.Write(ch.sendFn)
	if err == nil {
		err = ch.sendErr
	}
	ch.sendMsg, ch.sendOOB, ch.sendErr = nil, nil, nil
	ch.smu.Unlock()
	return err
}

// doSend is one sendmsg(2), as a raw syscall: it never blocks (MSG_DONTWAIT), and an ordinary
// syscall.Syscall would wake the Go runtime's sysmon thread whenever the process had been idle
// (entersyscall), which at a few thousand handoffs a second costs batond more CPU than the
// sendmsg itself.
func (ch *Channel) doSend(fd uintptr) bool {
	var iov unix.Iovec
	if len(ch.sendMsg) > 0 {
		iov.Base = unsafe.SliceData(ch.sendMsg)
		iov.SetLen(len(ch.sendMsg))
	}
	var h unix.Msghdr
	h.Iov = &iov
	h.Iovlen = 1
	if len(ch.sendOOB) > 0 {
		h.Control = unsafe.SliceData(ch.sendOOB)
		h.SetControllen(len(ch.sendOOB))
	}
	for {
		_, _, errno := unix.RawSyscall(unix.SYS_SENDMSG, fd, uintptr(unsafe.Pointer(&h)), unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
		switch errno {
		case 0:
			ch.sendErr = nil
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			ch.sendErr = ErrWouldBlock
		default:
			ch.sendErr = os.NewSyscallError("sendmsg", errno)
		}
		return true // never park: a full queue is the caller's decision
	}
}

// putRights writes an SCM_RIGHTS control message carrying fds into b (which has room for
// MaxConns) and returns it, without the allocation of unix.UnixRights.
func putRights(b []byte, fds []int) []byte {
	b = b[:unix.CmsgSpace(4*len(fds))]
	clear(b)
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level = unix.SOL_SOCKET
	h.Type = unix.SCM_RIGHTS
	h.SetLen(unix.CmsgLen(4 * len(fds)))
	data := b[unix.CmsgLen(0):]
	for i, fd := range fds {
		binary.NativeEndian.PutUint32(data[4*i:], uint32(int32(fd)))
	}
	return b
}

// Recv reads one message into buf (which should be MaxMessage bytes) and returns it with the fd
// it carried (-1 if none). It enforces the fd rules: exactly one fd on CONN, none on anything
// else; a CONNS (whose fds it cannot return) is ErrFDs here, see RecvFDs. On every error it
// closes any fds that arrived. At end of stream it returns io.EOF. A CONN whose fd this process
// could not receive is returned with ErrNoFD (and fd -1).
func (ch *Channel) Recv(buf []byte) (msg []byte, fd int, err error) {
	return ch.recvOne(buf, ch.recvFn)
}

// TryRecv is Recv without waiting: it returns ErrWouldBlock when no message is queued. The
// gateway uses it to collect its workers' ACKs and CLOSEDs while it is awake for accepting
// anyway, instead of being woken for each of them.
func (ch *Channel) TryRecv(buf []byte) (msg []byte, fd int, err error) {
	return ch.recvOne(buf, ch.tryFn)
}

// RecvFDs is Recv for a receiver that takes CONNS too: the message's fds are appended to fds
// (pass a reused slice with room for MaxConns), in order. A CONN or CONNS that arrived whole
// but with fewer fds than it carries (this process is out of descriptors) is returned with the
// fds that did arrive, the first ones, and ErrNoFD; the caller owns those.
func (ch *Channel) RecvFDs(buf []byte, fds []int) ([]byte, []int, error) {
	return ch.recv(buf, fds, ch.recvFn)
}

// TryRecvFDs is RecvFDs without waiting (ErrWouldBlock when no message is queued).
func (ch *Channel) TryRecvFDs(buf []byte, fds []int) ([]byte, []int, error) {
	return ch.recv(buf, fds, ch.tryFn)
}

func (ch *Channel) recvOne(buf []byte, fn func(uintptr) bool) ([]byte, int, error) {
	msg, fds, err := ch.recv(buf, ch.rfds[:0], fn)
	// A CONNS, whole or (ErrNoFD) with some of its fds, is not for a one-fd receiver: every fd
	// that came with it is closed here.
	if len(msg) > 0 && Type(msg[0]) == TypeConns {
		closeAll(fds)
		return nil, -1, fmt.Errorf("%w: CONNS to a receiver that takes one fd at a time", ErrFDs)
	}
	if len(fds) == 0 {
		return msg, -1, err
	}
	return msg, fds[0], err
}

func closeAll(fds []int) {
	for _, f := range fds {
		unix.Close(f)
	}
}

// doRecv is one recvmsg(2) on fd, without the allocations of net's ReadMsgUnix (which decodes
// a sender address a connected socket does not need), as a raw syscall for the reason given at
// doSend (MSG_DONTWAIT: it never blocks; the poller does the waiting). It returns the errno for
// the poller decision and keeps the outcome in ch.
func (ch *Channel) doRecv(fd uintptr) error {
	var iov unix.Iovec
	iov.Base = unsafe.SliceData(ch.rbuf)
	iov.SetLen(len(ch.rbuf))
	var h unix.Msghdr
	h.Iov = &iov
	h.Iovlen = 1
	h.Control = unsafe.SliceData(ch.roob)
	h.SetControllen(len(ch.roob))
	for {
		n, _, errno := unix.RawSyscall(unix.SYS_RECVMSG, fd, uintptr(unsafe.Pointer(&h)), unix.MSG_CMSG_CLOEXEC|unix.MSG_DONTWAIT)
		if errno == unix.EINTR {
			continue
		}
		ch.rn, ch.roobn, ch.rflags, ch.rerr = int(n), int(h.Controllen), int(h.Flags), nil
		if errno != 0 {
			ch.rn, ch.roobn, ch.rflags, ch.rerr = 0, 0, 0, errno
			return errno
		}
		return nil
	}
}

func (ch *Channel) recv(buf []byte, fds []int, fn func(uintptr) bool) (msg []byte, _ []int, err error) {
	if len(buf) == 0 {
		return nil, fds[:0], io.ErrShortBuffer
	}
	ch.rbuf = buf
	err = ch.raw.Read(fn)
	ch.rbuf = nil
	n, oobn, flags := ch.rn, ch.roobn, ch.rflags
	if err == nil && ch.rerr != nil {
		err = ch.rerr
		if err == unix.EAGAIN {
			err = ErrWouldBlock
		} else {
			err = os.NewSyscallError("recvmsg", err)
		}
	}
	ch.rn, ch.roobn, ch.rflags, ch.rerr = 0, 0, 0, nil
	fds, perr := parseRights(fds[:0], ch.roob[:oobn])
	fail := func(e error) ([]byte, []int, error) {
		closeAll(fds)
		return nil, fds[:0], e
	}
	if err != nil {
		return fail(err)
	}
	if perr != nil {
		return fail(perr)
	}
	if n == 0 {
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			return fail(fmt.Errorf("%w (flags 0x%x, %d bytes)", ErrTruncated, flags, n))
		}
		return fail(io.EOF)
	}
	msg = buf[:n]
	t := Type(msg[0])
	want := 0
	switch t {
	case TypeConn, TypeHandback, TypeResume:
		want = 1
	case TypeConns:
		want = ConnsCount(msg) // 0 if too short to say: the decoder reports it malformed
	}
	if flags&unix.MSG_TRUNC == 0 && flags&unix.MSG_CTRUNC != 0 && want > 0 && len(fds) < want {
		// The message is whole; only (some of) its fds could not be installed here: the
		// kernel installs them in order and stops at the first that does not fit. Not a
		// protocol error: the receiver is out of descriptors, and says so (REFUSE) instead
		// of acking what it did not get.
		return msg, fds, fmt.Errorf("%w (%d of %d arrived; flags 0x%x)", ErrNoFD, len(fds), want, flags)
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		return fail(fmt.Errorf("%w (flags 0x%x, %d bytes)", ErrTruncated, flags, n))
	}
	if len(fds) != want {
		return fail(fmt.Errorf("%w: %s with %d fds", ErrFDs, t, len(fds)))
	}
	return msg, fds, nil
}

// parseRights appends the SCM_RIGHTS fds in oob to dst without allocating. Other control
// messages are skipped. A malformed control buffer is ErrTruncated (and whatever fds were
// found are appended, for the caller to close).
func parseRights(dst []int, oob []byte) ([]int, error) {
	hl := unix.CmsgLen(0)
	for len(oob) >= hl {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		l := int(h.Len)
		if l < hl || l > len(oob) {
			return dst, fmt.Errorf("%w: control message of %d bytes in %d", ErrTruncated, l, len(oob))
		}
		if h.Level == unix.SOL_SOCKET && h.Type == unix.SCM_RIGHTS {
			data := oob[hl:l]
			for i := 0; i+4 <= len(data); i += 4 {
				dst = append(dst, int(int32(binary.NativeEndian.Uint32(data[i:]))))
			}
		}
		next := unix.CmsgSpace(l - hl)
		if next >= len(oob) {
			break
		}
		oob = oob[next:]
	}
	return dst, nil
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
// not unlink the path on Close: the next batond may inherit it (tableflip). Errors name path,
// never the temporary name, which means nothing to an operator.
func ListenUnix(network, path string, mode os.FileMode) (*net.UnixListener, error) {
	if len(path) > maxSocketPath {
		return nil, &os.PathError{Op: "listen", Path: path, Err: fmt.Errorf("%w: %d bytes, a Unix socket path has at most %d", ErrPathTooLong, len(path), maxSocketPath)}
	}
	if c, err := net.Dial(network, path); err == nil {
		c.Close()
		return nil, fmt.Errorf("%s: %w", path, ErrInUse)
	}
	dir, pid := filepath.Dir(path), strconv.Itoa(os.Getpid())
	tmp := filepath.Join(dir, "."+filepath.Base(path)+"."+pid+".tmp")
	if len(tmp) > maxSocketPath {
		tmp = filepath.Join(dir, ".baton."+pid) // a long base name: a short temporary one
	}
	_ = os.Remove(tmp)
	l, err := net.ListenUnix(network, &net.UnixAddr{Name: tmp, Net: network})
	if err != nil {
		return nil, atPath("listen", path, err)
	}
	l.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, mode); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, atPath("chmod", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, atPath("listen", path, err)
	}
	return l, nil
}

// maxSocketPath is the longest path a Unix socket can be bound to (sun_path, less its NUL).
const maxSocketPath = len(unix.RawSockaddrUnix{}.Path) - 1

// ErrPathTooLong says a Unix socket path does not fit in sun_path.
var ErrPathTooLong = errors.New("socket path too long")

// atPath restates an error about ListenUnix's temporary name as one about path: the cause
// (an errno, so errors.Is(err, fs.ErrPermission) still works) with the real path.
func atPath(op, path string, err error) error {
	var oe *net.OpError
	var pe *os.PathError
	var le *os.LinkError
	switch {
	case errors.As(err, &oe):
		err = oe.Err
		var se *os.SyscallError
		if errors.As(err, &se) {
			err = se.Err
		}
	case errors.As(err, &pe):
		err = pe.Err
	case errors.As(err, &le):
		err = le.Err
	}
	return &os.PathError{Op: op, Path: path, Err: err}
}

// ErrInUse says another live process serves the socket path.
var ErrInUse = errors.New("socket is in use by a live process")
