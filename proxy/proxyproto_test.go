package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/handoff"
)

func v2Header(t testing.TB, src, dst string) []byte {
	h := proxyproto.HeaderProxyFromAddrs(2, net.TCPAddrFromAddrPort(netip.MustParseAddrPort(src)), net.TCPAddrFromAddrPort(netip.MustParseAddrPort(dst)))
	b, err := h.Format()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestHeaderLen(t *testing.T) {
	v1 := []byte("PROXY TCP4 192.0.2.1 198.51.100.2 5000 7000\r\nhello")
	v2 := append(v2Header(t, "192.0.2.1:5000", "198.51.100.2:7000"), "hello"...)
	for _, c := range []struct {
		b    []byte
		n    int
		fail bool
	}{
		{v1, len(v1) - 5, false},
		{v1[:10], 0, false},
		{v2, len(v2) - 5, false},
		{v2[:15], 0, false},
		{[]byte("GET / HTTP/1.1\r\n"), 0, true},
		{[]byte("PROXZ"), 0, true},
		{append([]byte("PROXY "), bytes.Repeat([]byte("x"), 120)...), 0, true},
	} {
		n, err := headerLen(c.b)
		if n != c.n || (err != nil) != c.fail {
			t.Errorf("headerLen(%q) = %d, %v; want %d, fail %v", c.b, n, err, c.n, c.fail)
		}
	}
}

func FuzzHeader(f *testing.F) {
	f.Add([]byte("PROXY TCP4 192.0.2.1 198.51.100.2 5000 7000\r\n"))
	f.Add(v2Header(f, "[2001:db8::1]:5000", "[2001:db8::2]:7000"))
	f.Add([]byte("PROXY UNKNOWN\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := headerLen(b)
		if err != nil || n == 0 {
			return
		}
		if n > len(b) {
			if n > maxHeader {
				t.Fatalf("length %d past the bound", n)
			}
			return
		}
		c, l, err := parseHeader(b[:n], netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2"))
		if err == nil && (!c.IsValid() || !l.IsValid()) {
			t.Fatalf("parsed %q into invalid addresses %v %v", b[:n], c, l)
		}
	})
}

// proxyServe is serve with a PROXY listener.
func proxyServe(t *testing.T, pp ProxyProtocol) (*Gateway, string) {
	t.Helper()
	return proxyServeCfg(t, Config{}, pp)
}

func proxyServeCfg(t *testing.T, cfg Config, pp ProxyProtocol) (*Gateway, string) {
	t.Helper()
	g := New(cfg)
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	l, err := NewListener("game", ln)
	if err != nil {
		t.Fatal(err)
	}
	l.ExpectProxy(pp)
	go g.Serve(l)
	t.Cleanup(func() { g.StopAccepting(); g.Close() })
	return g, ln.Addr().String()
}

// The worker gets the header's addresses and exactly the client's bytes after the header, even
// when both come in one segment; a silent client is closed at its timeout without holding up
// another client; garbage and untrusted peers are closed and counted.
func TestProxyHeaderReachesWorker(t *testing.T) {
	g, addr := proxyServe(t, ProxyProtocol{Timeout: 500 * time.Millisecond})
	w := attach(t, g, 0, false)
	silent, err := net.Dial("tcp", addr) // sends nothing: must not delay the next one
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(append(v2Header(t, "203.0.113.7:4242", "198.51.100.9:7000"), "hello"...))
	w.ch.Conn().SetReadDeadline(time.Now().Add(5 * time.Second))
	msg, fds, err := w.ch.RecvFDs(w.buf, nil)
	if err != nil || len(fds) != 1 {
		t.Fatalf("worker: %v, %d fds", err, len(fds))
	}
	typ, body, _ := handoff.Split(msg)
	var info handoff.ConnInfo
	if typ != handoff.TypeConn || handoff.ParseConn(body, &info) != nil {
		t.Fatalf("got %s", typ)
	}
	if info.Client != netip.MustParseAddrPort("203.0.113.7:4242") || info.Local != netip.MustParseAddrPort("198.51.100.9:7000") {
		t.Errorf("CONN says client %v local %v, want the header's", info.Client, info.Local)
	}
	buf := make([]byte, 64)
	n, _ := readFD(fds[0], buf)
	if string(buf[:n]) != "hello" {
		t.Errorf("the worker read %q after the header, want %q", buf[:n], "hello")
	}
	silent.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := silent.Read(buf); !errors.Is(err, io.EOF) && !isReset(err) {
		t.Errorf("silent client: %v, want closed at the header timeout", err)
	}
	bad, _ := net.Dial("tcp", addr)
	bad.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
	bad.SetReadDeadline(time.Now().Add(5 * time.Second))
	bad.Read(buf)
	bad.Close()
	waitStats(t, g, func(s Stats) bool {
		return s.Closed[ReasonProxyTimeout.String()] == 1 && s.Closed[ReasonProxyInvalid.String()] == 1
	})
}

func TestProxyUntrustedPeer(t *testing.T) {
	g, addr := proxyServe(t, ProxyProtocol{From: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}})
	attach(t, g, 0, false)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(v2Header(t, "203.0.113.7:4242", "198.51.100.9:7000"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !isReset(err) {
		t.Errorf("untrusted peer: %v, want closed", err)
	}
	waitStats(t, g, func(s Stats) bool { return s.Closed[ReasonProxyUntrusted.String()] == 1 && s.Acked == 0 })
}

func waitStats(t *testing.T, g *Gateway, ok func(Stats) bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok(g.Stats()) {
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v", g.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// readFD reads what has arrived on a blocking or non-blocking socket, waiting up to 5 s.
func readFD(fd int, buf []byte) (int, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := unix.Read(fd, buf)
		if !errors.Is(err, unix.EAGAIN) || time.Now().After(deadline) {
			return n, err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A balancer's health check (a LOCAL header) is closed, not handed to a worker; a connection
// waiting for its header is in flight (a stopping batond waits for it).
func TestProxyLocalAndInFlight(t *testing.T) {
	g, addr := proxyServe(t, ProxyProtocol{Timeout: 5 * time.Second})
	attach(t, g, 0, false)
	waiting, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer waiting.Close()
	// Waiting for its header: accepted and in flight (accepted = acked + closed + in flight).
	waitStats(t, g, func(s Stats) bool { return s.InFlight == 1 && s.Accepted == 1 })
	local := proxyproto.HeaderProxyFromAddrs(2, nil, nil)
	local.Command = proxyproto.LOCAL
	b, err := local.Format()
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(b)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !isReset(err) {
		t.Errorf("LOCAL: %v, want closed", err)
	}
	waitStats(t, g, func(s Stats) bool {
		return s.Closed[ReasonProxyLocal.String()] == 1 && s.Acked == 0 && s.InFlight == 1 && s.Accepted == 2
	})
	checkCounts(t, g.Stats())
}

// checkCounts holds the counters to their invariant: accepted = acked + closed + in flight.
func checkCounts(t *testing.T, s Stats) {
	t.Helper()
	if s.InFlight < 0 || s.Accepted != s.Acked+s.ClosedTotal()+uint64(s.InFlight) {
		t.Errorf("accepted %d != acked %d + closed %d + in flight %d", s.Accepted, s.Acked, s.ClosedTotal(), s.InFlight)
	}
}

// Closing the gateway while the header stage is dropping connections (their clients hang up,
// or their time runs out): every connection is closed exactly once and counted exactly once
// (the stage's loop and its closer never both own one).
func TestProxyCloseWhileDropping(t *testing.T) {
	const n = 300
	for round := range 8 {
		g, addr := proxyServeCfg(t, Config{}, ProxyProtocol{Timeout: 30 * time.Second})
		cs := make([]*net.TCPConn, 0, n)
		for range n {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			cs = append(cs, c.(*net.TCPConn))
		}
		waitStats(t, g, func(s Stats) bool { return s.InFlight == n })
		for _, c := range cs {
			c.SetLinger(0)
			c.Close()
		}
		time.Sleep(time.Duration(round) * 200 * time.Microsecond)
		g.StopAccepting()
		g.Close()
		s := g.Stats()
		if s.InFlight != 0 || s.ClosedTotal() != n {
			t.Errorf("round %d: %d connections, closed %d (%v), in flight %d: each must be closed exactly once", round, n, s.ClosedTotal(), s.Closed, s.InFlight)
		}
	}
}

// Connections that send no header are bounded: past MaxPendingHeaders a new one is closed at
// once and counted, and the ones waiting keep their place.
func TestProxyPendingBounded(t *testing.T) {
	g, addr := proxyServeCfg(t, Config{MaxPendingHeaders: 3}, ProxyProtocol{Timeout: 30 * time.Second})
	w := attach(t, g, 0, false)
	var cs []net.Conn
	for range 5 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cs = append(cs, c)
		waitStats(t, g, func(s Stats) bool { return s.Accepted == uint64(len(cs)) })
	}
	waitStats(t, g, func(s Stats) bool { return s.InFlight == 3 && s.Closed[ReasonProxyBusy.String()] == 2 })
	checkCounts(t, g.Stats())
	for _, c := range cs[3:] {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !isReset(err) {
			t.Errorf("connection past the bound: %v, want closed", err)
		}
	}
	// One of those waiting sends its header: it reaches the worker, counted once.
	cs[0].Write(v2Header(t, "203.0.113.7:4242", "198.51.100.9:7000"))
	w.ch.Conn().SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, fds, err := w.ch.RecvFDs(w.buf, nil); err != nil || len(fds) != 1 {
		t.Fatalf("worker: %v, %d fds", err, len(fds))
	} else {
		unix.Close(fds[0])
	}
	waitStats(t, g, func(s Stats) bool { return s.InFlight == 3 && s.Accepted == 5 })
	checkCounts(t, g.Stats())
}
