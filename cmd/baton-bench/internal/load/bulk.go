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

type bulk struct {
	e          *engine
	chunk      []byte
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
			n, err := unix.Read(c.fd, b.e.rbuf)
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
		n, err := unix.Write(c.fd, b.chunk)
		if err == unix.EAGAIN {
			break
		}
		if err != nil {
			b.err = sysErr("write", err)
			return
		}
		b.sent += int64(n)
		if n < len(b.chunk) {
			break
		}
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
