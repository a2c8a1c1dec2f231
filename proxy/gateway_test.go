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
	// Filled by answer: the most connections one message carried, and the CONNS count.
	maxPerMsg, connsMsgs int
}

func attach(t *testing.T, g *Gateway, slot int, nonblock bool) *fakeWorker {
	return attachInfo(t, g, BackendInfo{Slot: slot, Ready: true, Nonblock: nonblock, Capacity: 100})
}

func attachInfo(t *testing.T, g *Gateway, info BackendInfo) *fakeWorker {
	t.Helper()
	return attachProc(t, g, info, nil)
}

// attachProc attaches a worker whose process the gateway can kill (proc).
func attachProc(t *testing.T, g *Gateway, info BackendInfo, proc Process) *fakeWorker {
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
	b := g.Add(info, gw, proc)
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

// answer answers CONNs (and CONNS, if the worker asked for them) until stop is closed: it
// checks each fd's blocking mode against what the worker asked for, acks it, and reports every
// second one closed at once. It returns the number of connections it got and of those it still
// holds.
func (w *fakeWorker) answer(stop <-chan struct{}) (got, held int, err error) {
	fds := make([]int, 0, handoff.MaxConns+4)
	var infos []handoff.ConnInfo
	for {
		_ = w.ch.Conn().SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		msg, fds, rerr := w.ch.RecvFDs(w.buf, fds[:0])
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
		infos = infos[:0]
		var perr error
		switch {
		case typ == handoff.TypeConn:
			infos = append(infos, handoff.ConnInfo{})
			perr = handoff.ParseConn(body, &infos[0])
		case typ == handoff.TypeConns && w.b.Info().Batch:
			infos, perr = handoff.ParseConns(infos, body)
			w.connsMsgs++
		default:
			perr = fmt.Errorf("got %s, want CONN (or CONNS: batch %v)", typ, w.b.Info().Batch)
		}
		if perr == nil && len(fds) != len(infos) {
			perr = fmt.Errorf("%d fds for %d connections", len(fds), len(infos))
		}
		for i, fd := range fds {
			fl, ferr := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
			// Each fd is the socket its entry describes: its peer is the entry's client.
			sa, serr := unix.Getpeername(fd)
			unix.Close(fd)
			switch {
			case perr != nil:
			case ferr != nil:
				perr = ferr
			case fl&unix.O_NONBLOCK != 0 != w.b.Info().Nonblock:
				perr = fmt.Errorf("worker %d (asked non-blocking: %v) got O_NONBLOCK=%v", w.b.Info().Slot, w.b.Info().Nonblock, !w.b.Info().Nonblock)
			case serr != nil:
				perr = serr
			case sockaddrAddrPort(sa) != infos[i].Client:
				perr = fmt.Errorf("fd %d of the message is connected to %v, its entry says %v", i, sockaddrAddrPort(sa), infos[i].Client)
			}
		}
		if perr != nil {
			return got, held, perr
		}
		w.maxPerMsg = max(w.maxPerMsg, len(infos))
		ids := make([]uint64, 0, len(infos))
		for _, info := range infos {
			ids = append(ids, info.ID)
		}
		got += len(ids)
		if err := w.ch.Send(handoff.AppendIDs(nil, handoff.TypeAck, ids)); err != nil {
			return got, held, err
		}
		var closed []uint64
		for _, id := range ids {
			if id%2 == 0 {
				closed = append(closed, id)
			} else {
				held++
			}
		}
		if len(closed) > 0 {
			if err := w.ch.Send(handoff.AppendIDs(nil, handoff.TypeClosed, closed)); err != nil {
				return got, held, err
			}
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
	const conns = 40
	handOver(t, g, workers, conns, func() {
		for i := 0; i < conns; i++ {
			dial(t, ln)
		}
	})
}

// A burst (the clients that arrived while the accept loop paused) goes to each worker that
// asked for BATCH in CONNS of at most handoff.MaxConns, and to the others one CONN at a time;
// every connection is acked and counted exactly once, whichever way it went. (A burst stays
// with a nearly idle worker, see burstAffinity, so a full CONNS must occur.)
func TestBurstInConns(t *testing.T) {
	const coalesce = 200 * time.Millisecond
	g, ln, _ := serve(t, Config{AcceptCoalesce: coalesce})
	workers := []*fakeWorker{
		attachInfo(t, g, BackendInfo{Slot: 0, Ready: true, Nonblock: true, Batch: true, Capacity: 100}),
		attachInfo(t, g, BackendInfo{Slot: 1, Ready: true, Nonblock: false, Batch: true, Capacity: 100}),
		attachInfo(t, g, BackendInfo{Slot: 2, Ready: true, Nonblock: true, Capacity: 100}),
	}
	const conns = 3*handoff.MaxConns + 10 // each batch worker gets more than one CONNS' worth
	handOver(t, g, workers, conns, func() {
		dial(t, ln)
		for g.Stats().Acked < 1 {
			time.Sleep(time.Millisecond)
		}
		// The loop woke for the first client and now pauses: these arrive meanwhile, and it
		// takes them all in one burst.
		for i := 1; i < conns; i++ {
			dial(t, ln)
		}
	})
	full := false
	for _, w := range workers[:2] {
		if w.maxPerMsg > handoff.MaxConns {
			t.Errorf("batch worker %d got %d connections in one message, more than %d", w.b.Info().Slot, w.maxPerMsg, handoff.MaxConns)
		}
		full = full || w.maxPerMsg == handoff.MaxConns
	}
	if !full {
		t.Errorf("no CONNS of %d: the batch workers got at most %d and %d connections a message",
			handoff.MaxConns, workers[0].maxPerMsg, workers[1].maxPerMsg)
	}
	if w := workers[2]; w.maxPerMsg != 1 || w.connsMsgs != 0 {
		t.Errorf("worker without BATCH got %d CONNS, up to %d connections in one message", w.connsMsgs, w.maxPerMsg)
	}
}

func dial(t *testing.T, ln *net.TCPListener) {
	t.Helper()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
}

// handOver runs the workers (answer) while connect makes conns connections, then checks that
// every one was handed over, acked and counted: ACKs and CLOSEDs sent while the gateway is
// accepting are collected without waking it for each (Backend.recv polls); the counts must come
// out exact all the same.
func handOver(t *testing.T, g *Gateway, workers []*fakeWorker, conns uint64, connect func()) {
	t.Helper()
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
	connect()
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
			t.Errorf("worker %d got no connection: the checks never ran for it", i)
		}
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
	dial(t, ln)
	first := recvConn()
	// Give the loop time to find the backlog empty: clients that arrive before that are part
	// of the same wake-up and are rightly taken at once.
	time.Sleep(coalesce / 10)
	const burst = 5
	for i := 0; i < burst; i++ {
		dial(t, ln)
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
