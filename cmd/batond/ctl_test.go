package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-gw/baton/cmd/internal/admin"
)

// slowWorkerConfig is a baton.toml whose demo workers take `delay` to start, so that a start
// or a reload lasts long enough to be watched.
func slowWorkerConfig(bin, delay string) string {
	return fmt.Sprintf("workers = 2\nready_timeout = \"20s\"\nstart_timeout = \"15s\"\n"+
		"command = [\"sh\", \"-c\", \"sleep %s; exec \\\"$0\\\" demo-worker\", %q]\n", delay, bin)
}

// ctlStart runs batonctl in the background; wait returns its exit code and output.
func (g *gateway) ctlStart(args ...string) (wait func() (int, string)) {
	g.t.Helper()
	cmd := exec.Command(bins.batonct, append([]string{"-admin", filepath.Join(g.dir, "admin.sock")}, args...)...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		g.t.Fatal(err)
	}
	return func() (int, string) {
		err := cmd.Wait()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), out.String()
		}
		if err != nil {
			g.t.Fatal(err)
		}
		return 0, out.String()
	}
}

// A reload's outcome is told truthfully: by the old batond while it runs (and a second reload
// is refused at once), by the new one after it succeeded, as "still in progress" (exit 3) when
// batonctl stops waiting first, and as a failure with its reason when it fails.
func TestCtlReloadOutcome(t *testing.T) {
	dir := t.TempDir()
	bin := ownBinary(t, dir)
	conf := filepath.Join(dir, "baton.toml")
	good := slowWorkerConfig(bin, "2")
	os.WriteFile(conf, []byte(good), 0o644)
	g := startGateway(t, opts{binary: bin, workers: 2, args: []string{"-config", conf}})
	pid0 := g.status().PID
	if code, out := g.ctl("reload", "-status"); code != 0 || !strings.Contains(out, "no reload") {
		t.Errorf("reload -status before any reload: exit %d: %s", code, out)
	}

	first := g.ctlStart("reload")
	var st admin.Status
	waitFor(t, "status to say reloading, with the new batond's pid", 10*time.Second, func() (bool, string) {
		st = g.status()
		return st.Phase == admin.PhaseReloading && strings.Contains(st.PhaseDetail, "starting generation 2"), st.PhaseDetail
	})
	// The new batond must not answer on the shared admin socket before it serves.
	for i := 0; i < 10; i++ {
		if s := g.status(); s.PID != pid0 {
			t.Fatalf("the admin socket was answered by pid %d (%s) before the new batond served", s.PID, s.PhaseDetail)
		}
	}
	if code, out := g.ctl("status"); code != 0 || !strings.HasPrefix(out, "reloading: batond pid ") {
		t.Errorf("batonctl status while reloading: exit %d:\n%s", code, out)
	}
	start := time.Now()
	code, out := g.ctl("reload")
	if code != 1 || !strings.Contains(out, "already running since") || !strings.Contains(out, "starting generation 2") {
		t.Errorf("a second reload while one runs: exit %d, want 1 with the reason:\n%s", code, out)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("the second reload was refused after %v, not at once", d)
	}
	code, out = first()
	if code != 0 || !strings.Contains(out, fmt.Sprintf("generation 1 (pid %d) → generation 2", pid0)) {
		t.Fatalf("reload: exit %d:\n%s", code, out)
	}
	// Asked afterwards, the new batond reports the reload that made it.
	code, out = g.ctl("reload", "-status")
	if code != 0 || !strings.Contains(out, fmt.Sprintf("generation 1 (pid %d) → generation 2", pid0)) {
		t.Errorf("reload -status after a success (the new batond answers): exit %d:\n%s", code, out)
	}
	if strings.Contains(g.log.String(), "reload failed") {
		t.Errorf("the refused reload was logged as a failure:\n%s", g.log.String())
	}

	// batonctl stops waiting before the outcome: exit 3, and the reload goes on.
	code, out = g.ctl("reload", "-timeout", "700ms")
	if code != 3 || !strings.Contains(out, "may still be in progress") || !strings.Contains(out, "reload -status") {
		t.Errorf("reload -timeout 700ms: exit %d, want 3:\n%s", code, out)
	}
	var rs string
	waitFor(t, "reload -status to report the success", 20*time.Second, func() (bool, string) {
		code, rs = g.ctl("reload", "-status")
		return code == 0 && strings.Contains(rs, "→ generation 3"), fmt.Sprintf("exit %d: %s", code, rs)
	})

	// A failed reload: exit 1 with the reason, recorded in the batond that keeps serving.
	os.WriteFile(conf, []byte(good+"\nworkers = = 3\n"), 0o644)
	code, out = g.ctl("reload")
	if code != 1 || !strings.Contains(out, conf+":") || !strings.Contains(out, "keeps serving") {
		t.Errorf("failed reload: exit %d:\n%s", code, out)
	}
	code, out = g.ctl("reload", "-status")
	if code != 1 || !strings.Contains(out, "reload failed") || !strings.Contains(out, conf+":") {
		t.Errorf("reload -status after a failure: exit %d:\n%s", code, out)
	}
	if st := g.status(); st.Generation != 3 || st.Phase != admin.PhaseServing {
		t.Errorf("after the failed reload: generation %d, phase %s", st.Generation, st.Phase)
	}
}

// Connection errors say what is wrong: no socket, a stale one, not a socket, no permission
// (and who may connect), no answer in time.
func TestCtlConnectionErrors(t *testing.T) {
	build(t)
	dir := t.TempDir()
	run := func(args ...string) (int, string) {
		t.Helper()
		out, err := exec.Command(bins.batonct, args...).CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), string(out)
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0, string(out)
	}
	missing := filepath.Join(dir, "none.sock")
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	regular := filepath.Join(dir, "file")
	os.WriteFile(regular, []byte("x"), 0o600)
	mute := filepath.Join(dir, "mute.sock")
	ml, err := net.Listen("unix", mute) // accepts (in the backlog), never answers
	if err != nil {
		t.Fatal(err)
	}
	defer ml.Close()
	for _, c := range []struct {
		path, want string
		args       []string
	}{
		{missing, "no socket at " + missing, nil},
		{stale, "stale socket at " + stale, nil},
		{regular, "it is a regular file", nil},
		{mute, "no answer within 1s", []string{"-timeout", "1s"}},
	} {
		args := append(append([]string{"-admin", c.path}, c.args...), "status")
		start := time.Now()
		code, out := run(args...)
		if code != 1 || !strings.Contains(out, c.want) || strings.Count(strings.TrimSpace(out), "\n") != 0 {
			t.Errorf("batonctl %v: exit %d, want 1 and one line with %q:\n%s", args, code, c.want, out)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("batonctl %v took %v", args, d)
		}
	}
	code, out := run("-admin", stale, "reload")
	if code != 1 || !strings.Contains(out, "batond is not running") {
		t.Errorf("reload with nothing running: exit %d:\n%s", code, out)
	}

	// Permission: a live batond, its socket 0600, batonctl as uid 65534.
	g := startGateway(t, opts{workers: 1})
	for p := g.dir; p != os.TempDir() && p != "/"; p = filepath.Dir(p) {
		os.Chmod(p, 0o755) // let uid 65534 reach the socket, not connect to it
	}
	ctl := filepath.Join(filepath.Dir(exposedCopy(t)), "batonctl") // bins.dir is 0700
	if b, err := os.ReadFile(bins.batonct); err != nil || os.WriteFile(ctl, b, 0o755) != nil {
		t.Fatal("copying batonctl", err)
	}
	cmd := exec.Command(ctl, "-admin", filepath.Join(g.dir, "admin.sock"), "status")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	b, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(b), "permission denied") ||
		!strings.Contains(string(b), "owned by uid 0") || !strings.Contains(string(b), "mode 0600") || !strings.Contains(string(b), "-admin-mode 0660") {
		t.Errorf("status as uid 65534: %v:\n%s", err, b)
	}
}

// -h of every command in one format (to stdout, exit 0); a usage error is one line and the
// hint (exit 2); -version of both programs from the build information.
func TestCtlUsageAndVersion(t *testing.T) {
	build(t)
	for _, args := range [][]string{{"-h"}, {"status", "-h"}, {"reload", "-h"}} {
		cmd := exec.Command(bins.batonct, args...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil || !strings.HasPrefix(string(out), "usage: batonctl ") || !strings.Contains(string(out), "\nflags:\n") || stderr.Len() != 0 {
			t.Errorf("batonctl %v: %v\n%s%s", args, err, out, stderr.String())
		}
	}
	for _, c := range []struct {
		args []string
		hint string
	}{
		{nil, "run 'batonctl -h' for usage"},
		{[]string{"frobnicate"}, "run 'batonctl -h' for usage"},
		{[]string{"-nope"}, "run 'batonctl -h' for usage"},
		{[]string{"status", "extra"}, "run 'batonctl status -h' for usage"},
		{[]string{"reload", "-timeout", "soon"}, "run 'batonctl reload -h' for usage"},
	} {
		out, err := exec.Command(bins.batonct, c.args...).CombinedOutput()
		var ee *exec.ExitError
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		if !errors.As(err, &ee) || ee.ExitCode() != 2 || len(lines) != 2 || lines[1] != c.hint {
			t.Errorf("batonctl %v: %v, want exit 2, one line and the hint %q:\n%s", c.args, err, c.hint, out)
		}
	}
	for _, bin := range []string{bins.batonct, bins.batond} {
		out, err := exec.Command(bin, "-version").CombinedOutput()
		name := filepath.Base(bin)
		if err != nil || !strings.HasPrefix(string(out), name+" ") || !strings.Contains(string(out), "go1.") {
			t.Errorf("%s -version: %v: %s", name, err, out)
		}
	}
}
