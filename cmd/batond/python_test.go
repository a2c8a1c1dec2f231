package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/baton-gw/baton/supervisor"
)

// Integration tests with real Python workers: batond runs examples/python/lobby.py (asyncio, on
// worker/python/baton_worker.py) or testdata/raising_worker.py, and real TCP clients on
// 127.0.0.1 play. python3 must be on PATH (CI installs it); these tests never skip.

// pythonWorker is the worker command for a Python script given relative to this package.
func pythonWorker(tb testing.TB, script string) []string {
	tb.Helper()
	if _, err := exec.LookPath("python3"); err != nil {
		tb.Fatalf("python3 is needed for the Python integration tests: %v", err)
	}
	abs, err := filepath.Abs(script)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := os.Stat(abs); err != nil {
		tb.Fatal(err)
	}
	return []string{"python3", abs}
}

const lobbyScript = "../../examples/python/lobby.py"

// pythonArgs are batond flags for Python workers: a cold CPython start (interpreter, asyncio,
// baton_worker) takes seconds on a loaded 2-vCPU machine, four at once longer still; batond's
// default -start-timeout (10s) would then kill a slow starter, which these tests are not about.
var pythonArgs = []string{"-start-timeout", "20s"}

// waitAllReady waits until every slot is ready and no client is counted (the start-up
// self-check probe has gone), so that a test starts from a known state.
func waitAllReady(t *testing.T, g *gateway, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d workers ready and idle", n), 30*time.Second, func() (bool, string) {
		st := g.status()
		ready := 0
		for _, w := range st.Workers {
			if w.State == supervisor.StateReady && w.PID != 0 {
				ready++
			}
		}
		return ready == n && st.Clients == 0, fmt.Sprintf("%d ready, %d clients: %+v", ready, st.Clients, st.Workers)
	})
}

// lobbyWhere matches what the lobby says about its host, in the greeting and after /where.
var lobbyWhere = regexp.MustCompile(`^worker pid (\d+), slot (\d+), generation (\d+)$`)

// lobbyClient is one player of examples/python/lobby.py.
type lobbyClient struct {
	c     net.Conn
	r     *bufio.Reader
	port  int    // the client's own port (what the worker sees as the peer's)
	where string // "worker pid P, slot S, generation G", from the greeting
	pid   int
	slot  int
}

// dialLobby connects and reads the two greeting lines:
//
//	welcome to the baton lobby; you are on worker pid P, slot S, generation G
//	what is your name? ...
//
// port is set as soon as the TCP connection exists, so a caller can tell which connection
// failed even when the greeting never came.
func dialLobby(addr string, d time.Duration) (*lobbyClient, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	lc := &lobbyClient{c: c, r: bufio.NewReader(c), port: c.LocalAddr().(*net.TCPAddr).Port}
	c.SetDeadline(time.Now().Add(d))
	line, err := lc.line()
	if err != nil {
		return lc, fmt.Errorf("greeting: %w (got %q)", err, line)
	}
	const prefix = "welcome to the baton lobby; you are on "
	m := lobbyWhere.FindStringSubmatch(strings.TrimPrefix(line, prefix))
	if !strings.HasPrefix(line, prefix) || m == nil {
		return lc, fmt.Errorf("unexpected greeting %q", line)
	}
	lc.where = m[0]
	lc.pid, _ = strconv.Atoi(m[1])
	lc.slot, _ = strconv.Atoi(m[2])
	if line, err = lc.line(); err != nil || !strings.HasPrefix(line, "what is your name?") {
		return lc, fmt.Errorf("second greeting line: %q, %v", line, err)
	}
	return lc, nil
}

func (lc *lobbyClient) line() (string, error) {
	s, err := lc.r.ReadString('\n')
	if err != nil {
		return s, err
	}
	return strings.TrimRight(s, "\r\n"), nil
}

func (lc *lobbyClient) send(s string, d time.Duration) error {
	lc.c.SetDeadline(time.Now().Add(d))
	_, err := lc.c.Write([]byte(s + "\n"))
	return err
}

// expect reads lines (for at most d) until one satisfies match and returns it. Every other line
// goes to skip, which may reject it with an error.
func (lc *lobbyClient) expect(d time.Duration, match func(string) bool, skip func(string) error) (string, error) {
	lc.c.SetDeadline(time.Now().Add(d))
	for range 100000 { // bounded: far more lines than any test sends
		s, err := lc.line()
		if err != nil {
			return s, err
		}
		if match(s) {
			return s, nil
		}
		if skip != nil {
			if err := skip(s); err != nil {
				return s, err
			}
		}
	}
	return "", errors.New("too many lines")
}

// parallel runs f(0..n-1) concurrently and returns the errors.
func parallel(n int, f func(i int) error) []error {
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(i)
		}()
	}
	wg.Wait()
	var out []error
	for i, err := range errs {
		if err != nil {
			out = append(out, fmt.Errorf("client %d: %w", i, err))
		}
	}
	return out
}

func failOnErrors(t *testing.T, phase string, n int, errs []error) {
	t.Helper()
	if len(errs) == 0 {
		return
	}
	var b strings.Builder
	for i, err := range errs {
		if i == 10 {
			fmt.Fprintf(&b, "\n  ... and %d more", len(errs)-10)
			break
		}
		fmt.Fprintf(&b, "\n  %v", err)
	}
	t.Fatalf("%s: %d of %d clients failed:%s", phase, len(errs), n, b.String())
}

// 4 Python lobby workers, 400 players who hold their connections: each learns its worker from
// the greeting (and /where agrees), takes a name, joins a room of 5 on its worker and chats.
// Every player gets exactly the lines of its own room (rooms of the same name on other workers
// are other rooms), per-worker counts differ by at most 1, status agrees with what the players
// saw, and every count returns to 0 once they leave.
func TestPythonLobby400(t *testing.T) {
	g := startGateway(t, opts{workers: 4, args: pythonArgs, command: pythonWorker(t, lobbyScript)})
	waitAllReady(t, g, 4)
	const n, roomSize = 400, 5
	const step = 20 * time.Second // bound on each client's part of a phase
	clients := make([]*lobbyClient, n)
	t.Cleanup(func() {
		for _, c := range clients {
			if c != nil {
				c.c.Close()
			}
		}
	})
	start := time.Now()

	// 1. Connect, read the greeting, ask /where, take a name (which joins the room "lobby").
	failOnErrors(t, "connect and name", n, parallel(n, func(i int) error {
		c, err := dialLobby(g.addr, step)
		if c != nil {
			clients[i] = c
		}
		if err != nil {
			return err
		}
		if err := c.send("/where", step); err != nil {
			return err
		}
		// Not named, so in no room yet: the next line is the answer.
		if s, err := c.line(); err != nil || s != c.where {
			return fmt.Errorf("/where says %q (%v); the greeting said %q", s, err, c.where)
		}
		name := fmt.Sprintf("p%d", i)
		if err := c.send("/name "+name, step); err != nil {
			return err
		}
		if _, err := c.expect(step, func(s string) bool { return strings.HasPrefix(s, "hello "+name+"!") }, nil); err != nil {
			return fmt.Errorf("/name: %w", err)
		}
		_, err = c.expect(step, func(s string) bool { return strings.HasPrefix(s, "* "+name+" joined [lobby]") }, nil)
		return err
	}))
	t.Logf("400 players connected and named in %v", time.Since(start).Round(time.Millisecond))

	// Who is where: per worker, players in index order, rooms of roomSize.
	perPID := map[int][]int{}
	for i, c := range clients {
		perPID[c.pid] = append(perPID[c.pid], i)
	}
	room := make([]string, n)
	members := make([][]int, n)
	for _, idx := range perPID {
		for k := 0; k*roomSize < len(idx); k++ {
			ms := idx[k*roomSize : min(len(idx), (k+1)*roomSize)]
			for _, i := range ms {
				room[i] = fmt.Sprintf("room%d", k) // the same names on every worker, on purpose
				members[i] = ms
			}
		}
	}
	noChat := func(s string) error {
		if strings.HasPrefix(s, "[") {
			return fmt.Errorf("unexpected chat line %q", s)
		}
		return nil
	}

	// 2. Join the room.
	failOnErrors(t, "join", n, parallel(n, func(i int) error {
		c := clients[i]
		if err := c.send("/join "+room[i], step); err != nil {
			return err
		}
		want := fmt.Sprintf("* p%d joined [%s] (", i, room[i])
		_, err := c.expect(step, func(s string) bool { return strings.HasPrefix(s, want) }, noChat)
		return err
	}))

	// 3. Everybody says one line; everybody hears exactly the lines of its room, its own too.
	say := func(i int) string {
		return fmt.Sprintf("[%s] p%d: hello from p%d on pid %d", room[i], i, i, clients[i].pid)
	}
	failOnErrors(t, "chat", n, parallel(n, func(i int) error {
		c := clients[i]
		if err := c.send(fmt.Sprintf("hello from p%d on pid %d", i, c.pid), step); err != nil {
			return err
		}
		want := map[string]bool{}
		for _, j := range members[i] {
			want[say(j)] = true
		}
		got := map[string]bool{}
		c.c.SetDeadline(time.Now().Add(step))
		var err error
		for len(got) < len(want) && err == nil {
			var s string
			switch s, err = c.line(); {
			case err != nil:
			case !strings.HasPrefix(s, "["): // joins and leaves
			case got[s]:
				err = fmt.Errorf("chat line %q twice", s)
			case !want[s]:
				err = fmt.Errorf("chat line %q from outside room %s on pid %d", s, room[i], c.pid)
			default:
				got[s] = true
			}
		}
		if err != nil {
			return fmt.Errorf("heard %d of %d lines of its room: %w", len(got), len(want), err)
		}
		return nil
	}))

	// 4. Everything said has been delivered: up to each player's pong, no more chat may come.
	failOnErrors(t, "ping", n, parallel(n, func(i int) error {
		c := clients[i]
		if err := c.send("/ping", step); err != nil {
			return err
		}
		_, err := c.expect(step, func(s string) bool { return s == "pong" }, noChat)
		return err
	}))
	t.Logf("join, chat and ping done %v after the start", time.Since(start).Round(time.Millisecond))

	// Balance, and status against what the players saw.
	st := g.status()
	if len(perPID) != 4 {
		t.Errorf("players went to %d workers, want 4: %v", len(perPID), counts(perPID))
	}
	lo, hi := n, 0
	for _, w := range st.Workers {
		seen := len(perPID[w.PID])
		if w.Clients != seen {
			t.Errorf("status: slot %d (pid %d) has %d clients; %d players are on it", w.Slot, w.PID, w.Clients, seen)
		}
		if w.State != supervisor.StateReady || w.Restarts != 0 {
			t.Errorf("status: slot %d: state %s, restarts %d", w.Slot, w.State, w.Restarts)
		}
		lo, hi = min(lo, seen), max(hi, seen)
	}
	if hi-lo > 1 {
		t.Errorf("per-worker counts differ by %d (> 1): %v", hi-lo, counts(perPID))
	}
	if st.Clients != n {
		t.Errorf("status: %d clients, want %d", st.Clients, n)
	}
	t.Logf("players per worker: %v", counts(perPID))

	for _, c := range clients {
		c.c.Close()
	}
	waitFor(t, "clients to drop to 0", 15*time.Second, func() (bool, string) {
		st = g.status()
		busy := st.Clients
		for _, w := range st.Workers {
			busy += w.Clients
		}
		return busy == 0, fmt.Sprintf("%d clients; %+v", st.Clients, st.Workers)
	})
	st = checkInvariant(t, g)
	if st.Gateway.Accepted != n || st.Gateway.Acked != n || st.Gateway.ClosedTotal() != 0 {
		t.Errorf("gateway: %+v, want %d accepted and acked, none closed by the gateway", st.Gateway, n)
	}
}

func counts(m map[int][]int) map[int]int {
	out := map[int]int{}
	for k, v := range m {
		out[k] = len(v)
	}
	return out
}

// pySession is what happened to one short lobby session under load.
type pySession struct {
	start time.Time
	port  int // 0: the TCP connect itself failed
	pid   int // 0: no greeting
	err   error
}

// runLobbyLoad runs short lobby sessions (connect, greeting, hold, /ping -> pong, close) at
// about rate per second until stop is closed (bounded to a minute's worth).
func runLobbyLoad(addr string, rate int, hold time.Duration, stop <-chan struct{}) []pySession {
	var (
		mu  sync.Mutex
		out []pySession
		wg  sync.WaitGroup
	)
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
loop:
	for range 60 * rate {
		select {
		case <-stop:
			break loop
		case <-tick.C:
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := pySession{start: time.Now()}
			defer func() {
				mu.Lock()
				out = append(out, s)
				mu.Unlock()
			}()
			c, err := dialLobby(addr, 10*time.Second)
			if c != nil {
				defer c.c.Close()
				s.port, s.pid = c.port, c.pid
			}
			if err != nil {
				s.err = err
				return
			}
			time.Sleep(hold)
			if err := c.send("/ping", 10*time.Second); err != nil {
				s.err = err
				return
			}
			if line, err := c.line(); err != nil || line != "pong" {
				s.err = fmt.Errorf("/ping: %q, %v", line, err)
			}
		}()
	}
	wg.Wait()
	return out
}

// waitStopped waits until every thread of pid is stopped (kill(2) returns before they are).
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("every thread of %d stopped", pid), 5*time.Second, func() (bool, string) {
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		for _, task := range tasks {
			stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
			if i := strings.LastIndexByte(string(stat), ')'); i < 0 || i+2 >= len(stat) || stat[i+2] != 'T' {
				return false, string(stat)
			}
		}
		return len(tasks) > 0, "no tasks"
	})
}

// peerPortsOf lists the client ports of the TCP connections that process pid holds open whose
// local end is the gateway's address localAddr (that is: the clients handed to it).
func peerPortsOf(t *testing.T, pid int, localAddr string) map[int]bool {
	t.Helper()
	_, lport, err := net.SplitHostPort(localAddr)
	if err != nil {
		t.Fatal(err)
	}
	wantLocal, _ := strconv.Atoi(lport)
	inodes := map[string]bool{}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err == nil && strings.HasPrefix(link, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] = true
		}
	}
	tab, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	hexPort := func(addr string) int {
		_, p, _ := strings.Cut(addr, ":")
		v, _ := strconv.ParseInt(p, 16, 32)
		return int(v)
	}
	out := map[int]bool{}
	for _, line := range strings.Split(string(tab), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 10 || !inodes[f[9]] || hexPort(f[1]) != wantLocal {
			continue
		}
		out[hexPort(f[2])] = true
	}
	return out
}

// kill -9 a Python lobby worker while ~150 clients a second connect: it is restarted, every
// client not held by the dead worker is served, the counts return to 0 and no unacked client
// is lost (the gateway closed none).
func TestPythonKill9UnderLoad(t *testing.T) {
	g := startGateway(t, opts{workers: 4, args: pythonArgs, command: pythonWorker(t, lobbyScript)})
	waitAllReady(t, g, 4)
	const rate = 150
	stop := make(chan struct{})
	res := make(chan []pySession)
	go func() { res <- runLobbyLoad(g.addr, rate, 200*time.Millisecond, stop) }()
	stopped := false
	defer func() {
		if !stopped {
			close(stop)
			<-res
		}
	}()
	time.Sleep(1500 * time.Millisecond)

	victim := g.status().Workers[1]
	if victim.State != supervisor.StateReady || victim.PID == 0 {
		t.Fatalf("victim: %+v", victim)
	}
	// Freeze the victim, note which clients it holds, then kill it: SIGKILL on a stopped
	// process is still kill -9, and nothing can be acked in between. A session whose greeting
	// had not been written when the worker died was acked by it all the same: it is cut with
	// the worker, and its port tells it apart.
	if err := syscall.Kill(victim.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitStopped(t, victim.PID)
	held := peerPortsOf(t, victim.PID, g.addr)
	// ESRCH: batond already killed the frozen worker as stalled (a slow host can take longer
	// than the handoff timeout between the freeze and here); it is dead either way.
	if err := syscall.Kill(victim.PID, syscall.SIGKILL); err != nil && err != syscall.ESRCH {
		t.Fatal(err)
	}
	killedAt := time.Now()
	time.Sleep(2500 * time.Millisecond)
	close(stop)
	sessions := <-res
	stopped = true

	var ok, cut, failed, byVictim int
	var failures []string
	for _, s := range sessions {
		if s.pid == victim.PID {
			byVictim++
			if s.start.After(killedAt) {
				t.Errorf("a session started %v after the kill was served by the dead worker", s.start.Sub(killedAt))
			}
		}
		switch {
		case s.err == nil:
			ok++
		case s.pid == victim.PID || (s.port != 0 && held[s.port] && s.start.Before(killedAt)):
			cut++
		default:
			failed++
			if len(failures) < 10 {
				failures = append(failures, fmt.Sprintf("port %d pid %d, %v after the kill: %v", s.port, s.pid, s.start.Sub(killedAt).Round(time.Millisecond), s.err))
			}
		}
	}
	t.Logf("%d sessions: %d ok, %d cut with the killed worker (it held %d), %d failed; %d greeted by the victim",
		len(sessions), ok, cut, len(held), failed, byVictim)
	if failed != 0 {
		t.Errorf("%d clients failed that the killed worker did not hold:\n  %s", failed, strings.Join(failures, "\n  "))
	}
	if cut > len(held) {
		t.Errorf("%d sessions cut but the victim held only %d clients", cut, len(held))
	}
	if byVictim == 0 {
		t.Errorf("the victim served nobody before the kill")
	}
	if ok < 300 {
		t.Errorf("only %d sessions served in 4s at %d/s", ok, rate)
	}

	var st = g.status()
	waitFor(t, "slot 1 restarted and ready", 30*time.Second, func() (bool, string) {
		st = g.status()
		w := st.Workers[1]
		return w.PID != victim.PID && w.PID != 0 && w.State == supervisor.StateReady && w.Restarts == 1, fmt.Sprintf("%+v", w)
	})
	waitFor(t, "clients to drop to 0", 15*time.Second, func() (bool, string) {
		st = g.status()
		busy := st.Clients
		for _, w := range st.Workers {
			busy += w.Clients
		}
		return busy == 0, fmt.Sprintf("%d clients; %+v", st.Clients, st.Workers)
	})
	for _, w := range st.Workers {
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", w.PID))
		if err != nil || !strings.Contains(string(cmdline), "lobby.py") {
			t.Errorf("status names pid %d for slot %d, which is not a running lobby (%v)", w.PID, w.Slot, err)
		}
		if w.Slot != 1 && w.Restarts != 0 {
			t.Errorf("slot %d restarted too: %+v", w.Slot, w)
		}
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", victim.PID)); err == nil {
		t.Errorf("killed worker %d still exists", victim.PID)
	}
	// The restarted worker serves.
	var held2 []*lobbyClient // held, so that the next client goes to a less loaded worker
	servedByNew := false
	for i := 0; i < 8 && !servedByNew; i++ {
		c, err := dialLobby(g.addr, 10*time.Second)
		if c != nil {
			held2 = append(held2, c)
		}
		if err != nil {
			t.Errorf("after the restart: %v", err)
			break
		}
		servedByNew = c.pid == st.Workers[1].PID
	}
	for _, c := range held2 {
		c.c.Close()
	}
	if !servedByNew {
		t.Errorf("the restarted worker (pid %d) is not given clients", st.Workers[1].PID)
	}
	waitFor(t, "clients to drop to 0 again", 15*time.Second, func() (bool, string) {
		st = g.status()
		return st.Clients == 0, fmt.Sprint(st.Clients)
	})
	st = checkInvariant(t, g)
	if st.Gateway.ClosedTotal() != 0 {
		t.Errorf("the gateway closed clients: %v", st.Gateway.Closed)
	}
	if int(st.Gateway.Accepted) < len(sessions) {
		t.Errorf("gateway accepted %d, clients made %d sessions", st.Gateway.Accepted, len(sessions))
	}
	t.Logf("gateway: %+v", st.Gateway)
}

// A Python worker whose handler raises on every connection (testdata/raising_worker.py): each
// client connection is closed promptly, the worker logs the exception, reports the close, and
// batond's counts return to zero while the clients still hold their end; the worker is not
// restarted and batond keeps serving.
func TestPythonHandlerRaises(t *testing.T) {
	g := startGateway(t, opts{workers: 2, args: pythonArgs, command: pythonWorker(t, "testdata/raising_worker.py")})
	waitAllReady(t, g, 2)
	before := g.status()
	greeted := regexp.MustCompile(`^raising worker pid (\d+), connection (\d+)\n$`)
	var withGreeting, silent atomic.Int64
	round := func(n int, concurrent bool) {
		t.Helper()
		conns := make([]net.Conn, n)
		defer func() {
			for _, c := range conns {
				if c != nil {
					c.Close()
				}
			}
		}()
		one := func(i int) error {
			c, err := net.DialTimeout("tcp", g.addr, 5*time.Second)
			if err != nil {
				return err
			}
			conns[i] = c // the client keeps its end open: the worker must close its own
			t0 := time.Now()
			c.SetReadDeadline(t0.Add(5 * time.Second))
			got, err := io.ReadAll(io.LimitReader(c, 4096))
			took := time.Since(t0)
			if err != nil {
				return fmt.Errorf("no EOF after %v (read %q): %w", took, got, err)
			}
			if took > 2*time.Second {
				return fmt.Errorf("EOF only after %v", took)
			}
			switch {
			case len(got) == 0:
				silent.Add(1)
			case greeted.Match(got):
				withGreeting.Add(1)
			default:
				return fmt.Errorf("unexpected bytes %q", got)
			}
			return nil
		}
		if concurrent {
			failOnErrors(t, "raising round", n, parallel(n, one))
		} else {
			for i := range n {
				if err := one(i); err != nil {
					t.Fatalf("client %d: %v", i, err)
				}
			}
		}
		// Counted down by the workers' CLOSED, while every client still holds its end.
		waitFor(t, "clients to drop to 0", 10*time.Second, func() (bool, string) {
			st := g.status()
			busy := st.Clients
			for _, w := range st.Workers {
				busy += w.Clients
			}
			return busy == 0, fmt.Sprintf("%d clients; %+v", st.Clients, st.Workers)
		})
	}
	round(40, true)
	round(20, false) // batond keeps serving, and the workers still count right
	t.Logf("%d connections closed after a greeting, %d before any I/O", withGreeting.Load(), silent.Load())
	if withGreeting.Load() == 0 || silent.Load() == 0 {
		t.Errorf("want both failure kinds: %d with greeting, %d silent", withGreeting.Load(), silent.Load())
	}
	st := checkInvariant(t, g)
	if st.Gateway.Accepted != 60 || st.Gateway.Acked != 60 || st.Gateway.ClosedTotal() != 0 {
		t.Errorf("gateway: %+v, want 60 accepted and acked, none closed by the gateway", st.Gateway)
	}
	for i, w := range st.Workers {
		if w.PID != before.Workers[i].PID || w.Restarts != 0 || w.State != supervisor.StateReady {
			t.Errorf("slot %d changed: %+v, was %+v", w.Slot, w, before.Workers[i])
		}
	}
	log := g.log.String()
	for _, want := range []string{
		"handler failed on connection",
		"Traceback (most recent call last)",
		"RuntimeError: raising_worker: deliberate failure after the greeting",
		"RuntimeError: raising_worker: deliberate failure before any I/O",
	} {
		if !strings.Contains(log, want) {
			t.Errorf("batond's log (the workers' stderr) lacks %q", want)
		}
	}
	if n := strings.Count(log, "handler failed on connection"); n < 60 {
		t.Errorf("%d handler failures logged, want at least 60", n)
	}
}
