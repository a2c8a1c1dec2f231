package systemd_test

import (
	"bufio"
	"context"
	"encoding/json"
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
)

// TestUnitsVerify runs `systemd-analyze verify` on the units, pointed at freshly built
// binaries (verify checks that ExecStart=/ExecReload= programs exist). Any output is a failure:
// systemd-analyze reports unknown or misplaced settings as warnings.
func TestUnitsVerify(t *testing.T) {
	requireTools(t, "go", "systemd-analyze")
	build(t)
	dir := t.TempDir()
	paths := installUnits(t, dir, binRewrites()...)
	out, err := exec.Command("systemd-analyze", append([]string{"verify"}, paths...)...).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", strings.Join(paths, " "), err, out)
	}

	// The check itself must be able to fail: the same units with a misspelt setting.
	bad := filepath.Join(t.TempDir(), "baton.service")
	b, err := os.ReadFile(filepath.Join(dir, "baton.service"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bad, []byte(strings.Replace(string(b), "KillMode=process", "KillMod=process", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{"baton.socket", "baton-workers.socket"} {
		if err := os.Link(filepath.Join(dir, u), filepath.Join(filepath.Dir(bad), u)); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("systemd-analyze", "verify", bad).CombinedOutput(); err == nil && !strings.Contains(string(out), "KillMod") {
		t.Fatalf("systemd-analyze verify did not notice a misspelt setting:\n%s", out)
	}
}

// TestExampleConfig starts batond with the example baton.toml (paths and the worker command
// overridden by flags, which win over the file) to show the file is read without complaint.
func TestExampleConfig(t *testing.T) {
	requireTools(t, "go")
	build(t)
	dir := t.TempDir()
	var log syncBuffer
	cmd := exec.Command(bins.batond, "-config", "baton.toml", "-listen", "127.0.0.1:0", "-workers", "1",
		"-socket", filepath.Join(dir, "workers.sock"), "-admin", filepath.Join(dir, "admin.sock"),
		"-state", dir, "-pidfile", filepath.Join(dir, "batond.pid"), "--", bins.batond, "demo-worker")
	cmd.Stdout, cmd.Stderr = &log, &log
	cmd.Env = os.Environ()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			t.Errorf("batond did not stop within 30s of SIGTERM")
		}
		killLeftovers(t, dir)
	})
	ok, _ := waitFor(30*time.Second, func() (bool, string) {
		select {
		case err := <-done:
			done <- err
			return true, ""
		default:
		}
		_, err := os.Stat(filepath.Join(dir, "batond.pid"))
		return err == nil, ""
	})
	select {
	case err := <-done:
		t.Fatalf("batond -config baton.toml exited (%v):\n%s", err, log.String())
	default:
	}
	if !ok {
		t.Fatalf("batond -config baton.toml not serving after 30s:\n%s", log.String())
	}
	out, err := exec.Command(bins.batonctl, "-admin", filepath.Join(dir, "admin.sock"), "status", "-json").Output()
	if err != nil {
		t.Fatalf("batonctl status -json: %v\n%s", err, log.String())
	}
	var st status
	if err := json.Unmarshal(out, &st); err != nil || len(st.Listeners) != 1 {
		t.Fatalf("batonctl status -json: %v: %s", err, out)
	}
	if _, err := oneClient(st.Listeners[0], "hello"); err != nil {
		t.Fatalf("a client of batond -config baton.toml: %v\n%s", err, log.String())
	}
}

// TestReloadUnderSystemd proves issue 4 under a real systemd: with new clients arriving
// continuously and 200 long sessions exchanging a line every 50ms, 20 `systemctl reload baton`
// (alternating releases v1 and v2 through a `releases/current` link, as README.md here
// deploys), one reload to a broken release, one with a bad configuration file and three
// `kill -9` of batond break no session and fail no client; reloads report their real outcome;
// old workers leave once their sessions end; systemd shows batond's STATUS= line; stop drains.
func TestReloadUnderSystemd(t *testing.T) {
	requireRoot(t)
	requireTools(t, "go")
	build(t)
	dir := t.TempDir()
	t.Cleanup(func() { killLeftovers(t, bins.dir, dir) }) // runs after the namespace's teardown

	// Releases: v1 and v2 are the demo game under two labels, broken exits at once.
	for v, body := range map[string]string{
		"v1":     "exec " + bins.batond + " demo-worker v1",
		"v2":     "exec " + bins.batond + " demo-worker v2",
		"broken": "echo 'broken release: exiting' >&2\nexit 1",
	} {
		if err := os.MkdirAll(filepath.Join(dir, "releases", v), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "releases", v, "worker"), []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	addr := freeAddr(t)
	h := &harness{t: t, dir: dir, addr: addr}
	h.flip("v1")

	cfg := filepath.Join(dir, "baton.toml")
	h.cfg = cfg
	const workers = 2
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`# written by TestReloadUnderSystemd
listen = [%q]
workers = %d
socket = "/run/baton/workers.sock"
admin = "/run/baton/admin.sock"
state = "/run/baton"
command = [%q]
ready_timeout = "15s"
start_timeout = "10s"
handoff_timeout = "2s"
drain_timeout = "10m"
stop_timeout = "5s"
log_level = "info"
`, addr, workers, filepath.Join(dir, "releases", "current", "worker"))), 0o644); err != nil {
		t.Fatal(err)
	}
	units := filepath.Join(dir, "units")
	if err := os.Mkdir(units, 0o755); err != nil {
		t.Fatal(err)
	}
	installUnits(t, units, append(binRewrites(),
		[2]string{"/etc/baton/baton.toml", cfg},
		[2]string{"ListenStream=127.0.0.1:7000", "ListenStream=" + addr})...)

	h.ns = bootSystemd(t, units)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("journalctl -u baton (last 400 lines):\n%s", h.ns.journal("baton.service", 400))
		}
	})
	start := time.Now()
	if out, err := h.ns.systemctl("start", "baton.socket", "baton-workers.socket", "baton.service"); err != nil {
		t.Fatalf("systemctl start: %v\n%s\n%s", err, out, h.ns.journal("baton.service", 100))
	}
	t.Logf("systemctl start baton: %v", time.Since(start).Round(time.Millisecond))
	if s := h.ns.show("baton.service", "ActiveState"); s != "active" {
		t.Fatalf("after systemctl start, ActiveState=%s", s)
	}
	st := h.status()
	ready := 0
	for _, w := range st.Workers {
		if w.Generation == st.Generation && w.State == "ready" {
			ready++
		}
	}
	if ready != workers {
		t.Fatalf("systemctl start returned with %d of %d workers ready (Type=notify: READY=1 must wait for them):\n%v", ready, workers, st)
	}
	if mp := h.mainPID(); mp != st.PID {
		t.Fatalf("MainPID=%d but batond says pid %d", mp, st.PID)
	}
	h.gen, h.pid = st.Generation, st.PID
	h.probe("start", "v1", st.Generation)

	// Traffic: short clients at 250/s, and long sessions in waves of 50 (now, and after each
	// of the first three reloads, so that sessions of four generations stay open).
	tr := newTraffic(addr)
	h.tr = tr
	ctx, stopTraffic := context.WithCancel(context.Background())
	defer stopTraffic()
	var trafficWG sync.WaitGroup
	var shortFor time.Duration
	trafficWG.Add(1)
	go func() { defer trafficWG.Done(); shortFor = tr.shortClients(ctx, 250) }()
	sessCtx, closeSessions := context.WithCancel(context.Background())
	defer closeSessions()
	waves := 0
	wave := func() {
		waves++
		for i := 0; i < 50; i++ {
			trafficWG.Add(1)
			go func() { defer trafficWG.Done(); tr.session(sessCtx) }()
		}
		ok, last := waitFor(20*time.Second, func() (bool, string) {
			return tr.sessionsUp.Load()+tr.sessionsBroken.Load() == int64(50*waves),
				fmt.Sprintf("%d up, %d broken", tr.sessionsUp.Load(), tr.sessionsBroken.Load())
		})
		if !ok {
			t.Errorf("a wave of 50 sessions did not connect within 20s: %s", last)
		}
	}
	wave()
	time.Sleep(time.Second)

	ops := strings.Fields(`reload reload reload reload reload kill
		reload reload reload reload reload broken badconfig
		reload reload reload reload reload kill
		reload reload reload reload reload kill`)
	for i, op := range ops {
		if time.Since(start) > 6*time.Minute {
			t.Errorf("out of time after %d of %d operations", i, len(ops))
			break
		}
		switch op {
		case "reload":
			next := map[string]string{"v1": "v2", "v2": "v1"}[h.version]
			if h.reload(next) && h.reloads <= 3 {
				wave()
			}
		case "broken":
			h.brokenReload()
		case "badconfig":
			h.badConfigReload()
		case "kill":
			h.kill()
		}
		if t.Failed() && tr.failures() > 100 {
			break // the log says enough
		}
		time.Sleep(200 * time.Millisecond)
	}

	h.checkHeld("at the end of the reloads")

	// Stop the short clients, close the sessions.
	stopTraffic()
	closeSessions()
	trafficWG.Wait()
	rate := float64(tr.connects.Load()) / shortFor.Seconds()
	lost := tr.lostToKills(h.killTimes)
	for i, n := range lost {
		if n > 10 {
			t.Errorf("kill -9 #%d dropped %d clients: more than batond can have had between accept and handoff", i+1, n)
		}
	}

	// Old workers leave once their sessions are gone: only the current generation remains.
	var final status
	ok, last := waitFor(60*time.Second, func() (bool, string) {
		final = h.status()
		for _, w := range final.Workers {
			if w.Generation != final.Generation {
				return false, final.String()
			}
		}
		return final.Draining == 0 && final.Gateway.InFlight == 0, final.String()
	})
	if !ok {
		t.Errorf("old-generation workers still there 60s after their last session closed:\n%s", last)
	}
	closed := uint64(0)
	for _, n := range final.Gateway.Closed {
		closed += n
	}
	if final.Gateway.Accepted != final.Gateway.Acked || closed > 0 {
		t.Errorf("the serving batond closed clients itself: accepted %d, acked %d, closed %v", final.Gateway.Accepted, final.Gateway.Acked, final.Gateway.Closed)
	}

	// systemd's view: active, restarted once per kill, and batond's STATUS= line.
	if s := h.ns.show("baton.service", "ActiveState"); s != "active" {
		t.Errorf("ActiveState=%s at the end, want active", s)
	}
	if n := h.ns.show("baton.service", "NRestarts"); n != strconv.Itoa(h.kills) {
		t.Errorf("NRestarts=%s, want %d (one per kill -9)", n, h.kills)
	}
	statusRe := regexp.MustCompile(`Status: "generation (\d+) · (\d+) workers · (\d+) clients · (\d+) draining"`)
	var statusOut string
	ok, _ = waitFor(10*time.Second, func() (bool, string) {
		statusOut, _ = h.ns.systemctl("status", "baton.service")
		m := statusRe.FindStringSubmatch(statusOut)
		return m != nil && m[1] == strconv.FormatUint(final.Generation, 10) && m[2] == strconv.Itoa(workers) && m[4] == "0", ""
	})
	if !ok {
		t.Errorf("systemctl status baton does not show %q for generation %d, %d workers, 0 draining (STATUS= is refreshed every ~2s):\n%s",
			statusRe, final.Generation, workers, statusOut)
	} else {
		for _, l := range readLines(statusOut) {
			if strings.Contains(l, "Status:") {
				t.Logf("systemctl status baton: %s", strings.TrimSpace(l))
			}
		}
	}

	// Graceful stop, with 10 sessions open: they are served on through the drain and ended
	// when batond ends their workers (stop_timeout, 5s here); batond exits well within
	// TimeoutStopSec; nothing of the service is left.
	var stopping atomic.Bool
	var duringStop atomic.Int64
	type sessionEnd struct {
		err error
		at  time.Time
	}
	ends := make(chan sessionEnd, 10)
	for i := 0; i < 10; i++ {
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatalf("session before stop: %v", err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		r := bufio.NewReader(c)
		if _, err := r.ReadString('\n'); err != nil {
			t.Fatalf("session before stop: greeting: %v", err)
		}
		go func() {
			for n := 0; n < 2000; n++ {
				time.Sleep(50 * time.Millisecond)
				line := fmt.Sprintf("stop session %d message %d\n", i, n)
				c.SetDeadline(time.Now().Add(10 * time.Second))
				_, err := c.Write([]byte(line))
				var back string
				if err == nil {
					back, err = r.ReadString('\n')
				}
				if err == nil && back != line {
					err = fmt.Errorf("echo %q, got %q", line, back)
				}
				if err != nil {
					ends <- sessionEnd{err, time.Now()}
					return
				}
				if stopping.Load() {
					duringStop.Add(1)
				}
			}
			ends <- sessionEnd{errors.New("still served after 100s"), time.Now()}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	stopStart := time.Now()
	stopping.Store(true)
	out, err := h.ns.systemctl("stop", "baton.service")
	stopTook := time.Since(stopStart)
	if err != nil {
		t.Errorf("systemctl stop baton: %v\n%s", err, out)
	}
	if stopTook > 45*time.Second {
		t.Errorf("systemctl stop took %v, more than TimeoutStopSec", stopTook)
	}
	for i := 0; i < 10; i++ {
		select {
		case e := <-ends:
			if e.at.Before(stopStart) {
				t.Errorf("a session ended before systemctl stop: %v", e.err)
			}
		case <-time.After(15 * time.Second):
			t.Errorf("a session is still served 15s after systemctl stop returned")
		}
	}
	if duringStop.Load() == 0 {
		t.Errorf("no session message went through while batond drained on stop")
	}
	if s, r := h.ns.show("baton.service", "ActiveState"), h.ns.show("baton.service", "Result"); s != "inactive" || r != "success" {
		t.Errorf("after systemctl stop: ActiveState=%s Result=%s, want inactive/success", s, r)
	}
	if ok, left := waitFor(5*time.Second, func() (bool, string) {
		left := h.ns.procsRunning(bins.dir)
		return len(left) == 0, strings.Join(left, "\n")
	}); !ok {
		t.Errorf("processes of baton.service left after systemctl stop:\n%s", left)
	}
	// The sockets stayed: the next client starts baton.service again (socket activation).
	if g, err := oneClient(addr, "after stop"); err != nil {
		t.Errorf("a client after systemctl stop baton.service (baton.socket still listening): %v", err)
	} else if s := h.ns.show("baton.service", "ActiveState"); s != "active" || g.label != h.version {
		t.Errorf("a client after stop was served by %q and left baton.service %s; want %q, active", g.label, s, h.version)
	}
	if j := h.ns.journal("baton.service", 100000); strings.Contains(j, "DATA RACE") {
		t.Errorf("the race detector reported in batond or a worker (journalctl -u baton)")
	}

	t.Logf("totals: %d connections (%.0f/s over %v, %d ticks skipped while 1000 were pending), "+
		"%d long sessions (by generation %v), %d session messages, clients by release %v, "+
		"%d reloads ok, %d reloads failed (%d expected), %d kills (clients dropped by each: %v), %d failures; "+
		"systemctl stop with 10 sessions open took %v (%d session messages meanwhile)",
		tr.connects.Load(), rate, shortFor.Round(time.Second), tr.skipped.Load(),
		tr.sessionsUp.Load(), tr.sessionGens(), tr.sessionMsgs.Load(), tr.labels(),
		h.reloads, h.failedReloads, 2, h.kills, lost, tr.failures(), stopTook.Round(time.Millisecond), duringStop.Load())
	if n := tr.failures(); n > 0 {
		t.Errorf("%d client failures (connects, greetings, exchanges, sessions); first ones:\n%s", n, tr.failureLog())
		at := tr.firstFailure()
		j, _ := h.ns.run(30*time.Second, "journalctl", "--no-pager", "-o", "short-precise",
			"--since", at.Add(-3*time.Second).Format("2006-01-02 15:04:05"), "--until", at.Add(2*time.Second).Format("2006-01-02 15:04:05"))
		t.Logf("journal around the first failure (%s):\n%s", clock(at), j)
	}
	if tr.sessionsUp.Load() != 200 {
		t.Errorf("%d long sessions established, want 200", tr.sessionsUp.Load())
	}
	if h.reloads != 20 || h.failedReloads != 2 || h.kills != 3 {
		t.Errorf("ran %d successful reloads (want 20), %d failed (want 2), %d kills (want 3)", h.reloads, h.failedReloads, h.kills)
	}
	if rate < 200 {
		t.Errorf("new clients arrived at %.0f/s, want at least 200/s", rate)
	}
}

// harness drives the unit.
type harness struct {
	t       *testing.T
	ns      *sysd
	dir     string
	cfg     string // batond's configuration file
	addr    string // baton.socket's public address
	tr      *traffic
	version string // release `current` points at, and that serves
	gen     uint64 // serving batond's generation
	pid     int    // serving batond's pid (in the namespace)

	reloads, failedReloads, kills int
	killTimes                     [][2]time.Time // just before and after each kill -9
}

// flip points releases/current at release v as an operator would: a relative link, replaced
// atomically (ln -s v current.new && mv -T current.new current).
func (h *harness) flip(v string) {
	h.t.Helper()
	tmp := filepath.Join(h.dir, "releases", "current.new")
	os.Remove(tmp)
	if err := os.Symlink(v, tmp); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(h.dir, "releases", "current")); err != nil {
		h.t.Fatal(err)
	}
	if v != "broken" {
		h.version = v
	}
}

func (h *harness) status() status {
	h.t.Helper()
	st, err := h.ns.batonStatus()
	if err != nil {
		h.t.Fatal(err)
	}
	return st
}

func (h *harness) mainPID() int {
	n, _ := strconv.Atoi(h.ns.show("baton.service", "MainPID"))
	return n
}

// newBatond waits until the admin socket is answered by a batond other than old, and systemd's
// MainPID names it.
func (h *harness) newBatond(what string, old int) (status, bool) {
	h.t.Helper()
	var st status
	ok, last := waitFor(15*time.Second, func() (bool, string) {
		var err error
		if st, err = h.ns.batonStatus(); err != nil {
			return false, err.Error()
		}
		if st.PID == old {
			return false, fmt.Sprintf("batond pid %d (the old one)", st.PID)
		}
		mp := h.mainPID()
		return mp == st.PID, fmt.Sprintf("batond pid %d (old %d), MainPID %d", st.PID, old, mp)
	})
	if !ok {
		h.t.Errorf("%s: no new batond as MainPID within 15s: %s", what, last)
	}
	return st, ok
}

// reload deploys release v with systemctl reload and checks the outcome.
func (h *harness) reload(v string) bool {
	t := h.t
	t.Helper()
	what := fmt.Sprintf("reload #%d to %s", h.reloads+1, v)
	oldPID, oldGen := h.pid, h.gen
	h.flip(v)
	start := time.Now()
	out, err := h.ns.systemctl("reload", "baton.service")
	took := time.Since(start)
	if err != nil {
		h.failedReloads++
		t.Errorf("%s: systemctl reload exit %d after %v: %v\n%s", what, exitCode(err), took, err, out)
		return false
	}
	h.reloads++
	st, ok := h.newBatond(what, oldPID)
	if !ok {
		return false
	}
	if st.Generation <= oldGen {
		t.Errorf("%s: generation %d after %d", what, st.Generation, oldGen)
	}
	h.gen, h.pid = st.Generation, st.PID
	// The old batond hands over and exits within seconds (its workers drain on).
	if ok, _ := waitFor(10*time.Second, func() (bool, string) { return !h.ns.alive(oldPID), "" }); !ok {
		t.Errorf("%s: the old batond (pid %d) still runs 10s after the reload", what, oldPID)
	}
	t1 := time.Now()
	h.probe(what, v, st.Generation)
	t2 := time.Now()
	if h.reloads <= 5 { // while the waves of sessions open; the later reloads are alike
		h.checkHeld(what)
	}
	t.Logf("%s %s: ok in %v; batond pid %d → %d, generation %d (checks: new batond %v, old exited, probes %v, held %v)", clock(start), what, took.Round(time.Millisecond), oldPID, st.PID, st.Generation,
		t1.Sub(start.Add(took)).Round(time.Millisecond), t2.Sub(t1).Round(time.Millisecond), time.Since(t2).Round(time.Millisecond))
	return true
}

// brokenReload deploys a release whose workers exit at once: systemctl reload must fail, and
// the serving batond go on as if nothing happened. Then `current` goes back.
func (h *harness) brokenReload() {
	prev := h.version
	h.flip("broken")
	h.failingReload("reload to a broken release", prev, nil)
	h.flip(prev)
}

// badConfigReload reloads with a configuration file that has a wrong value on line 3: the
// reload must fail, with the file and line in the reason.
func (h *harness) badConfigReload() {
	good, err := os.ReadFile(h.cfg)
	if err != nil {
		h.t.Fatal(err)
	}
	lines := strings.SplitN(string(good), "\n", 4)
	if len(lines) < 4 || !strings.HasPrefix(lines[2], "workers = ") {
		h.t.Fatalf("the test's config changed: line 3 is %q", lines[2])
	}
	bad := strings.Join([]string{lines[0], lines[1], `workers = "two"`, lines[3]}, "\n")
	if err := os.WriteFile(h.cfg, []byte(bad), 0o644); err != nil {
		h.t.Fatal(err)
	}
	h.failingReload("reload with a bad config", h.version, regexp.MustCompile(regexp.QuoteMeta(h.cfg)+`:3:`))
	if err := os.WriteFile(h.cfg, good, 0o644); err != nil {
		h.t.Fatal(err)
	}
}

// failingReload runs systemctl reload, which must fail and leave the serving batond (release
// v) as it was; batonctl's reason, in the journal, must match reason if given.
func (h *harness) failingReload(what, v string, reason *regexp.Regexp) {
	t := h.t
	t.Helper()
	start := time.Now()
	out, err := h.ns.systemctl("reload", "baton.service")
	took := time.Since(start)
	if err == nil {
		h.reloads++
		t.Errorf("%s: systemctl reload exited 0 after %v, want non-zero", what, took)
		return
	}
	h.failedReloads++
	t.Logf("%s %s: exit %d after %v (as it must): %s", clock(start), what, exitCode(err), took.Round(time.Millisecond), strings.TrimSpace(out))
	// The reason is in the journal, from batonctl (ExecReload=): that is where an operator
	// reads why a reload failed.
	j, _ := h.ns.run(30*time.Second, "journalctl", "--no-pager", "-o", "cat", "-u", "baton.service",
		"--since", "@"+strconv.FormatInt(start.Unix()-1, 10), "SYSLOG_IDENTIFIER=batonctl")
	j = strings.TrimSpace(j)
	switch {
	case j == "":
		t.Errorf("%s: the journal has no word from batonctl (ExecReload=) saying why", what)
	case reason != nil && !reason.MatchString(j):
		t.Errorf("%s: batonctl's reason in the journal does not match %q:\n%s", what, reason, j)
	default:
		t.Logf("%s: journalctl -u baton SYSLOG_IDENTIFIER=batonctl: %s", what, j)
	}
	if s := h.ns.show("baton.service", "ActiveState"); s != "active" {
		t.Errorf("%s: ActiveState=%s, want active", what, s)
	}
	st := h.status()
	if st.PID != h.pid || st.Generation != h.gen || h.mainPID() != h.pid {
		t.Errorf("%s: batond pid %d generation %d, MainPID %d; want the old one, pid %d generation %d",
			what, st.PID, st.Generation, h.mainPID(), h.pid, h.gen)
	}
	for _, w := range st.Workers {
		if w.Generation > h.gen {
			t.Errorf("%s: a worker of the failed generation %d is listed: %+v", what, w.Generation, w)
		}
	}
	h.probe(what, v, h.gen)
}

// kill SIGKILLs batond's main process and waits for systemd to bring it back.
func (h *harness) kill() {
	t := h.t
	t.Helper()
	h.kills++
	what := fmt.Sprintf("kill -9 #%d", h.kills)
	mp := h.mainPID()
	if mp != h.pid {
		t.Errorf("%s: MainPID=%d, batond pid %d", what, mp, h.pid)
	}
	start := time.Now()
	out, err := h.ns.run(10*time.Second, "kill", "-9", strconv.Itoa(mp))
	h.killTimes = append(h.killTimes, [2]time.Time{start, time.Now()})
	if err != nil {
		t.Errorf("%s: kill -9 %d: %v: %s", what, mp, err, out)
		return
	}
	st, ok := h.newBatond(what, mp)
	if !ok {
		return
	}
	if s := h.ns.show("baton.service", "ActiveState"); s != "active" {
		t.Errorf("%s: ActiveState=%s once batond is back", what, s)
	}
	t.Logf("%s %s: batond pid %d → %d (generation %d) in %v", clock(start), what, mp, st.PID, st.Generation, time.Since(start).Round(time.Millisecond))
	h.gen, h.pid = st.Generation, st.PID
	h.probe(what, h.version, st.Generation)
	h.checkHeld(what)
}

// checkHeld: the workers holding the long sessions are listed by the serving batond, under
// their generation, as draining, with at least their sessions as clients (they re-registered
// with their counts after the reload or the crash).
func (h *harness) checkHeld(what string) {
	h.t.Helper()
	want := h.tr.sessionGens()
	ok, last := waitFor(10*time.Second, func() (bool, string) {
		st, err := h.ns.batonStatus()
		if err != nil {
			return false, err.Error()
		}
		have := map[uint64]int{}
		for _, w := range st.Workers {
			if w.Generation == st.Generation {
				continue
			}
			if w.State != "draining" {
				return false, st.String()
			}
			have[w.Generation] += w.Clients
		}
		for g, n := range want {
			if g != st.Generation && have[g] < n {
				return false, fmt.Sprintf("generation %d: %d clients listed, %d sessions open\n%v", g, have[g], n, st)
			}
		}
		return true, ""
	})
	if !ok {
		h.t.Errorf("%s: the old generations' sessions are not all listed as draining within 10s: %s", what, last)
	}
}

// probe connects a few new clients: they must be greeted by release v, generation gen.
func (h *harness) probe(what, v string, gen uint64) {
	h.t.Helper()
	for i := 0; i < 5; i++ {
		g, err := oneClient(h.addr, fmt.Sprintf("probe %d", i))
		if err != nil {
			h.t.Errorf("%s: probe client: %v", what, err)
			continue
		}
		if g.label != v || g.gen != gen {
			h.t.Errorf("%s: a new client was greeted by release %q generation %d, want %q generation %d", what, g.label, g.gen, v, gen)
		}
	}
}

// freeAddr picks a free port on 127.0.0.1 for baton.socket.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// clock formats a time as the journal does (short-precise), to read the two side by side.
func clock(t time.Time) string { return t.Format("15:04:05.000000") }

// ---- traffic -----------------------------------------------------------------------------

type traffic struct {
	addr string

	connects       atomic.Int64 // short clients served (greeting + one exchange)
	skipped        atomic.Int64 // ticks with too many short clients pending
	sessionsUp     atomic.Int64
	sessionsBroken atomic.Int64
	sessionMsgs    atomic.Int64
	nfail          atomic.Int64

	mu        sync.Mutex
	start     time.Time
	log       []string
	firstFail time.Time
	drops     []drop
	byLabel   map[string]int
	byGen     map[uint64]int
}

func newTraffic(addr string) *traffic {
	return &traffic{addr: addr, start: time.Now(), byLabel: map[string]int{}, byGen: map[uint64]int{}}
}

func (tr *traffic) fail(format string, args ...any) {
	tr.nfail.Add(1)
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if tr.firstFail.IsZero() {
		tr.firstFail = time.Now()
	}
	if len(tr.log) < 30 {
		tr.log = append(tr.log, clock(time.Now())+" "+fmt.Sprintf(format, args...))
	}
}

func (tr *traffic) failures() int64 { return tr.nfail.Load() }

// drop records a short client closed before its greeting, to be judged at the end against
// the kills (see lostToKills).
func (tr *traffic) drop(began time.Time, msg string) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.drops = append(tr.drops, drop{began, time.Now(), msg})
}

type drop struct {
	began, ended time.Time
	msg          string
}

// lostToKills sorts the dropped clients: those that connected before a kill -9 of batond and
// were dropped just after it are the ones the killed process had accepted and not yet handed
// over (a SIGKILL between accept and sendmsg: no process can save those). Every other drop
// is a failure. It returns how many each kill took.
func (tr *traffic) lostToKills(kills [][2]time.Time) []int {
	tr.mu.Lock()
	drops := tr.drops
	tr.mu.Unlock()
	lost := make([]int, len(kills))
next:
	for _, d := range drops {
		for i, k := range kills {
			if !d.began.After(k[1]) && !d.ended.Before(k[0]) && d.ended.Sub(k[1]) < 3*time.Second {
				lost[i]++
				continue next
			}
		}
		tr.fail("%s (not near a kill -9; began %s)", d.msg, clock(d.began))
	}
	return lost
}

func (tr *traffic) firstFailure() time.Time {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.firstFail
}

func (tr *traffic) failureLog() string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return strings.Join(tr.log, "\n")
}

func (tr *traffic) labels() map[string]int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	out := map[string]int{}
	for k, v := range tr.byLabel {
		out[k] = v
	}
	return out
}

func (tr *traffic) sessionGens() map[uint64]int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	out := map[uint64]int{}
	for k, v := range tr.byGen {
		out[k] = v
	}
	return out
}

// shortClients starts rate new clients a second until ctx ends (catching up when the
// scheduler falls behind), with at most 1000 pending at a time. It returns how long it ran.
func (tr *traffic) shortClients(ctx context.Context, rate int) time.Duration {
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	sem := make(chan struct{}, 1000)
	var wg sync.WaitGroup
	defer wg.Wait()
	start := time.Now()
	for n := 0; ; {
		select {
		case <-ctx.Done():
			return time.Since(start)
		case <-tick.C:
		}
		for due := int(time.Since(start).Seconds() * float64(rate)); n < due; n++ {
			select {
			case sem <- struct{}{}:
			default:
				tr.skipped.Add(1)
				continue
			}
			wg.Add(1)
			go func(n int) {
				defer wg.Done()
				defer func() { <-sem }()
				began := time.Now()
				g, err := oneClient(tr.addr, "hello "+strconv.Itoa(n))
				if errors.Is(err, errDropped) {
					tr.drop(began, fmt.Sprintf("client %d: %v", n, err))
					return
				}
				if err != nil {
					tr.fail("client %d: %v", n, err)
					return
				}
				tr.connects.Add(1)
				tr.mu.Lock()
				tr.byLabel[g.label]++
				tr.mu.Unlock()
			}(n)
		}
	}
}

// errDropped: the connection was closed before a worker said a word.
var errDropped = errors.New("closed before the greeting")

// oneClient connects, reads the greeting, exchanges one line and leaves (RST: no TIME_WAIT
// left behind by tens of thousands of clients).
func oneClient(addr, line string) (greeting, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return greeting{}, fmt.Errorf("connect: %w", err)
	}
	defer func() {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(c)
	hello, err := r.ReadString('\n')
	if err != nil {
		if hello == "" && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
			err = fmt.Errorf("%w: %w", errDropped, err)
		}
		return greeting{}, fmt.Errorf("greeting: %w (got %q)", err, hello)
	}
	g, err := parseGreeting(hello)
	if err != nil {
		return g, err
	}
	if _, err := c.Write([]byte(line + "\n")); err != nil {
		return g, fmt.Errorf("%s: write: %w", hello, err)
	}
	back, err := r.ReadString('\n')
	if err != nil || back != line+"\n" {
		return g, fmt.Errorf("%s: echo of %q: %q, %v", strings.TrimSpace(hello), line, back, err)
	}
	return g, nil
}

var sessionIDs atomic.Int64

// session is one long-lived client exchanging a line every 50ms until ctx ends.
func (tr *traffic) session(ctx context.Context) {
	id := sessionIDs.Add(1)
	c, err := net.DialTimeout("tcp", tr.addr, 10*time.Second)
	if err != nil {
		tr.sessionsBroken.Add(1)
		tr.fail("session %d: connect: %v", id, err)
		return
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	r := bufio.NewReader(c)
	hello, err := r.ReadString('\n')
	var g greeting
	if err == nil {
		g, err = parseGreeting(hello)
	}
	if err != nil {
		tr.sessionsBroken.Add(1)
		tr.fail("session %d: greeting: %v (%q)", id, err, hello)
		return
	}
	tr.sessionsUp.Add(1)
	tr.mu.Lock()
	tr.byGen[g.gen]++
	tr.mu.Unlock()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for n := 0; ; n++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		line := fmt.Sprintf("session %d message %d\n", id, n)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte(line)); err != nil {
			tr.sessionsBroken.Add(1)
			tr.fail("session %d (generation %d, worker pid %d): message %d: write: %v", id, g.gen, g.pid, n, err)
			return
		}
		back, err := r.ReadString('\n')
		if err != nil || back != line {
			tr.sessionsBroken.Add(1)
			tr.fail("session %d (generation %d, worker pid %d): message %d: echo %q, %v", id, g.gen, g.pid, n, back, err)
			return
		}
		tr.sessionMsgs.Add(1)
	}
}
