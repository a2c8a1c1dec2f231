package worker

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tcpPair returns both ends of a new loopback TCP connection.
func tcpPair(tb testing.TB) (server, client *net.TCPConn) {
	tb.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	client, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		tb.Fatal(err)
	}
	server, err = ln.AcceptTCP()
	if err != nil {
		client.Close()
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		server.Close()
		client.Close()
	})
	return server, client
}

// handedOff returns the server end of a new loopback connection as the worker holds a socket
// batond handed over (a dup of the fd in a sockConn, as fdConn makes it), and the client end.
func handedOff(tb testing.TB, pipes *pipePool) (*sockConn, *net.TCPConn) {
	tb.Helper()
	server, client := tcpPair(tb)
	raw, err := server.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	fd, derr := -1, error(nil)
	if err := raw.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		tb.Fatal(err)
	}
	if derr != nil {
		tb.Fatal(derr)
	}
	server.Close()
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		tb.Fatal(err)
	}
	sc := newSockConn(fd, pipes)
	sc.local, sc.remote = client.RemoteAddr(), client.LocalAddr()
	tb.Cleanup(func() { sc.Close() })
	return sc, client
}

// testPool returns a pipe pool whose pipes are all closed again, and checked to be, when the
// test ends: later tests count fds, and a pooled pipe closed by its cleanup in the middle of
// their measurement would look like an fd gone missing. Registered before the test's sockets,
// its check runs after they are closed, so it doubles as a leak check.
func testPool(t *testing.T) *pipePool {
	t.Helper()
	runtime.GC()
	base := countFDs(t)
	pp := newPipePool()
	t.Cleanup(func() {
		pp = nil // the pool must become garbage for its pipes' cleanups to run
		eventually(t, "pooled pipes closed", func() bool {
			runtime.GC()
			return countFDs(t) <= base
		})
	})
	return pp
}

func randomBytes(tb testing.TB, n int) []byte {
	tb.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		tb.Fatal(err)
	}
	return b
}

type copyResult struct {
	n   int64
	err error
}

type closeWriter interface{ CloseWrite() error }

// feed writes data to c and then shuts down c's sending side, reporting the first error.
func feed(c *net.TCPConn, data []byte) <-chan error {
	done := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.CloseWrite()
		}
		done <- err
	}()
	return done
}

// readAll reads c to EOF, failing the test instead of hanging if EOF never comes.
func readAll(t *testing.T, c net.Conn) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(testTimeout))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading what was copied: %v", err)
	}
	return b
}

// The echo example's io.Copy(conn, conn) splices the socket into itself.
func TestSpliceEcho(t *testing.T) {
	pp := testPool(t)
	sc, client := handedOff(t, pp)
	data := randomBytes(t, 8<<20)

	done := make(chan copyResult, 1)
	go func() {
		n, err := io.Copy(sc, sc)
		sc.CloseWrite()
		done <- copyResult{n, err}
	}()
	wrote := feed(client, data)
	got := readAll(t, client)
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	res := <-done
	if res.err != nil || res.n != int64(len(data)) {
		t.Fatalf("io.Copy = %d, %v; want %d, nil", res.n, res.err, len(data))
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("echoed %d bytes, not the %d sent", len(got), len(data))
	}
	if pp.copies.Load() == 0 {
		t.Fatal("io.Copy did not splice")
	}
}

// spliceWrapper stands for *worker.Conn: a net.Conn over a socket that forwards io.Copy's fast
// paths and says, through spliceable, which socket is underneath.
type spliceWrapper struct{ net.Conn }

func (w spliceWrapper) spliceConn() net.Conn { return w.Conn }

func (w spliceWrapper) ReadFrom(r io.Reader) (int64, error) {
	return w.Conn.(io.ReaderFrom).ReadFrom(r)
}

func (w spliceWrapper) WriteTo(wr io.Writer) (int64, error) {
	return w.Conn.(io.WriterTo).WriteTo(wr)
}

// Proxying between a handed-off socket and a *net.TCPConn, in both directions and through
// every entry point io.Copy and net use, splices.
func TestSpliceProxy(t *testing.T) {
	type conn interface {
		net.Conn
		closeWriter
	}
	cases := []struct {
		name             string
		srcSock, dstSock bool
		copy             func(dst, src conn) (int64, error)
	}{
		{"sock to tcp io.Copy", true, false, func(dst, src conn) (int64, error) {
			return io.Copy(dst, src) // src.WriteTo
		}},
		{"sock to tcp TCPConn.ReadFrom", true, false, func(dst, src conn) (int64, error) {
			return dst.(*net.TCPConn).ReadFrom(src) // net's fallback, then src.WriteTo
		}},
		{"tcp to sock ReadFrom", false, true, func(dst, src conn) (int64, error) {
			return dst.(*sockConn).ReadFrom(src)
		}},
		{"tcp to sock io.Copy", false, true, func(dst, src conn) (int64, error) {
			return io.Copy(dst, src) // src.WriteTo, net's fallback, then dst.ReadFrom
		}},
		{"sock to sock io.Copy", true, true, func(dst, src conn) (int64, error) {
			return io.Copy(dst, src)
		}},
		{"sock to sock spliceable wrappers", true, true, func(dst, src conn) (int64, error) {
			return io.Copy(spliceWrapper{dst}, spliceWrapper{src})
		}},
		{"sock to tcp spliceable wrapper", true, false, func(dst, src conn) (int64, error) {
			return spliceWrapper{dst}.ReadFrom(spliceWrapper{src})
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pp := testPool(t)
			end := func(sock bool) (conn, *net.TCPConn) {
				if sock {
					return handedOff(t, pp)
				}
				return tcpPair(t)
			}
			src, srcClient := end(tc.srcSock)
			dst, dstClient := end(tc.dstSock)
			data := randomBytes(t, 3<<20+17)

			done := make(chan copyResult, 1)
			go func() {
				n, err := tc.copy(dst, src)
				dst.CloseWrite()
				done <- copyResult{n, err}
			}()
			wrote := feed(srcClient, data)
			got := readAll(t, dstClient)
			if err := <-wrote; err != nil {
				t.Fatal(err)
			}
			res := <-done
			if res.err != nil || res.n != int64(len(data)) {
				t.Fatalf("copy = %d, %v; want %d, nil", res.n, res.err, len(data))
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("copied %d bytes, not the %d sent", len(got), len(data))
			}
			if pp.copies.Load() == 0 {
				t.Fatal("the copy did not splice")
			}
		})
	}
}

// A *io.LimitedReader around a socket splices exactly N bytes and leaves the rest unread.
func TestSpliceLimited(t *testing.T) {
	pp := testPool(t)
	dst, dstClient := handedOff(t, pp)
	src, srcClient := tcpPair(t)
	data := randomBytes(t, 1<<20)
	const limit = 300_001
	wrote := feed(srcClient, data)

	lr := &io.LimitedReader{R: src, N: limit}
	n, err := dst.ReadFrom(lr)
	if err != nil || n != limit || lr.N != 0 {
		t.Fatalf("ReadFrom = %d, %v, N left %d; want %d, nil, 0", n, err, lr.N, limit)
	}
	if pp.copies.Load() == 0 {
		t.Fatal("ReadFrom did not splice")
	}
	dst.CloseWrite()
	if got := readAll(t, dstClient); !bytes.Equal(got, data[:limit]) {
		t.Fatalf("copied %d bytes, want the first %d sent", len(got), limit)
	}
	if rest := readAll(t, src); !bytes.Equal(rest, data[limit:]) {
		t.Fatalf("%d bytes left unread, want the last %d sent", len(rest), len(data)-limit)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if n, err := dst.ReadFrom(&io.LimitedReader{R: src, N: 0}); n != 0 || err != nil {
		t.Fatalf("ReadFrom of an exhausted LimitedReader = %d, %v", n, err)
	}
}

// Readers and writers that are not sockets still work, through io.Copy's loop.
func TestSpliceFallback(t *testing.T) {
	pp := testPool(t)
	sc, client := handedOff(t, pp)
	data := randomBytes(t, 200_000)

	n, err := sc.ReadFrom(bytes.NewReader(data))
	if err != nil || n != int64(len(data)) {
		t.Fatalf("ReadFrom(bytes.Reader) = %d, %v", n, err)
	}
	sc.CloseWrite()
	if got := readAll(t, client); !bytes.Equal(got, data) {
		t.Fatalf("client got %d bytes, want the %d written", len(got), len(data))
	}

	wrote := feed(client, data)
	var buf bytes.Buffer
	n, err = sc.WriteTo(&buf)
	if err != nil || n != int64(len(data)) || !bytes.Equal(buf.Bytes(), data) {
		t.Fatalf("WriteTo(bytes.Buffer) = %d, %v with %d bytes", n, err, buf.Len())
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if g := pp.copies.Load(); g != 0 {
		t.Fatalf("%d splices for copies that have no socket on one side", g)
	}
}

func checkTimeout(t *testing.T, what string, err error) {
	t.Helper()
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("%s: %v (%T), want a timeout net.Error wrapping os.ErrDeadlineExceeded", what, err, err)
	}
}

func TestSpliceDeadline(t *testing.T) {
	past := time.Now().Add(-time.Second)

	t.Run("read deadline passed", func(t *testing.T) {
		pp := testPool(t)
		sc, _ := handedOff(t, pp)
		other, _ := handedOff(t, pp)
		tcp, _ := tcpPair(t)
		sc.SetReadDeadline(past)
		_, err := sc.WriteTo(tcp)
		checkTimeout(t, "WriteTo", err)
		_, err = other.ReadFrom(sc)
		checkTimeout(t, "ReadFrom a sockConn", err)
		tcp.SetReadDeadline(past)
		_, err = sc.ReadFrom(tcp)
		checkTimeout(t, "ReadFrom a *net.TCPConn", err)
		if pp.copies.Load() != 3 {
			t.Fatalf("%d splices, want 3", pp.copies.Load())
		}
	})

	t.Run("read deadline while waiting", func(t *testing.T) {
		pp := testPool(t)
		sc, _ := handedOff(t, pp)
		tcp, _ := tcpPair(t)
		start := time.Now()
		sc.SetReadDeadline(start.Add(50 * time.Millisecond))
		_, err := sc.WriteTo(tcp)
		checkTimeout(t, "WriteTo", err)
		if d := time.Since(start); d < 50*time.Millisecond {
			t.Fatalf("WriteTo gave up after %v, before its deadline", d)
		}
	})

	// The bytes already in the pipe when the write fails must not reach the next copy.
	t.Run("write deadline with data in the pipe", func(t *testing.T) {
		pp := testPool(t)
		dst, _ := handedOff(t, pp)
		src, srcClient := tcpPair(t)
		if _, err := srcClient.Write([]byte("stale")); err != nil {
			t.Fatal(err)
		}
		dst.SetWriteDeadline(past)
		n, err := dst.ReadFrom(src)
		checkTimeout(t, "ReadFrom", err)
		if n != 0 {
			t.Fatalf("ReadFrom wrote %d bytes past its deadline", n)
		}

		p := pp.get()
		if p == nil {
			t.Fatal("no pipe")
		}
		var b [16]byte
		if n, err := unix.Read(p.rfd, b[:]); err != unix.EAGAIN {
			t.Fatalf("a pooled pipe holds %q (%v) after a failed copy", b[:max(n, 0)], err)
		}
		pp.put(p)

		dst2, dstClient2 := handedOff(t, pp)
		src2, srcClient2 := tcpPair(t)
		wrote := feed(srcClient2, []byte("fresh"))
		if _, err := dst2.ReadFrom(src2); err != nil {
			t.Fatal(err)
		}
		dst2.CloseWrite()
		if got := readAll(t, dstClient2); string(got) != "fresh" {
			t.Fatalf("next copy delivered %q, want %q", got, "fresh")
		}
		if err := <-wrote; err != nil {
			t.Fatal(err)
		}
	})
}

func TestSpliceClosed(t *testing.T) {
	pp := testPool(t)
	sc, _ := handedOff(t, pp)
	tcp, _ := tcpPair(t)
	sc.Close()
	if _, err := sc.WriteTo(tcp); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("WriteTo from a closed conn: %v, want net.ErrClosed", err)
	}
	if _, err := sc.ReadFrom(tcp); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadFrom into a closed conn: %v, want net.ErrClosed", err)
	}
	other, _ := handedOff(t, pp)
	if _, err := other.ReadFrom(sc); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadFrom a closed sockConn: %v, want net.ErrClosed", err)
	}
	tcp.Close()
	if _, err := other.ReadFrom(tcp); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadFrom a closed *net.TCPConn: %v, want net.ErrClosed", err)
	}

	// A Close from another goroutine ends a copy waiting for data, as it ends a Read.
	waiting, _ := handedOff(t, pp)
	tcp2, _ := tcpPair(t)
	done := make(chan error, 1)
	go func() {
		_, err := waiting.WriteTo(tcp2)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	waiting.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("WriteTo ended by Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(testTimeout):
		t.Fatal("Close did not end a waiting WriteTo")
	}
}

// Spliced copies, failed ones included, leave no fd behind: without a pool at once, with one
// once the pool's pipes are garbage.
func TestSpliceNoFDLeak(t *testing.T) {
	data := randomBytes(t, 64<<10)
	copyOnce := func(pp *pipePool, fail bool) {
		dst, dstClient := handedOff(t, pp)
		src, srcClient := tcpPair(t)
		wrote := feed(srcClient, data)
		if fail {
			dst.SetWriteDeadline(time.Now().Add(-time.Second))
		}
		n, err := dst.ReadFrom(src)
		if fail {
			checkTimeout(t, "ReadFrom", err)
		} else if err != nil || n != int64(len(data)) {
			t.Fatalf("ReadFrom = %d, %v", n, err)
		}
		<-wrote
		dst.Close()
		dstClient.Close()
		src.Close()
		srcClient.Close()
	}
	copyOnce(nil, false) // what is made once per process (the poller)
	runtime.GC()
	before := countFDs(t)
	for i := range 200 {
		copyOnce(nil, i%10 == 0)
	}
	if after := countFDs(t); after != before {
		t.Fatalf("%d fds open after 200 copies without a pool, %d before", after, before)
	}

	pp := newPipePool()
	for i := range 200 {
		copyOnce(pp, i%10 == 0)
	}
	if pp.copies.Load() != 200 {
		t.Fatalf("%d splices, want 200", pp.copies.Load())
	}
	pp = nil
	eventually(t, "pooled pipes closed", func() bool {
		runtime.GC()
		return countFDs(t) == before
	})
}

const echoChunk = 4 << 20

// benchEcho measures bulk echo through server (copy runs on it): each op sends echoChunk bytes
// from the client and reads them back.
func benchEcho(b *testing.B, server interface {
	net.Conn
	closeWriter
}, client *net.TCPConn, copy func() (int64, error)) {
	done := make(chan error, 1)
	go func() {
		_, err := copy()
		server.CloseWrite()
		done <- err
	}()
	wbuf := randomBytes(b, 256<<10)
	rbuf := make([]byte, 256<<10)
	b.SetBytes(echoChunk)
	cpu0 := cpuTime(b)
	b.ResetTimer()
	wrote := make(chan error, 1)
	go func() {
		for i := 0; i < b.N; i++ {
			for sent := 0; sent < echoChunk; sent += len(wbuf) {
				if _, err := client.Write(wbuf); err != nil {
					wrote <- err
					return
				}
			}
		}
		wrote <- client.CloseWrite()
	}()
	var total int64
	for {
		n, err := client.Read(rbuf)
		total += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	// Throughput swings with a loaded host; the CPU the process spent (client included, the
	// same in every variant) tells the server's copy paths apart more steadily.
	b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/op")
	if err := <-wrote; err != nil {
		b.Fatal(err)
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	if want := int64(b.N) * echoChunk; total != want {
		b.Fatalf("echoed %d bytes, want %d", total, want)
	}
}

// cpuTime is the user and system CPU time the process has used.
func cpuTime(tb testing.TB) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkSpliceEcho is the echo example over a handed-off socket.
func BenchmarkSpliceEcho(b *testing.B) {
	sc, client := handedOff(b, newPipePool())
	benchEcho(b, sc, client, func() (int64, error) { return io.Copy(sc, sc) })
}

// BenchmarkReadWriteEcho is the same through io.Copy's buffer, which is all a handed-off socket
// had before it could splice.
func BenchmarkReadWriteEcho(b *testing.B) {
	sc, client := handedOff(b, newPipePool())
	benchEcho(b, sc, client, func() (int64, error) {
		return io.Copy(struct{ io.Writer }{sc}, struct{ io.Reader }{sc})
	})
}

// BenchmarkTCPConnEcho is the target: a *net.TCPConn the program accepted itself.
func BenchmarkTCPConnEcho(b *testing.B) {
	server, client := tcpPair(b)
	benchEcho(b, server, client, func() (int64, error) { return io.Copy(server, server) })
}

// An echo session spends its life waiting for the client; while it waits its copy holds no
// pipe. Held for the whole copy, a pipe per session tripled a worker's descriptors.
func TestSpliceIdleCopyHoldsNoPipe(t *testing.T) {
	pp := testPool(t)
	const sessions = 50
	runtime.GC()
	base := countFDs(t)
	clients := make([]*net.TCPConn, sessions)
	for i := range clients {
		sc, client := handedOff(t, pp)
		clients[i] = client
		go func() { _, _ = io.Copy(sc, sc) }()
	}
	for _, c := range clients {
		if _, err := c.Write([]byte("ping\n")); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 5)); err != nil {
			t.Fatal(err)
		}
	}
	// Every copy has moved its bytes and is waiting again. Each session is two descriptors in
	// this process (the handed-off socket and the client); pipes beyond that may only be the
	// pool's few spares, not one per session.
	eventually(t, "idle copies gave their pipes back", func() bool {
		runtime.GC() // pipes a sync.Pool dropped (it does, at random, under -race) close at GC
		extra := countFDs(t) - base - 2*sessions
		return extra <= 2*8
	})
	if pp.copies.Load() != sessions {
		t.Fatalf("%d splice copies, want %d", pp.copies.Load(), sessions)
	}
	for _, c := range clients {
		c.Close()
	}
}
