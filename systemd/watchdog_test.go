package systemd_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// watchdogSec replaces the unit's WatchdogSec= in these tests, to keep them short.
const watchdogSec = 3 * time.Second

// startBaton installs the units (WatchdogSec= shortened, binaries, config and port rewritten)
// in a throwaway systemd, starts them with the demo game as release v1 and n workers, and
// returns the harness once batond serves.
func startBaton(t *testing.T, workers int) *harness {
	t.Helper()
	requireRoot(t)
	requireTools(t, "go")
	build(t)
	dir := t.TempDir()
	t.Cleanup(func() { killLeftovers(t, bins.dir, dir) }) // runs after the namespace's teardown
	addr := freeAddr(t)
	h := &harness{t: t, dir: dir, addr: addr, version: "v1", cfg: filepath.Join(dir, "baton.toml")}
	if err := os.WriteFile(h.cfg, []byte(fmt.Sprintf(`# written by %s
listen = [%q]
workers = %d
socket = "/run/baton/workers.sock"
admin = "/run/baton/admin.sock"
state = "/run/baton"
command = [%q, "demo-worker", "v1"]
ready_timeout = "20s"
start_timeout = "10s"
handoff_timeout = "2s"
drain_timeout = "10m"
stop_timeout = "5s"
log_level = "info"
`, t.Name(), addr, workers, bins.batond)), 0o644); err != nil {
		t.Fatal(err)
	}
	units := filepath.Join(dir, "units")
	if err := os.Mkdir(units, 0o755); err != nil {
		t.Fatal(err)
	}
	installUnits(t, units, append(binRewrites(),
		[2]string{"/etc/baton/baton.toml", h.cfg},
		[2]string{"ListenStream=127.0.0.1:7000", "ListenStream=" + addr},
		[2]string{"WatchdogSec=10s", "WatchdogSec=" + strconv.Itoa(int(watchdogSec/time.Second)) + "s"})...)
	h.ns = bootSystemd(t, units)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("journalctl -u baton (last 300 lines):\n%s", h.ns.journal("baton.service", 300))
		}
	})
	if out, err := h.ns.systemctl("start", "baton.socket", "baton-workers.socket", "baton.service"); err != nil {
		t.Fatalf("systemctl start: %v\n%s\n%s", err, out, h.ns.journal("baton.service", 100))
	}
	if got := h.ns.show("baton.service", "WatchdogUSec"); got != watchdogSec.String() {
		t.Fatalf("WatchdogUSec=%s, want %v (the unit's WatchdogSec=, rewritten)", got, watchdogSec)
	}
	st := h.status()
	if ready := readyIn(st); ready != workers {
		t.Fatalf("systemctl start returned with %d of %d workers ready:\n%v", ready, workers, st)
	}
	h.gen, h.pid = st.Generation, st.PID
	return h
}

func readyIn(st status) int {
	n := 0
	for _, w := range st.Workers {
		if w.Generation == st.Generation && w.State == "ready" {
			n++
		}
	}
	return n
}

// holdSessions opens n long sessions (a line every 50ms each) and waits until all are up.
// The returned function closes them and waits for their goroutines.
func (h *harness) holdSessions(n int) func() {
	h.t.Helper()
	if h.tr == nil {
		h.tr = newTraffic(h.addr)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	want := h.tr.sessionsUp.Load() + h.tr.sessionsBroken.Load() + int64(n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); h.tr.session(ctx) }()
	}
	ok, last := waitFor(30*time.Second, func() (bool, string) {
		return h.tr.sessionsUp.Load()+h.tr.sessionsBroken.Load() == want,
			fmt.Sprintf("%d up, %d broken", h.tr.sessionsUp.Load(), h.tr.sessionsBroken.Load())
	})
	if !ok {
		h.t.Errorf("%d sessions did not connect within 30s: %s", n, last)
	}
	return func() { cancel(); wg.Wait() }
}

// sessionsFlow waits until every open session has exchanged more messages, and fails on any
// broken one.
func (h *harness) sessionsFlow(what string) {
	h.t.Helper()
	before := h.tr.sessionMsgs.Load()
	want := before + 2*h.tr.sessionsUp.Load()
	if ok, last := waitFor(10*time.Second, func() (bool, string) {
		n := h.tr.sessionMsgs.Load()
		return n >= want, fmt.Sprintf("%d messages since, want %d", n-before, want-before)
	}); !ok {
		h.t.Errorf("%s: the sessions are not exchanging: %s", what, last)
	}
	if n := h.tr.failures(); n > 0 {
		h.t.Errorf("%s: %d client failures:\n%s", what, n, h.tr.failureLog())
	}
}

// watchdogKill SIGSTOPs batond's main process: it stops feeding the watchdog, and systemd must
// kill it (its SIGABRT, then SIGCONT) and start a new batond within WatchdogSec and a margin.
// It returns the new batond's status.
func (h *harness) watchdogKill(what string) status {
	t := h.t
	t.Helper()
	mp := h.mainPID()
	if mp != h.pid {
		t.Fatalf("%s: MainPID=%d, batond pid %d", what, mp, h.pid)
	}
	restarts := h.ns.show("baton.service", "NRestarts")
	start := time.Now()
	if out, err := h.ns.run(10*time.Second, "kill", "-STOP", strconv.Itoa(mp)); err != nil {
		t.Fatalf("%s: kill -STOP %d: %v: %s", what, mp, err, out)
	}
	var st status
	const margin = 12 * time.Second // systemd's reaction, the SIGABRT stack dump under -race, a loaded host
	ok, last := waitFor(watchdogSec+margin, func() (bool, string) {
		var err error
		if st, err = h.ns.batonStatus(); err != nil {
			return false, err.Error()
		}
		return st.PID != mp && h.mainPID() == st.PID, fmt.Sprintf("batond pid %d (stopped: %d), MainPID %d", st.PID, mp, h.mainPID())
	})
	took := time.Since(start)
	if !ok {
		t.Fatalf("%s: no new batond %v after SIGSTOP (WatchdogSec=%v): %s", what, took.Round(time.Millisecond), watchdogSec, last)
	}
	if took < watchdogSec-time.Second {
		t.Errorf("%s: batond replaced %v after SIGSTOP, before WatchdogSec=%v could pass: not the watchdog", what, took, watchdogSec)
	}
	if h.ns.alive(mp) {
		t.Errorf("%s: the stopped batond (pid %d) still exists", what, mp)
	}
	n, _ := strconv.Atoi(restarts)
	if got := h.ns.show("baton.service", "NRestarts"); got != strconv.Itoa(n+1) {
		t.Errorf("%s: NRestarts=%s, want %d", what, got, n+1)
	}
	j, _ := h.ns.run(30*time.Second, "journalctl", "--no-pager", "-o", "cat", "-u", "baton.service",
		"--since", "@"+strconv.FormatInt(start.Unix()-1, 10))
	if !strings.Contains(j, "Watchdog timeout") {
		t.Errorf("%s: the journal does not say systemd's watchdog fired:\n%s", what, j)
	}
	t.Logf("%s: SIGSTOP of batond pid %d; systemd's watchdog replaced it with pid %d in %v", what, mp, st.PID, took.Round(time.Millisecond))
	h.pid = st.PID
	return st
}

// TestWatchdogUnderSystemd: batond feeds systemd's watchdog (WatchdogSec=3s here) while it
// works, idle or serving, and after a reload too (the new batond is not the WATCHDOG_PID
// systemd named); a batond that stops working (SIGSTOP) is killed and restarted by systemd
// within WatchdogSec and a margin, and every held session goes on.
func TestWatchdogUnderSystemd(t *testing.T) {
	h := startBaton(t, 2)
	closeSessions := h.holdSessions(50)
	defer closeSessions()

	// Fed: three WatchdogSec idle but for the sessions, and no restart.
	time.Sleep(3 * watchdogSec)
	if n, mp := h.ns.show("baton.service", "NRestarts"), h.mainPID(); n != "0" || mp != h.pid {
		t.Fatalf("a working batond was restarted: NRestarts=%s, MainPID %d (was %d)\n%s", n, mp, h.pid, h.ns.journal("baton.service", 50))
	}
	if j := h.ns.journal("baton.service", 300); !strings.Contains(j, "feeding systemd's watchdog") {
		t.Errorf("batond does not say it feeds the watchdog:\n%s", j)
	}

	// After a reload the new batond feeds it, although WATCHDOG_PID names the old one.
	old := h.pid
	if out, err := h.ns.systemctl("reload", "baton.service"); err != nil {
		t.Fatalf("systemctl reload: %v\n%s", err, out)
	}
	st, ok := h.newBatond("reload", old)
	if !ok {
		t.FailNow()
	}
	h.pid, h.gen = st.PID, st.Generation
	time.Sleep(3 * watchdogSec)
	if n, mp := h.ns.show("baton.service", "NRestarts"), h.mainPID(); n != "0" || mp != h.pid {
		t.Fatalf("the reloaded batond was restarted: NRestarts=%s, MainPID %d (the reload's %d)\n%s", n, mp, h.pid, h.ns.journal("baton.service", 80))
	}
	h.sessionsFlow("after the reload")

	// Hung: systemd kills and restarts it; sessions play on; new clients are served.
	st = h.watchdogKill("SIGSTOP")
	h.gen = st.Generation
	h.sessionsFlow("after the watchdog restart")
	h.probe("after the watchdog restart", "v1", st.Generation)
	if s := h.ns.show("baton.service", "ActiveState"); s != "active" {
		t.Errorf("ActiveState=%s after the watchdog restart", s)
	}
	closeSessions()
	if n := h.tr.failures(); n > 0 {
		t.Errorf("%d client failures:\n%s", n, h.tr.failureLog())
	}
	if j := h.ns.journal("baton.service", 100000); strings.Contains(j, "DATA RACE") {
		t.Errorf("the race detector reported in batond or a worker (journalctl -u baton)")
	}
}
