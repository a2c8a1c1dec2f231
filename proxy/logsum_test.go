package proxy

import (
	"bytes"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// logBuffer is an hclog output the test can read while the gateway writes.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// matching returns the lines that match re, each with its submatches.
func (l *logBuffer) matching(re *regexp.Regexp) [][]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out [][]string
	for _, line := range strings.Split(l.b.String(), "\n") {
		if m := re.FindStringSubmatch(line); m != nil {
			out = append(out, m)
		}
	}
	return out
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func testLogger(out *logBuffer) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: "proxy", Level: hclog.Trace, Output: out})
}

// waitLines polls until at least n lines match re, or d passes.
func waitLines(out *logBuffer, re *regexp.Regexp, n int, d time.Duration) [][]string {
	deadline := time.Now().Add(d)
	for {
		m := out.matching(re)
		if len(m) >= n || time.Now().After(deadline) {
			return m
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// connectAll opens n connections to ln from a few goroutines and returns them.
func connectAll(t *testing.T, ln *net.TCPListener, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, n)
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				c, err := net.DialTimeout("tcp", ln.Addr().String(), 10*time.Second)
				if err != nil {
					errs <- err
					return
				}
				conns[i] = c
			}
		}()
	}
	wg.Wait()
	close(errs)
	for _, c := range conns {
		if c != nil {
			t.Cleanup(func() { c.Close() })
		}
	}
	if err := <-errs; err != nil {
		t.Fatalf("connect: %v", err)
	}
	return conns
}

// closedRe matches a summary line for queue-timeout closes: its count and its cause.
var closedRe = regexp.MustCompile(`closed (\d+) clients? after the queue timeout \(([^)]*)\): (.*?): count=(\d+) reason=no_worker`)

// 3,000 clients closed after the queue timeout are one line with their count and the cause
// read from the gateway (both workers at capacity), not 3,000 lines. The first close after a
// quiet spell is said at once; what follows within the interval waits for its end.
func TestQueueTimeoutClosesAreSummarized(t *testing.T) {
	var out logBuffer
	const interval = 6 * time.Second
	g, ln, _ := serve(t, Config{QueueTimeout: 300 * time.Millisecond, HandoffTimeout: 400 * time.Millisecond,
		PingInterval: time.Minute, SummaryInterval: interval, Logger: testLogger(&out)})
	// Two workers, each already holding one client of its capacity of one: at capacity.
	for slot := 0; slot < 2; slot++ {
		attachInfo(t, g, BackendInfo{Slot: slot, Ready: true, Capacity: 1, Live: 1})
	}

	// The first one: a line at once.
	connectAll(t, ln, 1)
	first := waitLines(&out, closedRe, 1, 3*time.Second)
	if len(first) != 1 {
		t.Fatalf("no summary line within 3s of the first queue timeout (300ms):\n%s", out.String())
	}
	t1 := time.Now()
	if m := first[0]; m[1] != "1" || m[4] != "1" || m[2] != "300ms" || m[3] != "all 2 workers at capacity 1" {
		t.Errorf("first line: %q; want 1 client, 300ms, all 2 workers at capacity 1", m[0])
	}

	// 3,000 more, well within the interval: one line when it ends.
	const n = 3000
	conns := connectAll(t, ln, n)
	// Every one of them is closed by the gateway (the client reads EOF).
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		if k, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatalf("client %d read %d bytes; want EOF from the gateway's close", i, k)
		}
	}
	if time.Since(t1) > interval-time.Second {
		t.Fatalf("the 3000 clients took %v to be closed: too slow for a %v interval to hold them all", time.Since(t1), interval)
	}
	if got := out.matching(closedRe); len(got) != 1 {
		t.Fatalf("%d summary lines before the interval ended, want still 1:\n%s", len(got), out.String())
	}
	lines := waitLines(&out, closedRe, 2, interval+5*time.Second)
	if len(lines) != 2 {
		t.Fatalf("%d summary lines %v after the first, want 2:\n%s", len(lines), time.Since(t1), out.String())
	}
	if m := lines[1]; m[1] != strconv.Itoa(n) || m[4] != strconv.Itoa(n) || m[3] != "all 2 workers at capacity 1" {
		t.Errorf("summary line: %q; want %d clients, all 2 workers at capacity 1", m[0], n)
	}
	if took := time.Since(t1); took < interval-time.Second {
		t.Errorf("the summary came %v after the first line, before the %v interval ended", took, interval)
	}
	if s := g.Stats(); s.Closed["no_worker"] != n+1 {
		t.Errorf("closed_by_gateway no_worker = %d, want %d", s.Closed["no_worker"], n+1)
	}
	if lines := strings.Count(out.String(), "\n"); lines > 4 {
		t.Errorf("%d log lines for %d closed clients and 2 workers, want at most 4:\n%s", lines, n+1, out.String())
	}
	t.Logf("log:\n%s", out.String())
}

// With no worker at all the cause says so; and what the interval has not said yet when the
// gateway closes (here: all of the second batch) is said by Close.
func TestSummaryNoWorkersAndFinalFlush(t *testing.T) {
	var out logBuffer
	g, ln, _ := serve(t, Config{QueueTimeout: 200 * time.Millisecond, HandoffTimeout: 400 * time.Millisecond,
		SummaryInterval: time.Hour, Logger: testLogger(&out)})
	connectAll(t, ln, 1)
	if l := waitLines(&out, closedRe, 1, 3*time.Second); len(l) != 1 || l[0][3] != "no workers registered" {
		t.Fatalf("want one line saying no workers registered:\n%s", out.String())
	}
	for _, c := range connectAll(t, ln, 20) {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		c.Read(make([]byte, 1))
	}
	waitFor(t, 5*time.Second, func() bool { return g.Stats().Closed["no_worker"] == 21 })
	g.StopAccepting()
	g.Close()
	got := out.matching(closedRe)
	if len(got) != 2 || got[1][1] != "20" || got[1][3] != "no workers registered" {
		t.Errorf("want a second line for the other 20 at Close:\n%s", out.String())
	}
}

// Clients still waiting for a worker when the gateway stops are closed, and said so in one line.
func TestSummaryAtShutdown(t *testing.T) {
	var out logBuffer
	g, ln, _ := serve(t, Config{QueueTimeout: time.Hour, SummaryInterval: time.Hour, Logger: testLogger(&out)})
	waiting := connectAll(t, ln, 7)
	waitFor(t, 5*time.Second, func() bool { return g.Stats().InFlight == 7 })
	g.StopAccepting()
	g.Close()
	shut := out.matching(regexp.MustCompile(`closed (\d+) clients still waiting for a worker when batond stopped: count=(\d+) reason=shutdown`))
	if len(shut) != 1 || shut[0][1] != "7" {
		t.Errorf("want one line for the 7 closed at shutdown:\n%s", out.String())
	}
	for _, c := range waiting {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Errorf("a client waiting at shutdown was not closed")
		}
	}
}

func waitFor(t *testing.T, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %v", d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestAvailabilityString(t *testing.T) {
	for _, c := range []struct {
		a    availability
		want string
	}{
		{availability{}, "no workers registered"},
		{availability{registered: 2, atCapacity: 2, capacity: 1000}, "all 2 workers at capacity 1000"},
		{availability{registered: 1, atCapacity: 1, capacity: 8}, "the one worker at capacity 8"},
		{availability{registered: 3, atCapacity: 3}, "all 3 workers at capacity"},
		{availability{registered: 2, draining: 2}, "all 2 workers draining"},
		{availability{registered: 4, notReady: 4}, "all 4 workers not ready yet"},
		{availability{registered: 4, draining: 3, notReady: 1}, "none of the 4 workers available: 3 draining, 1 not ready yet"},
		{availability{registered: 3, atCapacity: 1, capacity: 5, refusing: 1, full: 1},
			"none of the 3 workers available: 1 at capacity 5, 1 refusing connections (out of file descriptors?), 1 with a full channel (not reading it)"},
	} {
		if got := c.a.String(); got != c.want {
			t.Errorf("%+v: %q, want %q", c.a, got, c.want)
		}
	}
}

// availabilityLocked classifies real backends as dispatch sees them.
func TestAvailabilityFromBackends(t *testing.T) {
	g := New(Config{PingInterval: time.Minute})
	defer g.Close()
	attachInfo(t, g, BackendInfo{Slot: 0, Ready: true, Capacity: 2, Live: 2})
	attachInfo(t, g, BackendInfo{Slot: 1, Ready: true, Capacity: 2, Live: 2})
	attachInfo(t, g, BackendInfo{Slot: 2, Ready: true, Draining: true})
	attachInfo(t, g, BackendInfo{Slot: 3})
	g.mu.Lock()
	a := g.availabilityLocked()
	g.mu.Unlock()
	if got, want := a.String(), "none of the 4 workers available: 2 at capacity 2, 1 draining, 1 not ready yet"; got != want {
		t.Errorf("%q, want %q", got, want)
	}
}
