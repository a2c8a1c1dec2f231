package worker

import (
	"errors"
	"io"
	"net"
	"os"
	"reflect"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Socket-to-socket copies go through a pipe with splice(2), as net does for two *net.TCPConn
// (internal/poll/splice_linux.go): the bytes never enter user space and no copy buffer is
// allocated. A handed-off socket is an *os.File, which net's splice does not recognise, so this
// is the same loop over the sockets' syscall.RawConn.

const (
	// SPLICE_F_NONBLOCK only makes the pipe side non-blocking; the sockets already are, and an
	// EAGAIN from them is handed back to the poller by returning false from the RawConn callback.
	spliceFlags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK

	// maxSpliceSize bounds one socket→pipe splice, and is what a pipe grows to (F_SETPIPE_SZ)
	// once a copy turns out to be bulk, as net's pipes are from the start: with the default 64
	// KiB, bulk echo ran at about 0.8x a *net.TCPConn's and used a third more CPU.
	//
	// Pipes start at the default because pipe capacity is charged to the user
	// (pipe-user-pages-soft, 64 MiB by default): a copy holds its pipe as long as it runs, an
	// echo session's as long as the connection, and past the limit every new pipe of an
	// unprivileged user, in any of its processes, gets two pages (8 KiB). 64 sessions at 1 MiB
	// each reach it; chatty small-message sessions never grow.
	maxSpliceSize = 1 << 20

	// growAt is the drain that marks a copy as bulk: half a default pipe, which a game's
	// messages do not reach and a bulk copy's drains (a full pipe, mostly) do.
	growAt = 32 << 10
)

// errNoPipe ends a copy that could not get a pipe again after waiting (out of fds, say).
var errNoPipe = errors.New("worker: no pipe for splice (out of file descriptors?)")

// spliceable is implemented by connection types that stand for a socket splice may use
// directly: spliceConn returns a *sockConn or a *net.TCPConn, whose bytes are exactly the
// value's bytes (no buffering or framing of its own in between). Anything else it returns
// makes the copy take the generic path.
type spliceable interface {
	spliceConn() net.Conn
}

// spliceEnd is one socket of a splice.
type spliceEnd struct {
	raw syscall.RawConn
	sc  *sockConn // nil for a *net.TCPConn
}

// spliceEndOf returns the socket under v when io.Copy may bypass v's Read or Write for it.
func spliceEndOf(v any) (spliceEnd, bool) {
	if sp, ok := v.(spliceable); ok {
		v = sp.spliceConn()
	}
	var (
		raw syscall.RawConn
		err error
		sc  *sockConn
	)
	switch c := v.(type) {
	case *sockConn:
		if c == nil {
			return spliceEnd{}, false
		}
		sc = c
		raw = c.raw
	case *net.TCPConn:
		if c == nil {
			return spliceEnd{}, false
		}
		raw, err = c.SyscallConn()
	default:
		tc := netTCPConn(v)
		if tc == nil {
			return spliceEnd{}, false
		}
		raw, err = tc.SyscallConn()
	}
	if err != nil {
		return spliceEnd{}, false
	}
	return spliceEnd{raw: raw, sc: sc}, true
}

// netTCPConn digs the *net.TCPConn out of the wrappers net's own fallback passes to io.Copy
// (tcpConnWithoutReadFrom, tcpConnWithoutWriteTo: a *TCPConn with one method hidden):
// io.Copy(handedOff, tcpConn) calls tcpConn.WriteTo, which only splices to Unix sockets and
// otherwise reaches our ReadFrom through such a wrapper. Matched by exact type, never by
// method set, because a program's own type embedding a *net.TCPConn may buffer or transform
// bytes that splicing its socket would skip. If net renames them, copies lose only speed.
func netTCPConn(v any) *net.TCPConn {
	t := reflect.TypeOf(v)
	if t == nil || t.Kind() != reflect.Struct || t.PkgPath() != "net" {
		return nil
	}
	if name := t.Name(); name != "tcpConnWithoutReadFrom" && name != "tcpConnWithoutWriteTo" {
		return nil
	}
	f := reflect.ValueOf(v).FieldByName("TCPConn")
	if !f.IsValid() || !f.CanInterface() {
		return nil
	}
	tc, _ := f.Interface().(*net.TCPConn)
	return tc
}

// rawErr turns what the end's RawConn returned (a deadline, or a closed socket) into the
// error net itself reports for that.
func (e spliceEnd) rawErr(err error) error {
	if e.sc == nil {
		// net's RawConn wraps the cause in a "raw-read"/"raw-write" *net.OpError; net's own
		// splice reports the bare cause, inside the conn's "readfrom"/"writeto" error.
		var oe *net.OpError
		if errors.As(err, &oe) {
			return oe.Err
		}
		return err
	}
	return e.sc.rawErr(err)
}

// splice copies from src to dst until src's EOF, remain bytes, or an error. handled is false
// only when nothing was done and the generic copy should run instead: no pipe could be made,
// or the kernel cannot splice from src (EINVAL on the first call consumes nothing).
//
// The pipe is held only while bytes move: waiting for src, the copy gives it back to the pool.
// A game's sessions (and an echo's) spend their lives waiting, and a pipe is two fds: held for
// the whole copy, it tripled a worker's fds per session and a worker at RLIMIT_NOFILE then
// could not even receive its next connection.
func splice(pipes *pipePool, dst, src spliceEnd, remain int64) (written int64, handled bool, err error) {
	if pipes != nil {
		pipes.copies.Add(1)
	}
	var p *pipe
	defer func() {
		if p != nil {
			pipes.put(p)
		}
	}()

	var (
		chunk, inPipe int
		drained       int // the last drain's bytes
		serr          error
		noPipe        bool
	)
	// Made once per copy, not per chunk: a closure passed to RawConn escapes.
	drain := func(fd uintptr) bool {
		if p == nil {
			if p = pipes.get(); p == nil {
				noPipe = true
				return true
			}
		}
		for {
			n, err := spliceOnce(int(fd), p.wfd, chunk, p.grown)
			switch err {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				// The pipe is empty on entry, so it is the socket that has nothing: give the
				// pipe back and wait for it.
				pipes.put(p)
				p = nil
				return false
			}
			inPipe, serr = n, err
			return true
		}
	}
	pump := func(fd uintptr) bool {
		for inPipe > 0 {
			n, err := spliceOnce(p.rfd, int(fd), inPipe, p.grown)
			if n > 0 {
				inPipe -= n
				p.data -= n
				written += int64(n)
				continue
			}
			switch err {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false
			case nil:
				// The pipe holds inPipe bytes, so a zero-byte move means no progress at all;
				// looping would spin.
				err = io.ErrNoProgress
			}
			serr = err
			return true
		}
		return true
	}

	for remain > 0 {
		chunk = int(min(remain, maxSpliceSize))
		if err := src.raw.Read(drain); err != nil {
			return written, true, src.rawErr(err)
		}
		if noPipe {
			if !handled {
				return 0, false, nil // out of fds, say: the generic copy needs none
			}
			return written, true, errNoPipe
		}
		if serr != nil {
			if serr == unix.EINVAL && !handled {
				return 0, false, nil
			}
			return written, true, os.NewSyscallError("splice", serr)
		}
		handled = true
		if inPipe == 0 {
			break // EOF
		}
		p.data, drained = inPipe, inPipe
		remain -= int64(inPipe)
		if err := dst.raw.Write(pump); err != nil {
			return written, true, dst.rawErr(err)
		}
		if serr != nil {
			return written, true, os.NewSyscallError("splice", serr)
		}
		if !p.grown && drained >= growAt {
			p.grow()
		}
	}
	return written, true, nil
}

// spliceOnce is one splice(2). It cannot block: the pipe is opened O_NONBLOCK, the flags have
// SPLICE_F_NONBLOCK, and the sockets are non-blocking. A small copy (a game's messages) makes
// it as a raw syscall, for the reason sockConn's reads and writes are raw (an ordinary one wakes
// the runtime's sysmon thread whenever the process was idle). A bulk copy (its pipe grown, see
// growAt) makes it as an ordinary syscall, as net's splice does: a splice of up to 1 MiB then
// lets the runtime hand the P on meanwhile, and the one-connection echo of the benchmark runs at
// a *net.TCPConn's rate (interleaved 3 s runs: 1,993-2,176 MB/s against 1,702-1,805 raw, direct
// 2,107-2,200), at its server CPU per MB too (381-405 against 327-339 µs, the worker's core
// 83 % busy against 57 %). Why the client side of the stream goes faster with it is not
// established (a core kept busy wakes faster than an idle one, on a VM especially: a guess);
// the rate is what users see. A nil error is returned as nil, not Errno(0).
func spliceOnce(in, out, n int, bulk bool) (int, error) {
	var (
		r     uintptr
		errno unix.Errno
	)
	if bulk {
		r, _, errno = unix.Syscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), spliceFlags)
	} else {
		r, _, errno = unix.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), spliceFlags)
	}
	if errno != 0 {
		return 0, errno
	}
	return int(r), nil
}

// pipe is a splice buffer. data counts the bytes in it: a pipe left holding bytes after an
// error would feed them into the next copy, so it is closed instead of reused.
type pipe struct {
	rfd, wfd int
	data     int
	grown    bool // grow was tried (once: a refusal, EPERM past the user's limit, stays)
	cleanup  runtime.Cleanup
}

// grow enlarges an empty pipe to maxSpliceSize. It may fail (the per-user limits); the pipe
// keeps working at its size.
func (p *pipe) grow() {
	p.grown = true
	unix.FcntlInt(uintptr(p.rfd), unix.F_SETPIPE_SZ, maxSpliceSize)
}

func newPipe() (*pipe, error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, os.NewSyscallError("pipe2", err)
	}
	return &pipe{rfd: fds[0], wfd: fds[1]}, nil
}

func closePipeFDs(fds [2]int) {
	unix.Close(fds[0])
	unix.Close(fds[1])
}

// pipePool keeps pipes between copies (a pipe costs three syscalls to make and two to close).
// One pool is meant to be shared by all the connections of a Listener. A sync.Pool drops what
// it holds at garbage collection, so each pipe carries a cleanup that closes its fds then.
type pipePool struct {
	pool sync.Pool
	// copies counts the splice copies that used the pool; tests read it to tell the splice
	// path from io.Copy's.
	copies atomic.Uint64
}

func newPipePool() *pipePool {
	pp := &pipePool{}
	pp.pool.New = func() any {
		p, err := newPipe()
		if err != nil {
			return nil // out of fds, say: the copy falls back to read and write
		}
		p.cleanup = runtime.AddCleanup(p, closePipeFDs, [2]int{p.rfd, p.wfd})
		return p
	}
	return pp
}

// get returns an empty pipe, or nil if none could be made. A nil pool makes a fresh one,
// which put closes.
func (pp *pipePool) get() *pipe {
	if pp == nil {
		p, _ := newPipe()
		return p
	}
	p, _ := pp.pool.Get().(*pipe)
	return p
}

func (pp *pipePool) put(p *pipe) {
	if pp == nil {
		closePipeFDs([2]int{p.rfd, p.wfd})
		return
	}
	if p.data != 0 {
		p.cleanup.Stop()
		closePipeFDs([2]int{p.rfd, p.wfd})
		return
	}
	pp.pool.Put(p)
}
