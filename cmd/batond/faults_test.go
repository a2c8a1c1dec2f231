package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/handoff"
	"github.com/baton-gw/baton/supervisor"
)

// cpuTicks reads a process's utime+stime (clock ticks) from /proc.
func cpuTicks(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	u, _ := strconv.Atoi(f[11])
	s, _ := strconv.Atoi(f[12])
	return u + s
}

// fd exhaustion: with its workers stopped, batond holds every accepted connection until the
// handoff timeout and runs out of fds. Accept then backs off instead of spinning, nothing is
// dropped, and when the workers come back every waiting client is served.
func TestAcceptEMFILEBacksOff(t *testing.T) {
	build(t)
	g := startGateway(t, opts{workers: 1, args: []string{"-handoff-timeout", "20s", "-queue-timeout", "20s"}})
	st := g.status()
	// Only batond's limit (a worker with too few fds is another test): room for a dozen more.
	lim := &unix.Rlimit{Cur: uint64(countFDs(t, st.PID) + 12), Max: uint64(countFDs(t, st.PID) + 12)}
	if err := unix.Prlimit(st.PID, unix.RLIMIT_NOFILE, lim, nil); err != nil {
		t.Fatal(err)
	}
	worker := st.Workers[0].PID
	if err := syscall.Kill(worker, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(worker, syscall.SIGCONT)
	// Connect more clients than batond has fds left; the kernel completes the handshakes and
	// keeps them in the listen backlog.
	const n = 60
	clients := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", g.addr, 5*time.Second)
		if err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
		clients = append(clients, c)
	}
	waitFor(t, "batond to hit its fd limit", 10*time.Second, func() (bool, string) {
		return strings.Contains(g.log.String(), "too many open files"), "no EMFILE in the log yet"
	})
	// Backing off, not spinning: over two seconds of exhaustion batond uses little CPU.
	before := cpuTicks(t, st.PID)
	time.Sleep(2 * time.Second)
	used := cpuTicks(t, st.PID) - before // clock ticks, 100 per second
	if used > 40 {
		t.Errorf("batond used %d ticks of CPU in 2s while out of fds: spinning", used)
	}
	syscall.Kill(worker, syscall.SIGCONT)
	for i, c := range clients {
		c.SetDeadline(time.Now().Add(20 * time.Second))
		buf := make([]byte, 128)
		if _, err := c.Read(buf); err != nil {
			t.Fatalf("client %d never served after the fds came back: %v", i, err)
		}
	}
	st = checkInvariant(t, g)
	if st.Gateway.AcceptErrors == 0 || st.Gateway.ClosedTotal() != 0 || st.Gateway.Acked != n {
		t.Errorf("gateway after fd exhaustion: %+v", st.Gateway)
	}
	t.Logf("accept errors %d, %d ticks of CPU in 2s of exhaustion", st.Gateway.AcceptErrors, used)
}

// A peer that connects to the registration socket and says nothing costs nothing: registrations
// go on meanwhile, and it is dropped after the HELLO timeout.
func TestSilentRegistrationPeer(t *testing.T) {
	g := startGateway(t, opts{workers: 1})
	ch, err := handoff.Dial(filepath.Join(g.dir, "workers.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ch.Close()
	victim := g.status().Workers[0].PID
	syscall.Kill(victim, syscall.SIGKILL)
	waitFor(t, "the worker restarted and registered while the silent peer waits", 10*time.Second, func() (bool, string) {
		w := g.status().Workers[0]
		return w.PID != victim && w.State == supervisor.StateReady, fmt.Sprintf("%+v", w)
	})
	ch.Conn().SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, handoff.MaxMessage)
	start := time.Now()
	msg, _, err := ch.Recv(buf)
	if err == nil {
		typ, body, _ := handoff.Split(msg)
		if typ == handoff.TypeError {
			e, _ := handoff.ParseError(body)
			t.Logf("silent peer told: %v after %v", e, time.Since(start).Round(time.Millisecond))
		} else {
			t.Fatalf("silent peer got %s", typ)
		}
	} else if strings.Contains(err.Error(), "timeout") {
		t.Fatal("batond never dropped a peer that sent no HELLO")
	}
	c, err := dial(g.addr)
	if err != nil {
		t.Fatal(err)
	}
	c.c.Close()
}

// A full disk for the pid file: batond says so and exits 1 before it serves anybody.
func TestPIDFileOnFullDisk(t *testing.T) {
	build(t)
	dir := t.TempDir()
	mnt := filepath.Join(dir, "full")
	os.Mkdir(mnt, 0o755)
	// A private mount namespace with a 64 KiB tmpfs, filled up.
	script := fmt.Sprintf(`set -e
mount -t tmpfs -o size=64k tmpfs %[1]s
dd if=/dev/zero of=%[1]s/fill bs=4k count=64 2>/dev/null || true
exec %[2]s -listen 127.0.0.1:0 -workers 1 -socket %[3]s/w.sock -admin %[3]s/a.sock -pidfile %[1]s/batond.pid`,
		mnt, bins.batond, dir)
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script)
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatal("batond did not exit with its pid file on a full disk")
	}
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), "no space left on device") || !strings.Contains(string(out), "batond.pid") {
		t.Fatalf("exit %v, want 1 with the pid file and ENOSPC named:\n%s", err, out)
	}
}

// A worker out of file descriptors cannot receive the next client's fd. It says so (REFUSE)
// instead of failing its channel: batond gives the client to another worker, sends the full one
// nothing until it reports a close, and nobody is killed or dropped.
func TestWorkerOutOfFDs(t *testing.T) {
	g := startGateway(t, opts{workers: 2})
	st := g.status()
	full := st.Workers[0].PID
	other := st.Workers[1].PID
	// Room for about two more descriptors (the limit is on fd numbers, and there may be a
	// hole or two below it): a few clients, then the kernel cannot install the next fd.
	n0 := uint64(countFDs(t, full) + 2)
	lim := &unix.Rlimit{Cur: n0, Max: n0}
	if err := unix.Prlimit(full, unix.RLIMIT_NOFILE, lim, nil); err != nil {
		t.Fatal(err)
	}
	const n = 30
	var clients []*client
	defer func() {
		for _, c := range clients {
			c.c.Close()
		}
	}()
	served := map[int]int{}
	for i := 0; i < n; i++ {
		c, err := dial(g.addr)
		if err != nil {
			t.Fatalf("client %d: %v (log: %s)", i, err, g.log.String())
		}
		clients = append(clients, c)
		if err := c.echo(fmt.Sprintf("client %d", i)); err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
		_, pid := c.worker()
		served[pid]++
	}
	if served[full] > 6 || served[full]+served[other] != n {
		t.Errorf("served by pid: %v; the full worker (%d) has room for a few", served, full)
	}
	st = checkInvariant(t, g)
	for i, w := range st.Workers {
		if w.PID != []int{full, other}[i] {
			t.Errorf("worker %d is now pid %d: it was restarted (log: %s)", i, w.PID, g.log.String())
		}
	}
	if st.Gateway.Redispatched == 0 || st.Gateway.ClosedTotal() != 0 || st.Gateway.Acked != n {
		t.Errorf("gateway: %+v; want re-dispatches, no client closed, all %d acked", st.Gateway, n)
	}
	if !strings.Contains(g.log.String(), "could not receive") {
		t.Errorf("no log line says why: %s", g.log.String())
	}
}
