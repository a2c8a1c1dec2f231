package load

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
)

// TestMain lets the idle scenario re-execute this test binary as its load-generator processes.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "idle-child" {
		if err := IdleChild(os.Args[2:], os.Stdin, os.Stdout); err != nil {
			os.Stderr.WriteString("idle-child: " + err.Error() + "\n")
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// server runs handle for every connection accepted on 127.0.0.1 until the test ends.
func server(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return l.Addr().String()
}

// echoServer echoes with read and write (io.Copy between TCP sockets would splice through a pipe:
// two more descriptors per connection).
func echoServer(t *testing.T) string {
	return server(t, func(c net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
		}
	})
}

// lobbyServer greets with two lines and answers every line "pong".
func lobbyServer(t *testing.T) string {
	return server(t, func(c net.Conn) {
		io.WriteString(c, "welcome to the baton lobby\nwhat is your name?\n")
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			io.WriteString(c, "pong\n")
		}
	})
}

func proto(t *testing.T, name string) *Proto {
	p, err := ProtoByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestStorm(t *testing.T) {
	for _, pn := range []string{"echo", "lobby"} {
		addr := echoServer(t)
		if pn == "lobby" {
			addr = lobbyServer(t)
		}
		r, err := Storm(StormConfig{Addr: addr, Proto: proto(t, pn), Conns: 4, Warmup: 50 * time.Millisecond,
			Duration: 300 * time.Millisecond, ServerPIDs: []int{os.Getpid()}})
		if err != nil {
			t.Fatal(err)
		}
		if r.Ops == 0 || r.Errors != 0 || r.P50 <= 0 || r.P99 < r.P50 || len(r.CDF) == 0 || r.ServerProcs == 0 {
			t.Errorf("%s closed loop: %+v", pn, r)
		}
		if !strings.Contains(r.String(), "conn/s") {
			t.Errorf("result line %q", r)
		}
		r, err = Storm(StormConfig{Addr: addr, Proto: proto(t, pn), Open: true, Rate: 400, Duration: 500 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if r.Errors != 0 || r.PerSec < 300 || r.PerSec > 500 {
			t.Errorf("%s open loop at 400/s: %.0f/s, %d errors (%v)", pn, r.PerSec, r.Errors, r.ErrorKinds)
		}
	}
}

func TestStormCountsRefusals(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	r, err := Storm(StormConfig{Addr: addr, Proto: proto(t, "echo"), Conns: 2, Duration: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if r.Ops != 0 || r.ErrorKinds["connect ECONNREFUSED"] == 0 {
		t.Errorf("refused storm: %+v", r)
	}
}

func TestOnlyLoopback(t *testing.T) {
	for _, a := range []string{"10.0.0.1:80", "[::1]:80", "localhost:80", "192.168.1.1:7000"} {
		if _, err := parseDst(a); err == nil {
			t.Errorf("%s accepted", a)
		}
	}
	if _, err := parseDst("127.0.0.9:7000"); err != nil {
		t.Error(err)
	}
}

func TestSessions(t *testing.T) {
	for _, pn := range []string{"echo", "lobby"} {
		addr := echoServer(t)
		if pn == "lobby" {
			addr = lobbyServer(t)
		}
		r, err := Sessions(SessionsConfig{Addr: addr, Proto: proto(t, pn), Sessions: 5, Warmup: 50 * time.Millisecond, Duration: 200 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if r.Ops == 0 || r.Errors != 0 || r.P50 <= 0 {
			t.Errorf("%s: %+v", pn, r)
		}
	}
}

// TestSessionsDepth pipelines 8 requests per write: every request counts as a message, and a
// server that reads them in batches still answers each one.
func TestSessionsDepth(t *testing.T) {
	for _, pn := range []string{"echo", "lobby"} {
		addr := echoServer(t)
		if pn == "lobby" {
			addr = lobbyServer(t)
		}
		r, err := Sessions(SessionsConfig{Addr: addr, Proto: proto(t, pn), Sessions: 4, Depth: 8, Warmup: 50 * time.Millisecond, Duration: 500 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if r.Ops == 0 || r.Ops%8 != 0 || r.Errors != 0 || r.Depth != 8 || !strings.Contains(r.String(), "n=4×8") {
			t.Errorf("%s: %+v", pn, r)
		}
	}
	if _, err := Sessions(SessionsConfig{Addr: "127.0.0.1:1", Proto: proto(t, "echo"), Sessions: 1, Depth: maxDepth + 1, Duration: time.Second}); err == nil {
		t.Errorf("depth %d accepted", maxDepth+1)
	}
}

// TestSessionsCheckReplies: a reply with the right length but the wrong bytes breaks the
// session (counting lines or bytes alone would take it).
func TestSessionsCheckReplies(t *testing.T) {
	for _, pn := range []string{"echo", "lobby"} {
		addr := server(t, func(c net.Conn) {
			if pn == "lobby" {
				io.WriteString(c, "welcome\nname?\n")
			}
			sc := bufio.NewScanner(c)
			for n := 0; sc.Scan(); n++ {
				reply := append(sc.Bytes(), '\n')
				if pn == "lobby" {
					reply = []byte("pong\n")
				}
				if n == 20 {
					reply = bytes.ToUpper(reply)
				}
				c.Write(reply)
			}
		})
		r, err := Sessions(SessionsConfig{Addr: addr, Proto: proto(t, pn), Sessions: 1, Depth: 4, Warmup: 50 * time.Millisecond, Duration: 500 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if r.Errors != 1 || r.ErrorKinds["session "+errBadReply.Error()] != 1 {
			t.Errorf("%s: a wrong reply was not caught: %+v", pn, r)
		}
	}
}

func TestSessionsCountBroken(t *testing.T) {
	// Answers one request, then hangs up.
	addr := server(t, func(c net.Conn) {
		buf := make([]byte, 64)
		io.ReadFull(c, buf)
		c.Write(buf)
	})
	e, err := newEngine()
	if err != nil {
		t.Fatal(err)
	}
	defer e.close()
	dst, _ := parseDst(addr)
	res := &Result{}
	s := newSessions(e, proto(t, "echo"), dst, 3, 0, time.Second, res)
	s.stopAt = 1 << 62
	e.run(e.now()+int64(5*time.Second), func(now int64) (int64, bool) {
		s.open(now)
		return 0, s.setupDone()
	})
	s.from, s.to = 0, 1<<62
	s.begin(e.now())
	e.run(e.now()+int64(5*time.Second), func(int64) (int64, bool) { return 0, s.broken == 3 })
	if s.broken != 3 || s.msgs != 3 {
		t.Errorf("broken %d, replies %d; want 3 and 3 (%v)", s.broken, s.msgs, res.ErrorKinds)
	}
}

func TestBulk(t *testing.T) {
	r, err := Bulk(BulkConfig{Addr: echoServer(t), Warmup: 50 * time.Millisecond, Duration: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if r.MBps <= 0 {
		t.Errorf("%+v", r)
	}
}

func TestIdle(t *testing.T) {
	addr := echoServer(t)
	r, err := Idle(IdleConfig{Addr: addr, Proto: proto(t, "echo"), Counts: []int{50, 120}, Procs: 2, Sources: 3, Passes: 2,
		Verify: true, Settle: 10 * time.Millisecond, Middle: []int{os.Getpid()}, ServerPIDs: []int{os.Getpid()}})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Idle) != 4 || !r.Idle[3].Reached || r.Idle[3].Held != 120 || r.Idle[1].Pass != 1 || r.Idle[3].Pass != 2 {
		t.Fatalf("%+v", r.Idle)
	}
	// This process is the server: 120 more descriptors (≈1 per connection), in both passes (the
	// second one's baseline is taken once the first pass's connections are closed).
	for _, i := range []int{1, 3} {
		if fd := r.Idle[i].MiddleFDPerConn; fd < 0.9 || fd > 1.2 {
			t.Errorf("pass %d: server fds per connection %.2f, want ≈ 1", r.Idle[i].Pass, fd)
		}
	}
}

func TestIdleReportsWhereItStops(t *testing.T) {
	// Serves the first 30 connections only; later ones are accepted and never answered.
	stopAt := 30
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		var held []net.Conn
		for i := 0; ; i++ {
			c, err := l.Accept()
			if err != nil {
				for _, h := range held {
					h.Close()
				}
				return
			}
			held = append(held, c)
			if i < stopAt {
				go func() {
					buf := make([]byte, 64)
					for {
						n, err := c.Read(buf)
						if err != nil {
							return
						}
						c.Write(buf[:n])
					}
				}()
			}
		}
	}()
	start := time.Now()
	r, err := Idle(IdleConfig{Addr: l.Addr().String(), Proto: proto(t, "echo"), Counts: []int{20, 100}, Procs: 1, Sources: 1,
		Conc: 8, Timeout: 300 * time.Millisecond, Verify: true, Settle: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Idle) != 2 || !r.Idle[0].Reached || r.Idle[1].Reached || r.Idle[1].Held != stopAt || r.Idle[1].Stop == "" {
		t.Fatalf("%+v", r.Idle)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("giving up took %v", d)
	}
}

func TestReload(t *testing.T) {
	addr := echoServer(t)
	r, err := Reload(ReloadConfig{Addr: addr, Proto: proto(t, "echo"), Command: "true", Reloads: 2, Every: 100 * time.Millisecond,
		Lead: 50 * time.Millisecond, Tail: 50 * time.Millisecond, Rate: 200, Sessions: 3, Interval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	x := r.Reload
	if x.Reloads != 2 || x.ReloadErrors != 0 || x.FailedConnects != 0 || x.BrokenSessions != 0 || x.Connects == 0 || x.Messages == 0 || x.Sessions != 3 {
		t.Errorf("%+v", x)
	}
	r, err = Reload(ReloadConfig{Addr: addr, Proto: proto(t, "echo"), Command: "echo no >&2; exit 3", Reloads: 1, Every: 10 * time.Millisecond,
		Lead: 10 * time.Millisecond, Tail: 10 * time.Millisecond, Rate: 100, Sessions: 1})
	if err != nil {
		t.Fatal(err)
	}
	if r.Reload.ReloadErrors != 1 || !strings.Contains(r.Reload.ReloadOutput, "no") {
		t.Errorf("%+v", r.Reload)
	}
}

func TestMedian(t *testing.T) {
	rs := []*Result{{Scenario: "storm", PerSec: 10, P50: 1, Errors: 1, Runs: 1}, {Scenario: "storm", PerSec: 30, P50: 3, Runs: 1}, {Scenario: "storm", PerSec: 20, P50: 2, Errors: 2, Runs: 1}}
	m := Median(rs)
	if m.PerSec != 20 || m.P50 != 2 || m.Errors != 3 || m.Runs != 3 {
		t.Errorf("%+v", m)
	}
}

// proxyServer expects a PROXY v2 header first, checks it with go-proxyproto (the library batond
// parses it with), records what came in the connection's first read, then serves the rest as
// echo or lobby. Its channel gets one report per connection.
type proxyReport struct {
	src, dst  netip.AddrPort
	firstRead int // bytes in the first read: header and request together when they came in one write
	err       error
}

func proxyServer(t *testing.T, lobby bool) (string, chan proxyReport) {
	reports := make(chan proxyReport, 100000)
	addr := server(t, func(c net.Conn) {
		// Like batond, it serves (and the lobby greets) only once the header is in.
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		first := make([]byte, 4096)
		n, err := c.Read(first)
		if err != nil {
			reports <- proxyReport{err: err}
			return
		}
		br := bufio.NewReader(io.MultiReader(bytes.NewReader(first[:n]), c))
		h, err := proxyproto.Read(br)
		if err != nil {
			reports <- proxyReport{err: err}
			return
		}
		src, dst, _ := h.TCPAddrs()
		reports <- proxyReport{src: src.AddrPort(), dst: dst.AddrPort(), firstRead: n}
		c.SetReadDeadline(time.Time{})
		if lobby {
			io.WriteString(c, "welcome to the baton lobby\nwhat is your name?\n")
			sc := bufio.NewScanner(br)
			for sc.Scan() {
				io.WriteString(c, "pong\n")
			}
			return
		}
		buf := make([]byte, 32<<10)
		for {
			n, err := br.Read(buf)
			if err != nil {
				return
			}
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
		}
	})
	return addr, reports
}

// checkProxyReports drains reports and checks every header: a made-up client in
// 203.0.113.0/24, the real destination, and (sameWrite) the request in the header's segment.
func checkProxyReports(t *testing.T, name, addr string, reports chan proxyReport, sameWrite int) int {
	t.Helper()
	dst := netip.MustParseAddrPort(addr)
	testNet := netip.MustParsePrefix("203.0.113.0/24")
	n := 0
	for {
		select {
		case r := <-reports:
			n++
			switch {
			case r.err != nil:
				t.Errorf("%s: header: %v", name, r.err)
			case !testNet.Contains(r.src.Addr()) || r.dst != dst:
				t.Errorf("%s: header says %v → %v, want 203.0.113.x → %v", name, r.src, r.dst, dst)
			case sameWrite > 0 && r.firstRead < proxyV2Len+sameWrite:
				t.Errorf("%s: first read %d bytes, want the header and the request (%d)", name, r.firstRead, proxyV2Len+sameWrite)
			}
		default:
			return n
		}
	}
}

func TestStormProxyV2(t *testing.T) {
	for _, pn := range []string{"echo", "lobby"} {
		addr, reports := proxyServer(t, pn == "lobby")
		p := proto(t, pn)
		r, err := Storm(StormConfig{Addr: addr, Proto: p, Conns: 4, Warmup: 50 * time.Millisecond,
			Duration: 300 * time.Millisecond, ProxyV2: true})
		if err != nil {
			t.Fatal(err)
		}
		if r.Ops == 0 || r.Errors != 0 || !r.ProxyV2 || !strings.Contains(r.String(), "+pp2") {
			t.Errorf("%s: %+v (%v)", pn, r, r.ErrorKinds)
		}
		if n := checkProxyReports(t, pn, addr, reports, len(p.Storm)); n < int(r.Ops) {
			t.Errorf("%s: %d headers for %d connections", pn, n, r.Ops)
		}
	}
}

func TestSessionsProxyV2(t *testing.T) {
	for _, pn := range []string{"echo", "lobby"} {
		addr, reports := proxyServer(t, pn == "lobby")
		p := proto(t, pn)
		r, err := Sessions(SessionsConfig{Addr: addr, Proto: p, Sessions: 5, Warmup: 50 * time.Millisecond,
			Duration: 200 * time.Millisecond, ProxyV2: true})
		if err != nil {
			t.Fatal(err)
		}
		if r.Ops == 0 || r.Errors != 0 || !r.ProxyV2 {
			t.Errorf("%s: %+v", pn, r)
		}
		same := len(p.Session)
		if p.greeting() > 0 {
			same = 0 // the header goes alone, before the greeting
		}
		if n := checkProxyReports(t, pn, addr, reports, same); n != 5 {
			t.Errorf("%s: %d headers for 5 sessions", pn, n)
		}
	}
}

func TestProxyV2HeaderParses(t *testing.T) {
	src, dst := netip.MustParseAddrPort("203.0.113.7:4242"), netip.MustParseAddrPort("127.0.0.1:7000")
	h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(append(ProxyV2Header(src, dst), "rest"...))))
	if err != nil {
		t.Fatal(err)
	}
	s, d, ok := h.TCPAddrs()
	if !ok || s.AddrPort() != src || d.AddrPort() != dst || h.Version != 2 || !h.Command.IsProxy() {
		t.Errorf("parsed %+v", h)
	}
}

func TestProxyPrefixAllocatesNothing(t *testing.T) {
	dst, _ := parseDst("127.0.0.1:7000")
	pp := newProxyPrefix(dst)
	req := []byte("baton-bench ping\n")
	if a := testing.AllocsPerRun(100, func() { pp.with(req) }); a != 0 {
		t.Errorf("%v allocations per connection", a)
	}
}

func TestScrape(t *testing.T) {
	body := "# HELP baton_connections_accepted_total x\nbaton_connections_accepted_total 3\n"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) }))
	defer srv.Close()
	r, err := Scrape(ScrapeConfig{URL: srv.URL + "/metrics", Warmup: 1, Scrapes: 20, Want: "baton_", ServerPIDs: []int{os.Getpid()}})
	if err != nil {
		t.Fatal(err)
	}
	if r.Ops != 20 || r.Errors != 0 || r.Bytes != len(body) || r.P50 <= 0 || r.ServerProcs != 1 || !strings.Contains(r.String(), "20 scrapes") {
		t.Errorf("%+v", r)
	}
	r, err = Scrape(ScrapeConfig{URL: srv.URL + "/metrics", Scrapes: 3, Want: "go_goroutines"})
	if err != nil {
		t.Fatal(err)
	}
	if r.Ops != 0 || r.Errors != 3 {
		t.Errorf("a body without the wanted metric counted: %+v", r)
	}
	if _, err := Scrape(ScrapeConfig{URL: "http://10.0.0.1:9100/metrics", Scrapes: 1}); err == nil {
		t.Error("a URL off loopback accepted")
	}
}
