package load

import (
	"errors"
	"io"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// BulkConfig configures the bulk scenario: one connection to an echo server, written to and
// read from as fast as both ends go.
type BulkConfig struct {
	Addr       string
	Warmup     time.Duration
	Duration   time.Duration
	Chunk      int // bytes per write (default 64 KiB)
	ServerPIDs []int
	Label      string
}

// bulk streams through one connection. Both of its directions avoid copying in this process:
// writes go through a pipe (vmsplice of one constant buffer, then splice into the socket) and
// reads discard with MSG_TRUNC, so that the load generator, not the server, is not the first to
// run out of CPU.
type bulk struct {
	e          *engine
	chunk      []byte
	pr, pw     int // the pipe
	inPipe     int // bytes in the pipe, not yet spliced into the socket
	sent, recv int64
	err        error
}

func (b *bulk) event(c *conn, ev uint32) {
	if b.err != nil {
		return
	}
	if !c.connected {
		if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			b.err = sysErr("connect", soError(c.fd))
			return
		}
		if ev&unix.EPOLLOUT == 0 {
			return
		}
		c.connected = true
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		for {
			// MSG_TRUNC: TCP discards the bytes without copying them out, which halves
			// the client's copying (it is the bottleneck of a one-connection stream).
			n, _, err := unix.Recvfrom(c.fd, b.e.rbuf, unix.MSG_TRUNC)
			if err == unix.EAGAIN {
				break
			}
			if err != nil || n == 0 {
				if err == nil {
					err = io.EOF
				}
				b.err = sysErr("read", err)
				return
			}
			b.recv += int64(n)
			if n < len(b.e.rbuf) {
				break
			}
		}
	}
	// Write whenever there is room: on EPOLLOUT, and after reading (which let the server write
	// back, and so read more of what we sent).
	for range 64 {
		if b.inPipe == 0 {
			n, err := unix.Vmsplice(b.pw, []unix.Iovec{{Base: &b.chunk[0], Len: uint64(len(b.chunk))}}, unix.SPLICE_F_NONBLOCK)
			if err != nil {
				b.err = sysErr("vmsplice", err)
				return
			}
			b.inPipe = n
		}
		n, err := unix.Splice(b.pr, nil, c.fd, nil, b.inPipe, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
		if err == unix.EAGAIN {
			break
		}
		if err != nil {
			b.err = sysErr("splice", err)
			return
		}
		b.inPipe -= int(n)
		b.sent += n
	}
}

func (b *bulk) timer(*conn) {}

// Bulk runs the bulk scenario. MB/s counts the bytes echoed back (1 MB = 10⁶ bytes).
func Bulk(cfg BulkConfig) (*Result, error) {
	if cfg.Duration <= 0 {
		return nil, errors.New("bulk: duration must be > 0")
	}
	if cfg.Chunk <= 0 {
		cfg.Chunk = 64 << 10
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
	res := &Result{Scenario: "bulk", Label: cfg.Label, Proto: "echo", Runs: 1, Conns: 1}
	b := &bulk{e: e, chunk: make([]byte, cfg.Chunk)}
	for i := range b.chunk {
		b.chunk[i] = byte('a' + i%26)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, sysErr("pipe2", err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	b.pr, b.pw = p[0], p[1]
	if _, err := unix.FcntlInt(uintptr(b.pw), unix.F_SETPIPE_SZ, cfg.Chunk); err != nil {
		return nil, sysErr("fcntl F_SETPIPE_SZ", err)
	}
	c := &conn{fd: -1, h: b, hidx: -1}
	if err := e.dial(c, dst, netip.Addr{}); err != nil {
		return nil, err
	}
	if c.connected {
		b.event(c, unix.EPOLLOUT)
	}
	probe := newCPUProbe(cfg.ServerPIDs)
	t0 := e.now()
	from, to := t0+int64(cfg.Warmup), t0+int64(cfg.Warmup+cfg.Duration)
	var marked bool
	var recvFrom, recvTo int64
	var d cpuDelta
	err = e.run(to+int64(time.Second), func(now int64) (int64, bool) {
		if b.err != nil {
			return 0, true
		}
		if !marked && now >= from {
			probe.mark()
			recvFrom, marked = b.recv, true
		}
		if marked && now >= to {
			d = probe.delta()
			recvTo = b.recv
			return 0, true
		}
		if marked {
			return to, false
		}
		return from, false
	})
	if err != nil {
		return nil, err
	}
	if b.err != nil {
		res.addError(errKind(b.err))
		return res, b.err
	}
	res.Window = cfg.Duration.Seconds()
	res.Ops = recvTo - recvFrom
	res.PerSec = float64(res.Ops) / res.Window
	res.MBps = res.PerSec / 1e6
	res.setCPU(d, 0)
	if res.Ops > 0 {
		res.ServerCPUPer = d.Server.Seconds() * 1e6 / (float64(res.Ops) / 1e6)
	}
	return res, nil
}
