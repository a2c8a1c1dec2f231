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

// Closing the listener ends a pause at once: with a 10 s interval, a pause that ignored the
// close would keep Serve (and StopAccepting, which a reload waits on) for seconds.
func TestAcceptCoalescePauseEndsOnClose(t *testing.T) {
	g, _, served := serve(t, Config{AcceptCoalesce: 10 * time.Second})
	time.Sleep(50 * time.Millisecond) // the loop found no client: it is pausing now
	start := time.Now()
	stopped := make(chan struct{})
	go func() { g.StopAccepting(); close(stopped) }()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Serve still pausing 3s after the listener closed")
	}
	<-stopped
	t.Logf("Serve returned %v after StopAccepting", time.Since(start))
}

// serve starts a Gateway accepting on a loopback listener; Serve's result arrives on the
// channel. Cleanup stops it.
func serve(t *testing.T, cfg Config) (*Gateway, *net.TCPListener, <-chan error) {
	t.Helper()
	g := New(cfg)
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		g.Close()
		t.Fatal(err)
	}
	l, err := NewListener("game", ln)
	if err != nil {
		ln.Close()
		g.Close()
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- g.Serve(l) }()
	t.Cleanup(func() {
		g.StopAccepting()
		g.Close()
	})
	return g, ln, served
}

// answer answers CONNs until stop is closed: it checks each fd's blocking mode against what the
// worker asked for, acks it, and reports every second one closed at once. It returns the number
// of connections it got and of those it still holds.
func (w *fakeWorker) answer(stop <-chan struct{}) (got, held int, err error) {
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
	g, ln, _ := serve(t, Config{})
	workers := []*fakeWorker{attach(t, g, 0, true), attach(t, g, 1, false)}

	stop := make(chan struct{})
	type result struct{ got, held int }
	results := make([]result, len(workers))
	var wg sync.WaitGroup
	for i, w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, held, err := w.answer(stop)
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

// With AcceptCoalesce, a loop that has just woken does not wake again for the next client: it
// pauses for the rest of the interval and hands over everything that arrived meanwhile. The
// lower bound on when the burst is handed over is what the pause guarantees.
func TestAcceptCoalesce(t *testing.T) {
	const coalesce = 200 * time.Millisecond
	g, ln, served := serve(t, Config{AcceptCoalesce: coalesce})
	w := attach(t, g, 0, true)

	recvConn := func() time.Time {
		t.Helper()
		_ = w.ch.Conn().SetReadDeadline(time.Now().Add(5 * time.Second))
		for {
			msg, fd, err := w.ch.Recv(w.buf)
			if err != nil {
				t.Fatal(err)
			}
			if typ, body, _ := handoff.Split(msg); typ == handoff.TypeConn {
				var info handoff.ConnInfo
				if err := handoff.ParseConn(body, &info); err != nil {
					t.Fatal(err)
				}
				unix.Close(fd)
				if err := w.ch.Send(handoff.AppendIDs(nil, handoff.TypeAck, []uint64{info.ID})); err != nil {
					t.Fatal(err)
				}
				return time.Now()
			}
		}
	}
	dial := func() {
		t.Helper()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}

	dial()
	first := recvConn()
	// Give the loop time to find the backlog empty: clients that arrive before that are part
	// of the same wake-up and are rightly taken at once.
	time.Sleep(coalesce / 10)
	const burst = 5
	for i := 0; i < burst; i++ {
		dial()
	}
	for i := 0; i < burst; i++ {
		if at := recvConn(); at.Sub(first) < coalesce/2 {
			t.Fatalf("client %d of the burst handed over %v after the first; the loop should have paused ~%v", i, at.Sub(first), coalesce)
		}
	}
	if err := func() error { g.StopAccepting(); return <-served }(); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if st := g.Stats(); st.Accepted != burst+1 {
		t.Errorf("accepted %d, want %d", st.Accepted, burst+1)
	}
}
