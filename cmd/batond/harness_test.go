package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/cmd/internal/admin"
)

// These are integration tests: they build the real batond and batonctl, start real batond
// processes with real workers (the built-in demo game, or this test binary playing a worker,
// well-behaved or not), and talk to them over real sockets.

var bins struct {
	once    sync.Once
	dir     string
	batond  string
	batonct string
	err     error
}

func TestMain(m *testing.M) {
	if role := os.Getenv(roleEnv); role != "" {
		os.Exit(runRole(role))
	}
	code := m.Run()
	if bins.dir != "" {
		os.RemoveAll(bins.dir)
	}
	os.Exit(code)
}

// build compiles batond and batonctl once per test binary run (with -race when the tests run
// with it, so the daemon is checked too).
func build(t *testing.T) {
	t.Helper()
	bins.once.Do(func() {
		bins.dir, bins.err = os.MkdirTemp("", "baton-bin-")
		if bins.err != nil {
			return
		}
		bins.batond = filepath.Join(bins.dir, "batond")
		bins.batonct = filepath.Join(bins.dir, "batonctl")
		args := []string{"build"}
		if raceEnabled {
			args = append(args, "-race")
		}
		args = append(args, "-o", bins.dir, "github.com/baton-gw/baton/cmd/batond", "github.com/baton-gw/baton/cmd/batonctl")
		out, err := exec.Command("go", args...).CombinedOutput()
		if err != nil {
			bins.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if bins.err != nil {
		t.Fatal(bins.err)
	}
}

// logFile is batond's output, in a file: a pipe would be inherited by the next batond after a
// reload (and by workers), and exec.Cmd.Wait would wait for all of them.
type logFile struct{ path string }

func (l logFile) String() string {
	b, _ := os.ReadFile(l.path)
	return string(b)
}

// gateway is one running batond under test.
type gateway struct {
	t      *testing.T
	dir    string
	cmd    *exec.Cmd
	log    logFile
	admin  *admin.Client
	addr   string
	exited chan struct{}
	bin    string   // what started it, for restart
	args   []string //
	env    []string //
	// pids of workers seen in status, killed at cleanup in case a test left one behind
	lastWorkers []int
}

type opts struct {
	binary  string // batond to run; "" = the shared build (use ownBinary to swap it on disk)
	workers int
	args    []string // extra batond flags
	env     []string
	command []string // worker command; nil = demo workers
}

// startGateway starts batond on 127.0.0.1:0 and waits until it serves.
func startGateway(t *testing.T, o opts) *gateway {
	t.Helper()
	g := startGatewayNoWait(t, o)
	g.waitServing()
	return g
}

// startGatewayNoWait starts batond on 127.0.0.1:0 (g.addr is not known yet).
func startGatewayNoWait(t *testing.T, o opts) *gateway {
	t.Helper()
	build(t)
	dir := t.TempDir()
	g := &gateway{t: t, dir: dir, log: logFile{filepath.Join(dir, "batond.log")}}
	args := []string{
		"-listen", "127.0.0.1:0", "-workers", strconv.Itoa(o.workers),
		"-socket", filepath.Join(dir, "workers.sock"), "-admin", filepath.Join(dir, "admin.sock"),
		"-pidfile", filepath.Join(dir, "batond.pid"), "-log-level", "debug",
		"-stop-timeout", "3s",
	}
	args = append(args, o.args...)
	if len(o.command) > 0 {
		args = append(append(args, "--"), o.command...)
	}
	bin := bins.batond
	if o.binary != "" {
		bin = o.binary
	}
	g.bin, g.args, g.env = bin, args, append(os.Environ(), o.env...)
	g.launch()
	t.Cleanup(g.stop)
	g.admin = admin.NewClient(filepath.Join(dir, "admin.sock"))
	return g
}

// launch starts a batond process with g's command line, its output appended to g's log.
func (g *gateway) launch() {
	g.t.Helper()
	logf, err := os.OpenFile(g.log.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		g.t.Fatal(err)
	}
	defer logf.Close()
	g.cmd = exec.Command(g.bin, g.args...)
	g.cmd.Env = g.env
	g.cmd.Stderr = logf
	g.cmd.Stdout = logf
	g.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := g.cmd.Start(); err != nil {
		g.t.Fatal(err)
	}
	exited := make(chan struct{})
	g.exited = exited
	cmd := g.cmd
	go func() { cmd.Wait(); close(exited) }()
}

// pid is the batond serving now (the pid file follows reloads).
func (g *gateway) pid() int {
	b, _ := os.ReadFile(filepath.Join(g.dir, "batond.pid"))
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// crash kills the serving batond with SIGKILL and waits until it is gone; its workers live on.
func (g *gateway) crash() {
	g.t.Helper()
	pid := g.pid()
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		g.t.Fatalf("batond pid %d: %v", pid, err)
	}
	defer unix.Close(fd)
	unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
	if !pidfdWait(fd, 10*time.Second) {
		g.t.Fatalf("batond %d survived SIGKILL", pid)
	}
	os.Remove(filepath.Join(g.dir, "batond.pid")) // stale: the restarted batond writes its own
}

// restart starts batond again with the same command line (as an init system would after a
// crash) and waits until it serves; g.addr is its listener now.
func (g *gateway) restart() {
	g.t.Helper()
	g.launch()
	g.waitServing()
}

// waitServing waits until batond writes its pid file (it serves) and learns its address.
func (g *gateway) waitServing() {
	t := g.t
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(g.dir, "batond.pid")); err == nil {
			break
		}
		select {
		case <-g.exited:
			t.Fatalf("batond exited before serving:\n%s", g.log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("batond not serving after 20s:\n%s", g.log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	st := g.status()
	if len(st.Listeners) != 1 {
		t.Fatalf("listeners: %v", st.Listeners)
	}
	g.addr = st.Listeners[0]
}

// stop sends SIGTERM to the batond serving now (the pid file follows reloads) and waits for it
// to exit, through a pidfd; then kills whatever worker of this test is left.
func (g *gateway) stop() {
	defer func() {
		for _, w := range g.lastWorkers {
			killStray(w, g.dir)
		}
		if g.t.Failed() {
			g.t.Logf("batond log:\n%s", g.log.String())
		}
	}()
	b, err := os.ReadFile(filepath.Join(g.dir, "batond.pid"))
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid == 0 {
		pid = g.cmd.Process.Pid
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return // already gone
	}
	defer unix.Close(fd)
	unix.PidfdSendSignal(fd, unix.SIGTERM, nil, 0)
	if !pidfdWait(fd, 15*time.Second) {
		g.t.Errorf("batond %d did not stop within 15s of SIGTERM", pid)
		unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
		pidfdWait(fd, 5*time.Second)
	}
	if pid == g.cmd.Process.Pid {
		<-g.exited
	}
}

// pidfdWait waits until the process behind fd exits (its pidfd becomes readable).
func pidfdWait(fd int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		n, _ := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 100)
		if n > 0 {
			return true
		}
	}
	return false
}

func (g *gateway) status() admin.Status {
	g.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := g.admin.Status(ctx)
	if err != nil {
		g.t.Fatalf("status: %v", err)
	}
	for _, w := range st.Workers {
		if w.PID != 0 {
			g.lastWorkers = append(g.lastWorkers, w.PID)
		}
	}
	return st
}

// waitFor polls cond (bounded) and fails with what it last saw.
func waitFor(t *testing.T, what string, d time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	last := ""
	for time.Now().Before(deadline) {
		ok, s := cond()
		if ok {
			return
		}
		last = s
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("timed out after %v waiting for %s; last: %s", d, what, last)
}

// client is one player of the demo game.
type client struct {
	c        net.Conn
	r        *bufio.Reader
	greeting string
}

// generation parses the greeting's generation.
func (c *client) generation() int {
	f := strings.Fields(strings.ReplaceAll(c.greeting, "·", " "))
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "generation" {
			n, _ := strconv.Atoi(f[i+1])
			return n
		}
	}
	return 0
}

// ownBinary copies batond to dir, so a test can replace it on disk (as a deploy does).
func ownBinary(t *testing.T, dir string) string {
	t.Helper()
	build(t)
	b, err := os.ReadFile(bins.batond)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "batond")
	if err := os.WriteFile(p, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// greeting format: "baton demo · worker 1 · pid 123 · generation 1"
func (c *client) worker() (slot, pid int) {
	f := strings.Fields(strings.ReplaceAll(c.greeting, "·", " "))
	for i := 0; i+1 < len(f); i++ {
		switch f[i] {
		case "worker":
			slot, _ = strconv.Atoi(f[i+1])
		case "pid":
			pid, _ = strconv.Atoi(f[i+1])
		}
	}
	return
}

// dial connects and reads the greeting.
func dial(addr string) (*client, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	cl := &client{c: c, r: bufio.NewReader(c)}
	line, err := cl.r.ReadString('\n')
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("greeting: %w (got %q)", err, line)
	}
	cl.greeting = strings.TrimSpace(line)
	return cl, nil
}

// echo sends a line and checks it comes back.
func (c *client) echo(s string) error {
	c.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.c.Write([]byte(s + "\n")); err != nil {
		return err
	}
	line, err := c.r.ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != s {
		return fmt.Errorf("echo %q, got %q", s, line)
	}
	return nil
}

func countFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// checkInvariant: every accepted connection was acked by a worker or closed by the gateway
// with a reason, once nothing is in flight.
func checkInvariant(t *testing.T, g *gateway) admin.Status {
	t.Helper()
	var st admin.Status
	waitFor(t, "no connection in flight", 10*time.Second, func() (bool, string) {
		st = g.status()
		return st.Gateway.InFlight == 0, fmt.Sprintf("%+v", st.Gateway)
	})
	gw := st.Gateway
	if gw.Accepted != gw.Acked+gw.ClosedTotal() {
		t.Errorf("invariant broken: accepted %d != acked %d + closed by gateway %d (%v)", gw.Accepted, gw.Acked, gw.ClosedTotal(), gw.Closed)
	}
	return st
}

// killStray kills a worker a test left behind, through a pidfd, after checking that the pid
// still names one of this test's workers (its environment carries the test's socket path).
func killStray(pid int, dir string) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil || !bytes.Contains(env, []byte("BATON_SOCKET="+filepath.Join(dir, "workers.sock"))) {
		return
	}
	unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
}
