package proxy

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/handoff"
)

// fakeWorker is the worker end of a real SOCK_SEQPACKET pair attached to a Gateway.
type fakeWorker struct {
	t   *testing.T
	ch  *handoff.Channel
	b   *Backend
	buf []byte
}

func attach(t *testing.T, g *Gateway, slot int, nonblock bool) *fakeWorker {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(fd int) *handoff.Channel {
		f := os.NewFile(uintptr(fd), "seqpacket")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		ch, err := handoff.NewChannel(c.(*net.UnixConn))
		if err != nil {
			t.Fatal(err)
		}
		return ch
	}
	gw, wk := mk(fds[0]), mk(fds[1])
	t.Cleanup(func() { wk.Close() })
	b := g.Add(BackendInfo{Slot: slot, Ready: true, Nonblock: nonblock, Capacity: 100}, gw, nil)
	return &fakeWorker{t: t, ch: wk, b: b, buf: make([]byte, handoff.MaxMessage)}
}

// serve answers CONNs until stop is closed: it checks each fd's blocking mode against what the
// worker asked for, acks it, and reports every second one closed at once. It returns the number
// of connections it got and of those it still holds.
func (w *fakeWorker) serve(stop <-chan struct{}) (got, held int, err error) {
	for {
		_ = w.ch.Conn().SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		msg, fd, rerr := w.ch.Recv(w.buf)
		if errors.Is(rerr, os.ErrDeadlineExceeded) {
			select {
			case <-stop:
				return got, held, nil
			default:
				continue
			}
		}
		if rerr != nil {
			return got, held, rerr
		}
		typ, body, _ := handoff.Split(msg)
		if typ == handoff.TypePing {
			continue
		}
		var info handoff.ConnInfo
		if typ != handoff.TypeConn || handoff.ParseConn(body, &info) != nil {
			unix.Close(fd)
			return got, held, fmt.Errorf("got %s, want CONN", typ)
		}
		fl, ferr := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		unix.Close(fd)
		if ferr != nil {
			return got, held, ferr
		}
		if nb := fl&unix.O_NONBLOCK != 0; nb != w.b.Info().Nonblock {
			return got, held, fmt.Errorf("worker %d (asked non-blocking: %v) got O_NONBLOCK=%v", w.b.Info().Slot, w.b.Info().Nonblock, nb)
		}
		got++
		if err := w.ch.Send(handoff.AppendIDs(nil, handoff.TypeAck, []uint64{info.ID})); err != nil {
			return got, held, err
		}
		if got%2 == 0 {
			if err := w.ch.Send(handoff.AppendIDs(nil, handoff.TypeClosed, []uint64{info.ID})); err != nil {
				return got, held, err
			}
		} else {
			held++
		}
	}
}

// The gateway accepts non-blocking and hands each worker the mode it asked for: a worker that
// did not ask (a blocking Python accept loop, any 1.0 worker) must get a blocking socket.
// ACKs and CLOSEDs sent while the gateway is accepting are collected without waking it for
// each (Backend.recv polls); the counts must come out exact all the same.
func TestBlockingModePerWorkerAndPolledAcks(t *testing.T) {
	g := New(Config{})
	defer g.Close()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	l, err := NewListener("game", ln)
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(l)
	defer g.StopAccepting()
	workers := []*fakeWorker{attach(t, g, 0, true), attach(t, g, 1, false)}

	stop := make(chan struct{})
	type result struct{ got, held int }
	results := make([]result, len(workers))
	var wg sync.WaitGroup
	for i, w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, held, err := w.serve(stop)
			if err != nil {
				t.Error(err)
			}
			results[i] = result{got, held}
		}()
	}
	const conns = 40
	for i := 0; i < conns; i++ {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for g.Stats().Acked < conns && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if t.Failed() {
		return
	}
	for i, w := range workers {
		if results[i].got == 0 {
			t.Errorf("worker %d got no connection: the mode check never ran for it", i)
		}
		// Collected by polling or not, every ACK and CLOSED sent must be counted exactly.
		deadline := time.Now().Add(5 * time.Second)
		for w.b.Live() != results[i].held && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if w.b.Live() != results[i].held {
			t.Errorf("worker %d: gateway counts %d live, the worker holds %d", i, w.b.Live(), results[i].held)
		}
	}
	if st := g.Stats(); st.Accepted != conns || st.Acked != conns || st.InFlight != 0 {
		t.Errorf("stats %+v, want %d accepted and acked, none in flight", st, conns)
	}
}
