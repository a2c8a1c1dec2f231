package main

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/cmd/internal/admin"
)

// Generations count what served: a failed reload consumes no number, a clean stop and a fresh
// start resume at the next one (and say so), a kill -9 and a fresh start keep the generation
// that was serving and ask the supervisor to adopt its workers.
func TestGenerationCountsWhatServed(t *testing.T) {
	dir := t.TempDir()
	bin := ownBinary(t, dir)
	conf := filepath.Join(dir, "baton.toml")
	good := "workers = 2\nready_timeout = \"10s\"\nadopt_window = \"3s\"\n"
	os.WriteFile(conf, []byte(good), 0o644)
	g := startGateway(t, opts{binary: bin, workers: 2, args: []string{"-config", conf}})
	os.WriteFile(conf, []byte(good+"workers = = 3\n"), 0o644)
	if code, out := g.ctl("reload"); code != 1 {
		t.Fatalf("reload with a bad config: exit %d: %s", code, out)
	}
	os.WriteFile(conf, []byte(good), 0o644)
	if code, out := g.ctl("reload"); code != 0 || !strings.Contains(out, "generation 1 (") || !strings.Contains(out, "→ generation 2 (") {
		t.Fatalf("the good reload after a failed one must be exactly +1: exit %d: %s", code, out)
	}
	g.stop() // clean
	os.Remove(filepath.Join(g.dir, "batond.pid"))
	g.restart()
	if st := g.status(); st.Generation != 3 {
		t.Errorf("after a clean stop of generation 2, a fresh start runs generation %d, want 3", st.Generation)
	}
	if !strings.Contains(g.log.String(), "resuming after a clean stop: gen=3 generation=3 resumes_from=2") {
		t.Errorf("the log does not say which generation it resumes from:\n%s", g.log.String())
	}
	held := holdSessions(t, g.addr, 4)
	g.crash()
	held.check("after kill -9 of batond") // the workers live on
	g.launch()
	waitFor(t, "the restarted batond to say it adopts", 20*time.Second, func() (bool, string) {
		return strings.Contains(g.log.String(), "did not stop cleanly: keeping its generation and adopting its workers: gen=3 generation=3"), ""
	})
	g2 := g
	if !strings.Contains(g2.log.String(), "adopt_window=3s") {
		t.Errorf("adoption not requested with the configured window:\n%s", g2.log.String())
	}
	g2.waitServing()
	if st := g2.status(); st.Generation != 3 {
		t.Errorf("after kill -9, the restarted batond runs generation %d, want 3", st.Generation)
	}
}

// The admin socket answers while batond starts and while it stops; a stopping batond refuses
// new clients at once (no systemd here), logs the drain's progress, and a second SIGTERM stops
// it at once.
func TestStartingAndStoppingPhases(t *testing.T) {
	build(t)
	dir := t.TempDir()
	conf := filepath.Join(dir, "baton.toml")
	os.WriteFile(conf, []byte(slowWorkerConfig(bins.batond, "3")), 0o644)
	g := startGatewayNoWait(t, opts{workers: 2, args: []string{"-config", conf, "-stop-timeout", "60s"}})
	var out string
	waitFor(t, "batonctl status to answer while batond starts", 10*time.Second, func() (bool, string) {
		var code int
		code, out = g.ctl("status")
		return code == 0 && strings.HasPrefix(out, "starting: 0 of 2 workers ready, waiting up to "), out
	})
	g.waitServing()
	if code, out := g.ctl("status"); code != 0 || !strings.HasPrefix(out, "serving\n") {
		t.Errorf("status once serving: exit %d:\n%s", code, out)
	}
	held := holdSessions(t, g.addr, 3)
	pid := g.pid()
	syscall.Kill(pid, syscall.SIGTERM)
	var st admin.Status
	waitFor(t, "status to say stopping", 10*time.Second, func() (bool, string) {
		st = g.status()
		return st.Phase == admin.PhaseStopping, st.PhaseDetail
	})
	// (How many clients a drained worker still reports is the roster's business; the sentence's
	// form and the deadline are ours.)
	if !regexp.MustCompile(`^stopping: draining [12] workers, [0-3] clients, (59|60|1m0)s left$`).MatchString(st.PhaseDetail) {
		t.Errorf("phase while stopping: %q", st.PhaseDetail)
	}
	_, err := net.DialTimeout("tcp", g.addr, 2*time.Second)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("a new client of a stopping batond: %v, want ECONNREFUSED", err)
	}
	held.check("while batond stops") // sessions play on while their workers drain
	waitFor(t, "drain progress in the log", 10*time.Second, func() (bool, string) {
		return strings.Contains(g.log.String(), "stopping: draining "), ""
	})
	start := time.Now()
	syscall.Kill(pid, syscall.SIGTERM)
	select {
	case <-g.exited:
	case <-time.After(20 * time.Second):
		t.Fatal("batond still running 20s after a second SIGTERM (stop timeout 60s)")
	}
	t.Logf("batond exited %v after the second SIGTERM", time.Since(start).Round(time.Millisecond))
	if !strings.Contains(g.log.String(), "second signal: stopping at once") {
		t.Errorf("the log does not say the second signal stops at once:\n%s", g.log.String())
	}
}

// At fd exhaustion (clients held by a stopped worker took every descriptor), the admin socket
// still answers, more than once.
func TestAdminAnswersAtFDExhaustion(t *testing.T) {
	g := startGateway(t, opts{workers: 1, args: []string{"-handoff-timeout", "20s", "-queue-timeout", "20s"}})
	st := g.status()
	n := countFDs(t, st.PID) + 8
	if err := unix.Prlimit(st.PID, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: uint64(n), Max: uint64(n)}, nil); err != nil {
		t.Fatal(err)
	}
	worker := st.Workers[0].PID
	syscall.Kill(worker, syscall.SIGSTOP)
	defer syscall.Kill(worker, syscall.SIGCONT)
	var clients []net.Conn
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	for i := 0; i < 40; i++ {
		c, err := net.DialTimeout("tcp", g.addr, 5*time.Second)
		if err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
		clients = append(clients, c)
	}
	waitFor(t, "batond to run out of fds", 10*time.Second, func() (bool, string) {
		return strings.Contains(g.log.String(), "too many open files"), "no EMFILE in the log yet"
	})
	for i := 0; i < 3; i++ {
		if code, out := g.ctl("-timeout", "5s", "status"); code != 0 || !strings.HasPrefix(out, "serving\n") {
			t.Fatalf("status %d at fd exhaustion: exit %d:\n%s", i, code, out)
		}
		if got := countFDs(t, st.PID); got < n-1 {
			t.Errorf("batond holds %d fds of %d: not exhausted", got, n)
		}
	}
}
