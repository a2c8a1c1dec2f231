package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-gw/baton/supervisor"
)

// freePort returns a loopback address nobody listens on (for batond's -metrics and -agent).
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func httpGet(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metricValue finds one sample's value in Prometheus text.
func metricValue(t *testing.T, text, sample string) float64 {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(sample) + ` (\S+)$`).FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("no sample %s in:\n%s", sample, text)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func agentSays(t *testing.T, addr string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("agent-check: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, _ := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line)
}

// A scrape of a batond that served real clients reports their numbers, on -metrics and on the
// admin socket; /healthz and the agent-check follow the host's state.
func TestMetricsAgentAndHealth(t *testing.T) {
	metricsAddr, agentAddr := freePort(t), freePort(t)
	g := startGateway(t, opts{workers: 2, args: []string{"-metrics", metricsAddr, "-agent", agentAddr, "-capacity", "100"}})
	waitAllReady(t, g, 2)
	held := holdSessions(t, g.addr, 20)
	for i := 0; i < 10; i++ { // and ten that come and go
		c, err := dial(g.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.c.Close()
	}
	hc := &http.Client{Timeout: 5 * time.Second}
	var text string
	waitFor(t, "the scrape to count 30 handoffs and 20 clients", 10*time.Second, func() (bool, string) {
		_, text = httpGet(t, hc, "http://"+metricsAddr+"/metrics")
		return strings.Contains(text, "baton_connections_handed_off_total 30\n") &&
			strings.Contains(text, "baton_generation_clients{generation=\"1\"} 20\n"), text
	})
	for sample, want := range map[string]float64{
		"baton_connections_accepted_total":                   30,
		"baton_handoff_latency_seconds_count":                30,
		`baton_workers{state="ready"}`:                       2,
		"baton_generation":                                   1,
		"baton_host_drained":                                 0,
		`baton_connections_closed_total{reason="no_worker"}`: 0,
	} {
		if got := metricValue(t, text, sample); got != want {
			t.Errorf("%s = %v, want %v", sample, got, want)
		}
	}
	if metricValue(t, text, "process_open_fds") <= 0 {
		t.Error("no process_open_fds")
	}
	// The same on the admin socket.
	sock := filepath.Join(g.dir, "admin.sock")
	uc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	if _, atext := httpGet(t, uc, "http://batond/metrics"); !strings.Contains(atext, "baton_connections_handed_off_total 30\n") {
		t.Errorf("admin /metrics:\n%s", atext)
	}
	if code, body := httpGet(t, hc, "http://"+metricsAddr+"/healthz"); code != 200 || !strings.HasPrefix(body, "ready: 2 of 2 workers") {
		t.Errorf("/healthz: %d %q", code, body)
	}
	// 20 of 200 slots taken: 90% free; maxconn = 20 held + 180 free. No "ready": it would end
	// an operator's MAINT set in HAProxy (only an undrain sends it).
	if got := agentSays(t, agentAddr); got != "up 90% maxconn:200" {
		t.Errorf("agent-check: %q", got)
	}
	if code, out := g.ctl("drain", "-host"); code != 0 {
		t.Fatalf("drain -host: exit %d: %s", code, out)
	}
	if got := agentSays(t, agentAddr); got != "drain" {
		t.Errorf("agent-check of a drained host: %q", got)
	}
	if code, body := httpGet(t, hc, "http://"+metricsAddr+"/healthz"); code != 503 || !strings.Contains(body, "drained") {
		t.Errorf("/healthz of a drained host: %d %q", code, body)
	}
	if code, out := g.ctl("status"); code != 0 || !strings.Contains(out, "host drained") {
		t.Errorf("status of a drained host (exit %d):\n%s", code, out)
	}
	held.check("while the host is drained")
	if code, out := g.ctl("undrain"); code != 0 {
		t.Fatalf("undrain: exit %d: %s", code, out)
	}
	if got := agentSays(t, agentAddr); !strings.HasPrefix(got, "up ready ") {
		t.Errorf("agent-check after undrain: %q", got)
	}
}

// Draining one worker: it takes no new clients, keeps its sessions, and its slot gets a fresh
// worker when it has left (not counted as a crash); with -replace at once.
func TestDrainWorkers(t *testing.T) {
	g := startGateway(t, opts{workers: 2})
	waitAllReady(t, g, 2)
	held := holdSessions(t, g.addr, 6)
	before := g.status()
	old0 := before.Workers[0].PID
	if code, out := g.ctl("drain", "0"); code != 0 {
		t.Fatalf("drain 0: exit %d: %s", code, out)
	}
	if w := g.status().Workers[0]; w.State != supervisor.StateDraining || w.PID != old0 {
		t.Fatalf("slot 0 after drain: %+v", w)
	}
	for i := 0; i < 6; i++ { // new clients: all to slot 1
		c, err := dial(g.addr)
		if err != nil {
			t.Fatal(err)
		}
		if slot, _ := c.worker(); slot != 1 {
			t.Errorf("new client %d went to slot %d, which is drained", i, slot)
		}
		c.c.Close()
	}
	held.check("on the drained worker")
	held.close() // its last sessions leave: it exits and slot 0 gets a fresh worker
	waitFor(t, "a fresh worker in slot 0", 20*time.Second, func() (bool, string) {
		w := g.status().Workers[0]
		return w.PID != old0 && w.State == supervisor.StateReady, fmt.Sprintf("%+v", w)
	})
	if w := g.status().Workers[0]; !strings.HasPrefix(w.LastExit, "drained") {
		t.Errorf("slot 0's last exit %q, want it marked drained", w.LastExit)
	}
	// -replace: the successor starts at once, beside the drained worker.
	held2 := holdSessions(t, g.addr, 4)
	old1 := g.status().Workers[1].PID
	if code, out := g.ctl("drain", "-replace", "1"); code != 0 {
		t.Fatalf("drain -replace 1: exit %d: %s", code, out)
	}
	waitFor(t, "slot 1's successor ready beside the drained worker", 20*time.Second, func() (bool, string) {
		st := g.status()
		fresh, drained := false, false
		for _, w := range st.Workers {
			fresh = fresh || (w.Slot == 1 && w.PID != old1 && w.PID != 0 && w.State == supervisor.StateReady)
			drained = drained || (w.PID == old1 && w.State == supervisor.StateDraining)
		}
		return fresh && (drained || st.Clients < 4), fmt.Sprintf("%+v", st.Workers)
	})
	held2.check("after drain -replace")
	code, out := g.ctl("workers")
	if code != 0 || len(strings.Split(strings.TrimSpace(out), "\n")) < 2 {
		t.Errorf("workers (exit %d):\n%s", code, out)
	}
	if code, out := g.ctl("drain", "7"); code != 1 || !strings.Contains(out, "no such slot") {
		t.Errorf("drain of a slot that does not exist: exit %d: %s", code, out)
	}
	if code, out := g.ctl("drain"); code != 2 {
		t.Errorf("drain without a target: exit %d: %s", code, out)
	}
	checkInvariant(t, g)
}

// An operator's drain has a deadline: a drained worker whose sessions outlast -drain-timeout
// is ended (SIGTERM, then SIGKILL), as other generations' workers are, and its slot gets a
// fresh worker.
func TestDrainSlotDeadline(t *testing.T) {
	g := startGateway(t, opts{workers: 2, args: []string{"-drain-timeout", "2s"}})
	waitAllReady(t, g, 2)
	held := holdSessions(t, g.addr, 4)
	old0 := g.status().Workers[0].PID
	var on0 []*client
	for _, c := range held.cs {
		if slot, _ := c.worker(); slot == 0 {
			on0 = append(on0, c)
		}
	}
	if len(on0) == 0 {
		t.Fatal("no session on slot 0")
	}
	start := time.Now() // the deadline is at least 2s from here
	if code, out := g.ctl("drain", "0"); code != 0 {
		t.Fatalf("drain 0: exit %d: %s", code, out)
	}
	waitFor(t, "the drained worker ended at its deadline and replaced", 30*time.Second, func() (bool, string) {
		w := g.status().Workers[0]
		return w.PID != old0 && w.State == supervisor.StateReady && syscall.Kill(old0, 0) != nil, fmt.Sprintf("%+v", w)
	})
	if took := time.Since(start); took < 2*time.Second {
		t.Errorf("the drained worker ended after %v, before its 2s deadline", took)
	}
	for i, c := range on0 {
		c.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.c.Read(make([]byte, 64)); err == nil {
			t.Errorf("session %d on the drained worker still open after its deadline", i)
		}
	}
	if w := g.status().Workers[0]; !strings.HasPrefix(w.LastExit, "drained") {
		t.Errorf("slot 0's last exit %q, want it marked drained", w.LastExit)
	}
}

// A worker batond drained stays draining: one that registers again without saying so is
// drained again and gets no client.
func TestDrainedWorkerStaysDraining(t *testing.T) {
	dir := t.TempDir()
	self, _ := os.Executable()
	g := startGateway(t, opts{workers: 2, command: []string{self}, env: []string{
		roleEnv + "=forgetful@0", roleDirEnv + "=" + dir}})
	waitAllReady(t, g, 2)
	if code, out := g.ctl("drain", "0"); code != 0 {
		t.Fatalf("drain 0: exit %d: %s", code, out)
	}
	waitFor(t, "the forgetful worker drained again", 20*time.Second, func() (bool, string) {
		_, err := os.Stat(filepath.Join(dir, "redrained"))
		_, got := os.Stat(filepath.Join(dir, "got-conn"))
		return err == nil || got == nil, fmt.Sprintf("%+v", g.status().Workers)
	})
	for i := 0; i < 6; i++ {
		c, err := dial(g.addr)
		if err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
		if slot, _ := c.worker(); slot != 1 {
			t.Errorf("client %d went to slot %d, drained", i, slot)
		}
		c.c.Close()
	}
	if _, err := os.Stat(filepath.Join(dir, "got-conn")); err == nil {
		t.Error("the drained worker got a client after registering again")
	}
	if w := g.status().Workers[0]; w.State != supervisor.StateDraining {
		t.Errorf("slot 0 after re-registering: %+v, want draining", w)
	}
}

// After a crash of batond, a survivor that the crashed batond had drained is not adopted into
// its slot: it drains on (its sessions with it) and the slot gets a fresh worker.
func TestAdoptionSkipsDrainedWorker(t *testing.T) {
	g := startGateway(t, opts{workers: 2, args: []string{"-drain-timeout", "5m", "-adopt-window", "3s"}})
	waitAllReady(t, g, 2)
	held := holdSessions(t, g.addr, 4)
	old0 := g.status().Workers[0].PID
	if code, out := g.ctl("drain", "0"); code != 0 {
		t.Fatalf("drain 0: exit %d: %s", code, out)
	}
	g.crash()
	g.restart()
	waitFor(t, "the drained survivor draining beside a fresh slot 0", 30*time.Second, func() (bool, string) {
		st := g.status()
		fresh, drained := false, false
		for _, w := range st.Workers {
			fresh = fresh || (w.Slot == 0 && w.PID != old0 && w.PID != 0 && w.State == supervisor.StateReady)
			drained = drained || (w.PID == old0 && w.State == supervisor.StateDraining)
		}
		return fresh && drained, fmt.Sprintf("%+v", st.Workers)
	})
	held.check("after the restart")
	for i := 0; i < 6; i++ {
		c, err := dial(g.addr)
		if err != nil {
			t.Fatal(err)
		}
		if _, pid := c.worker(); pid == old0 {
			t.Errorf("client %d went to the drained survivor", i)
		}
		c.c.Close()
	}
	checkInvariant(t, g)
}

// batonctl top in a real terminal (tmux): it draws, refreshes with what changes, and quits on q.
func TestTopInTmux(t *testing.T) {
	if _, err := exec.LookPath("tmux"); err != nil {
		t.Fatalf("tmux is needed for the batonctl top test (.ci/run installs it): %v", err)
	}
	g := startGateway(t, opts{workers: 2})
	waitAllReady(t, g, 2)
	session := fmt.Sprintf("batontop%d", time.Now().UnixNano()%1e9)
	tmux := func(args ...string) (string, error) {
		out, err := exec.Command("tmux", args...).CombinedOutput()
		return string(out), err
	}
	cmdline := fmt.Sprintf("%s -admin %s top -interval 200ms", bins.batonct, filepath.Join(g.dir, "admin.sock"))
	if out, err := tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "40", cmdline); err != nil {
		t.Fatalf("tmux: %v: %s", err, out)
	}
	t.Cleanup(func() { tmux("kill-session", "-t", session) })
	screen := func() string { out, _ := tmux("capture-pane", "-p", "-t", session); return out }
	waitFor(t, "top to draw", 10*time.Second, func() (bool, string) {
		s := screen()
		return strings.Contains(s, "generation 1") && strings.Contains(s, "GEN  SLOT") && strings.Contains(s, "clients 0"), s
	})
	c, err := dial(g.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.c.Close()
	waitFor(t, "top to show the new client", 10*time.Second, func() (bool, string) {
		s := screen()
		return strings.Contains(s, "clients 1 ") && strings.Contains(s, "handed off 1 "), s
	})
	tmux("send-keys", "-t", session, "q")
	waitFor(t, "top to quit on q", 10*time.Second, func() (bool, string) {
		_, err := tmux("has-session", "-t", session)
		return err != nil, screen()
	})
}
