package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/baton-gw/baton/supervisor"
)

// 4 Go workers, 400 clients holding their connections and echoing: every client is served and
// per-worker counts differ by at most 1; status agrees.
func TestBalance400Clients(t *testing.T) {
	g := startGateway(t, opts{workers: 4})
	const n = 400
	clients := make([]*client, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := dial(g.addr)
			if err == nil {
				err = c.echo(fmt.Sprintf("hello %d", i))
			}
			if err != nil {
				errs <- err
				return
			}
			clients[i] = c
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	perPID := map[int]int{}
	for _, c := range clients {
		_, pid := c.worker()
		perPID[pid]++
	}
	st := g.status()
	if len(perPID) != 4 {
		t.Fatalf("clients went to %d workers, want 4: %v", len(perPID), perPID)
	}
	lo, hi := n, 0
	for _, w := range st.Workers {
		if w.Clients != perPID[w.PID] {
			t.Errorf("status says worker %d (pid %d) has %d clients; clients saw %d", w.Slot, w.PID, w.Clients, perPID[w.PID])
		}
		lo, hi = min(lo, perPID[w.PID]), max(hi, perPID[w.PID])
	}
	if hi-lo > 1 {
		t.Errorf("per-worker counts differ by %d (> 1): %v", hi-lo, perPID)
	}
	if st.Clients != n {
		t.Errorf("status: %d clients, want %d", st.Clients, n)
	}
	for i, c := range clients {
		if err := c.echo("again " + strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
		c.c.Close()
	}
	waitFor(t, "clients to drop to 0", 10*time.Second, func() (bool, string) {
		st := g.status()
		return st.Clients == 0, fmt.Sprint(st.Clients)
	})
	st = checkInvariant(t, g)
	if st.Gateway.Accepted != n || st.Gateway.ClosedTotal() != 0 {
		t.Errorf("gateway: %+v", st.Gateway)
	}
}

// load runs short sessions (connect, greeting, echo, close) at about rate per second until stop
// is closed, and sorts what happens to each.
type load struct {
	ok, cut, failed atomic.Int64
	servedBy        sync.Map // pid -> *atomic.Int64
	mu              sync.Mutex
	failures        []string
}

func runLoad(addr string, rate int, stop <-chan struct{}, killed *atomic.Int64) *load {
	l := &load{}
	var wg sync.WaitGroup
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	for i := 0; i < 60*rate; i++ { // bounded: at most a minute's worth
		select {
		case <-stop:
			wg.Wait()
			return l
		case <-tick.C:
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := dial(addr)
			if err != nil {
				l.failed.Add(1)
				l.mu.Lock()
				l.failures = append(l.failures, err.Error())
				l.mu.Unlock()
				return
			}
			defer c.c.Close()
			_, pid := c.worker()
			v, _ := l.servedBy.LoadOrStore(pid, new(atomic.Int64))
			v.(*atomic.Int64).Add(1)
			time.Sleep(20 * time.Millisecond)
			if err := c.echo("ping"); err != nil {
				if killed != nil && int64(pid) == killed.Load() {
					l.cut.Add(1) // served by the worker we killed: its session died with it
					return
				}
				l.failed.Add(1)
				l.mu.Lock()
				l.failures = append(l.failures, fmt.Sprintf("pid %d: %v", pid, err))
				l.mu.Unlock()
				return
			}
			l.ok.Add(1)
		}()
	}
	wg.Wait()
	return l
}

// kill -9 a worker while ~200 clients a second connect: every client not acked by the dead
// worker is served by another, the worker is restarted, and status matches reality.
func TestKill9UnderLoad(t *testing.T) {
	g := startGateway(t, opts{workers: 4})
	stop := make(chan struct{})
	var killed atomic.Int64
	res := make(chan *load)
	go func() { res <- runLoad(g.addr, 200, stop, &killed) }()
	time.Sleep(time.Second)
	victim := g.status().Workers[1]
	killed.Store(int64(victim.PID))
	if err := syscall.Kill(victim.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	close(stop)
	l := <-res
	t.Logf("ok %d, cut with the killed worker %d, failed %d", l.ok.Load(), l.cut.Load(), l.failed.Load())
	if l.failed.Load() != 0 {
		t.Errorf("%d clients failed: %v", l.failed.Load(), l.failures)
	}
	if l.ok.Load() < 300 {
		t.Errorf("only %d clients served in 3s at 200/s", l.ok.Load())
	}
	var st = g.status()
	waitFor(t, "slot 1 restarted and ready", 10*time.Second, func() (bool, string) {
		st = g.status()
		w := st.Workers[1]
		return w.PID != victim.PID && w.PID != 0 && w.State == supervisor.StateReady && w.Restarts == 1, fmt.Sprintf("%+v", w)
	})
	// status matches reality: every pid it names is a live demo worker, with 0 clients now
	waitFor(t, "clients to drop to 0", 10*time.Second, func() (bool, string) {
		st = g.status()
		return st.Clients == 0, fmt.Sprint(st.Clients)
	})
	for _, w := range st.Workers {
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", w.PID))
		if err != nil || !strings.Contains(string(cmdline), "demo-worker") {
			t.Errorf("status names pid %d for slot %d, which is not a running worker (%v)", w.PID, w.Slot, err)
		}
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", victim.PID)); err == nil {
		t.Errorf("killed worker %d still exists", victim.PID)
	}
	// Served-by includes the new worker of slot 1.
	if _, ok := l.servedBy.Load(st.Workers[1].PID); !ok {
		t.Logf("restarted worker served nobody during the run (it came back late in it)")
	}
	checkInvariant(t, g)
	// batonctl agrees, in its table and in JSON
	out, err := exec.Command(bins.batonct, "-admin", filepath.Join(g.dir, "admin.sock"), "status").CombinedOutput()
	if err != nil || !strings.Contains(string(out), strconv.Itoa(st.Workers[1].PID)) || !strings.Contains(string(out), "ready") {
		t.Errorf("batonctl status: %v\n%s", err, out)
	}
}

// A worker that registers and stops reading (SIGSTOP): handoffs to it time out, it is killed and
// restarted, its pending clients are served by others, and no client is served twice.
func TestStalledWorkerIsReplaced(t *testing.T) {
	g := startGateway(t, opts{workers: 3, args: []string{"-handoff-timeout", "500ms"}})
	st := g.status()
	victim := st.Workers[0]
	if err := syscall.Kill(victim.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// kill(2) returns before every thread has stopped; a client handed over in that window
	// would be served (and then cut when the worker is killed). Wait for the group stop.
	waitFor(t, "every thread of the victim stopped", 5*time.Second, func() (bool, string) {
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", victim.PID))
		for _, task := range tasks {
			stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", victim.PID, task.Name()))
			if i := strings.LastIndexByte(string(stat), ')'); i < 0 || i+2 >= len(stat) || stat[i+2] != 'T' {
				return false, string(stat)
			}
		}
		return len(tasks) > 0, "no tasks"
	})
	const n = 60
	var wg sync.WaitGroup
	servedBy := make([]int, n)
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := dial(g.addr)
			if err == nil {
				err = c.echo("x")
			}
			if err != nil {
				errs <- err
				return
			}
			defer c.c.Close()
			_, servedBy[i] = c.worker()
			// Exactly one worker answers: nothing more arrives on this connection.
			c.c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			if b, err := c.r.ReadByte(); err == nil {
				errs <- fmt.Errorf("client %d: unexpected extra byte %q: served twice?", i, b)
			}
		}()
		time.Sleep(5 * time.Millisecond)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for i, pid := range servedBy {
		if pid == victim.PID {
			t.Errorf("client %d was served by the stopped worker", i)
		}
	}
	waitFor(t, "stalled worker replaced", 10*time.Second, func() (bool, string) {
		w := g.status().Workers[0]
		return w.PID != victim.PID && w.State == supervisor.StateReady && w.Restarts >= 1, fmt.Sprintf("%+v", w)
	})
	st = checkInvariant(t, g)
	if st.Gateway.Redispatched == 0 {
		t.Error("no connection was re-dispatched; the stalled worker never held one")
	}
	if !strings.Contains(g.log.String(), "no ACK within the handoff timeout") {
		t.Error("the log does not say why the worker was killed")
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", victim.PID)); err == nil {
		t.Errorf("stalled worker %d still exists", victim.PID)
	}
}

// batond's open fds are the same before and after 10,000 handoffs.
func TestFDsStableOver10000Handoffs(t *testing.T) {
	g := startGateway(t, opts{workers: 2})
	pid := g.status().PID
	// warm up: the first connections create lazily allocated fds (epoll, timers)
	for i := 0; i < 20; i++ {
		c, err := dial(g.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.c.Close()
	}
	checkInvariant(t, g)
	time.Sleep(100 * time.Millisecond) // the status request's connection closes on batond's side too
	before := countFDs(t, pid)
	const n, par = 10000, 16
	var wg sync.WaitGroup
	var failed atomic.Int64
	for w := 0; w < par; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < n/par; i++ {
				c, err := dial(g.addr)
				if err != nil {
					failed.Add(1)
					continue
				}
				c.c.Close()
			}
		}()
	}
	wg.Wait()
	if failed.Load() != 0 {
		t.Errorf("%d of %d connections failed", failed.Load(), n)
	}
	st := checkInvariant(t, g)
	// Settled, not sampled: the status request's own connection, say, may still be open for
	// a moment on batond's side. A leak would stay.
	after := countFDs(t, pid)
	for deadline := time.Now().Add(3 * time.Second); after != before && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		after = countFDs(t, pid)
	}
	if after != before {
		t.Errorf("batond had %d fds before %d handoffs and %d after", before, st.Gateway.Acked, after)
	}
	t.Logf("fds %d before, %d after %d handoffs", before, after, st.Gateway.Acked)
}

// A worker that sends garbage, an oversized message or a wrong version is disconnected with a
// logged reason and replaced, while batond keeps serving.
func TestMisbehavingWorkersAreReplaced(t *testing.T) {
	for _, c := range []struct{ role, logged string }{
		{"garbage", "MALFORMED"},
		{"garbage-after", "unexpected type(0x42)"},
		{"oversize", "truncated"},
		{"badversion", "VERSION"},
		{"badtoken", "TOKEN"},
	} {
		t.Run(c.role, func(t *testing.T) {
			dir := t.TempDir()
			self, _ := os.Executable()
			g := startGateway(t, opts{workers: 2, command: []string{self}, env: []string{
				roleEnv + "=" + c.role + "@1", roleDirEnv + "=" + dir}})
			waitFor(t, "slot 1 replaced by a good worker", 15*time.Second, func() (bool, string) {
				w := g.status().Workers[1]
				return w.State == supervisor.StateReady && w.Restarts >= 1, fmt.Sprintf("%+v", w)
			})
			log := g.log.String()
			if !strings.Contains(log, c.logged) {
				t.Errorf("log does not give the reason %q", c.logged)
			}
			if strings.Contains(log, "MISBEHAVING WORKER GOT A CLIENT") {
				t.Error("a misbehaving worker received a client")
			}
			for i := 0; i < 20; i++ {
				cl, err := dial(g.addr)
				if err == nil {
					err = cl.echo("still serving")
					cl.c.Close()
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			checkInvariant(t, g)
		})
	}
}

// A process with a wrong token, or running as another uid, never receives a client socket.
func TestTrust(t *testing.T) {
	g := startGateway(t, opts{workers: 1})
	st := g.status()
	sock := filepath.Join(g.dir, "workers.sock")
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("registration socket mode %v, want 0600 (%v)", fi.Mode().Perm(), err)
	}
	fi, err = os.Stat(filepath.Join(g.dir, "admin.sock"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket mode %v, want 0600 (%v)", fi.Mode().Perm(), err)
	}
	key, err := os.ReadFile(sock + ".key")
	if err != nil {
		t.Fatal(err)
	}
	// The intruder is this test binary, copied where uid 65534 may execute it.
	self := exposedCopy(t)
	intrude := func(token string, cred *syscall.Credential) string {
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), roleEnv+"=intruder", "BATON_SOCKET="+sock, "BATON_WORKER=0",
			"BATON_GENERATION="+strconv.FormatUint(st.Generation, 10), "BATON_TOKEN="+token)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		// Keep clients coming while the intruder waits, so it would get one if it could.
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for i := 0; i < 200; i++ {
				select {
				case <-stop:
					return
				case <-time.After(10 * time.Millisecond):
				}
				if c, err := dial(g.addr); err == nil {
					c.c.Close()
				}
			}
		}()
		out, err := cmd.Output()
		close(stop)
		<-done
		if err != nil {
			t.Fatalf("intruder: %v", err)
		}
		return strings.TrimSpace(string(out))
	}
	// The right slot and generation but a wrong token.
	if got := intrude(strings.Repeat("ab", 32), nil); got != "rejected TOKEN" {
		t.Errorf("wrong token: %s", got)
	}
	// A valid token, but the slot's process is someone else.
	token := supervisor.Token(key, st.Generation, 0)
	if got := intrude(token, nil); got != "rejected SLOT" {
		t.Errorf("stolen token, same uid: %s", got)
	}
	// Another uid cannot even reach the socket...
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	if os.Getuid() != 0 {
		t.Fatal("this test needs root to run a process as another uid")
	}
	if got := intrude(token, nobody); !strings.HasPrefix(got, "dial-failed") {
		t.Errorf("uid 65534 with the socket at 0600: %s", got)
	}
	// ...and when an operator loosens the modes, SO_PEERCRED still keeps it out.
	os.Chmod(filepath.Dir(g.dir), 0o755) // t.TempDir makes both levels 0700
	os.Chmod(g.dir, 0o755)
	os.Chmod(sock, 0o666)
	if got := intrude(token, nobody); got != "rejected PEER" {
		t.Errorf("uid 65534 with the socket at 0666: %s", got)
	}
	checkInvariant(t, g)
}

// Bad command lines get usage and exit 2.
func TestUsageErrors(t *testing.T) {
	build(t)
	for _, args := range [][]string{{"-workers", "0"}, {"-bogus"}, {"-log-level", "loud"}, {"-handoff-timeout", "-1s"}, {"-accept-coalesce", "1s"}} {
		cmd := exec.Command(bins.batond, args...)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errorsAs(err, &ee) || ee.ExitCode() != 2 {
			t.Errorf("batond %v: %v, want exit 2\n%s", args, err, out)
		}
	}
	for _, args := range [][]string{{}, {"frobnicate"}, {"status", "extra"}, {"-nope"}} {
		out, err := exec.Command(bins.batonct, args...).CombinedOutput()
		var ee *exec.ExitError
		if !errorsAs(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "usage") {
			t.Errorf("batonctl %v: %v, want usage and exit 2\n%s", args, err, out)
		}
	}
	out, err := exec.Command(bins.batonct, "-admin", filepath.Join(t.TempDir(), "none.sock"), "status").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "not running") {
		t.Errorf("status with no batond: %v\n%s", err, out)
	}
}

func exposedCopy(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// Not t.TempDir: its parent is 0700.
	dir, err := os.MkdirTemp("", "baton-intruder-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "intruder")
	if err := os.WriteFile(p, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}
