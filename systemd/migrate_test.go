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
	"syscall"
	"testing"
	"time"
)

// TestMigrationBatondKilledUnderSystemd (issue 13, item 6): kill -9 of batond in the middle of
// a migrating `systemctl reload`, with systemd bringing it back. The fault may cost exactly the
// sessions batond held at that instant (handed back by an old worker, not yet acked by a new
// one: handoff/PROTOCOL.md, "Who owns the socket"); every session a new worker had acked goes
// on with its state, and the restarted batond counts exactly those.
//
// The instant is deterministic without any special worker: v1's two demo workers hold 40
// sessions with room for 25 each; the reload deploys v2 with room for 15 each and migrate =
// true, so the old workers hand back all 40, the new ones ack 30, and batond keeps the other 10
// in its queue (queue_timeout 60s) when it is killed. (The old workers keep none here; a
// worker that still holds sessions at a batond crash is TestMigrateFaultBatondKilled's, in
// cmd/batond.)
func TestMigrationBatondKilledUnderSystemd(t *testing.T) {
	requireRoot(t)
	requireTools(t, "go")
	build(t)
	dir := t.TempDir()
	t.Cleanup(func() { killLeftovers(t, bins.dir, dir) }) // runs after the namespace's teardown
	addr := freeAddr(t)
	cfg := filepath.Join(dir, "baton.toml")
	writeConfig := func(version string, capacity int) {
		t.Helper()
		c := fmt.Sprintf(`# written by %s
listen = [%q]
workers = 2
capacity = %d
socket = "/run/baton/workers.sock"
admin = "/run/baton/admin.sock"
state = "/run/baton"
command = [%q, "demo-worker", %q]
migrate = true
migrate_timeout = "30s"
queue_timeout = "60s"
ready_timeout = "20s"
start_timeout = "10s"
handoff_timeout = "5s"
drain_timeout = "10m"
stop_timeout = "5s"
log_level = "info"
`, t.Name(), addr, capacity, bins.batond, version)
		if err := os.WriteFile(cfg, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeConfig("v1", 25)
	units := filepath.Join(dir, "units")
	if err := os.Mkdir(units, 0o755); err != nil {
		t.Fatal(err)
	}
	installUnits(t, units, append(binRewrites(),
		[2]string{"/etc/baton/baton.toml", cfg},
		[2]string{"ListenStream=127.0.0.1:7000", "ListenStream=" + addr})...)
	ns := bootSystemd(t, units)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("journalctl -u baton (last 300 lines):\n%s", ns.journal("baton.service", 300))
		}
	})
	if out, err := ns.systemctl("start", "baton.socket", "baton-workers.socket", "baton.service"); err != nil {
		t.Fatalf("systemctl start: %v\n%s\n%s", err, out, ns.journal("baton.service", 100))
	}
	h := &harness{t: t, ns: ns, dir: dir, addr: addr, cfg: cfg, version: "v1"}

	const n, queued = 40, 10
	ss := make([]*migSession, n)
	for i := range ss {
		s, err := dialMigSession(addr, i)
		if err != nil {
			t.Fatal(err)
		}
		defer s.c.Close()
		for range 3 {
			if err := s.say(); err != nil {
				t.Fatalf("session %d: %v", i, err)
			}
		}
		ss[i] = s
	}
	before := h.status()

	writeConfig("v2", 15)
	if out, err := ns.systemctl("reload", "baton.service"); err != nil {
		t.Fatalf("systemctl reload: %v\n%s", err, out)
	}
	var last migStatus
	ok, why := waitFor(30*time.Second, func() (bool, string) {
		st, err := migrationStatus(ns)
		if err != nil {
			return false, err.Error()
		}
		last = st
		m := st.Migration
		return st.PID != before.PID && m.Resumed == n-queued && m.Migrating == queued, fmt.Sprintf("%+v", st)
	})
	if !ok {
		t.Fatalf("want %d sessions moved and %d held by batond (no room in v2): %s", n-queued, queued, why)
	}
	// The instant: batond holds 10 sessions, the v2 workers 30, the v1 workers none.
	mp := h.mainPID()
	if mp != last.PID {
		t.Fatalf("MainPID %d, batond pid %d", mp, last.PID)
	}
	if out, err := ns.run(10*time.Second, "kill", "-9", strconv.Itoa(mp)); err != nil {
		t.Fatalf("kill -9 %d: %v: %s", mp, err, out)
	}
	// The sessions need no batond to go on; check them while systemd brings it back.
	goOn, ended := 0, 0
	var survivors []*migSession
	for _, s := range ss {
		err := s.say()
		switch {
		case err == nil:
			if s.moves != 1 || s.label != "v2" {
				t.Errorf("session %d goes on after %d moves, on %q; want 1 move, to v2", s.id, s.moves, s.label)
			}
			if err := s.say(); err != nil {
				t.Errorf("session %d: %v", s.id, err)
			}
			goOn++
			survivors = append(survivors, s)
		case errors.Is(err, io.EOF), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
			if s.moves != 0 {
				t.Errorf("session %d ended after it moved: %v", s.id, err)
			}
			ended++
		default:
			t.Errorf("session %d broke otherwise: %v", s.id, err)
		}
	}
	if goOn != n-queued || ended != queued {
		t.Errorf("%d sessions go on and %d ended; want the %d acked to go on and the %d batond held to end", goOn, ended, n-queued, queued)
	}
	// The v2 workers are full: make room for the restarted batond's self-check probe.
	for _, s := range survivors[:2] {
		s.c.Close()
	}
	st, ok := h.newBatond("kill -9 mid-migration", mp)
	if !ok {
		t.FailNow()
	}
	ok, why = waitFor(30*time.Second, func() (bool, string) {
		st, err := migrationStatus(ns)
		if err != nil {
			return false, err.Error()
		}
		adopted := 0
		for _, w := range st.Workers {
			if w.Adopted && w.Generation == st.Generation {
				adopted++
			}
		}
		return st.Clients == goOn-2 && adopted == 2, fmt.Sprintf("%+v", st)
	})
	if !ok {
		t.Errorf("the restarted batond does not count exactly the %d sessions that go on, on the 2 adopted v2 workers: %s", goOn-2, why)
	}
	for _, s := range survivors[2:] {
		if err := s.say(); err != nil {
			t.Errorf("session %d after the restart: %v", s.id, err)
		}
	}
	t.Logf("kill -9 of batond (pid %d → %d) holding %d handed-back sessions: those %d ended, the %d acked by v2 went on with their counts",
		mp, st.PID, queued, ended, goOn)
}

// migSession is a demo session that counts its echoed lines and checks the count it carries
// when it moves (the demo's upgrade line).
type migSession struct {
	c     net.Conn
	r     *bufio.Reader
	id    int
	lines int
	moves int
	label string // the release serving it, from its greeting or upgrade line
}

var upgradedRe = regexp.MustCompile(`^\* the server was upgraded to (\S+); you are now on worker (\d+) \((\d+) lines echoed so far\)$`)

func dialMigSession(addr string, id int) (*migSession, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	s := &migSession{c: c, r: bufio.NewReader(c), id: id}
	line, err := s.r.ReadString('\n')
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("greeting: %w", err)
	}
	g, err := parseGreeting(line)
	if err != nil {
		c.Close()
		return nil, err
	}
	s.label = g.label
	return s, nil
}

// say sends one numbered line and reads its echo, accepting one upgrade line before it whose
// count must be exactly the lines echoed so far.
func (s *migSession) say() error {
	want := fmt.Sprintf("session %d line %d", s.id, s.lines)
	s.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := s.c.Write([]byte(want + "\n")); err != nil {
		return err
	}
	for {
		line, err := s.r.ReadString('\n')
		if err != nil {
			return fmt.Errorf("after %d lines: %w", s.lines, err)
		}
		line = strings.TrimSuffix(line, "\n")
		if m := upgradedRe.FindStringSubmatch(line); m != nil {
			if k, _ := strconv.Atoi(m[3]); k != s.lines {
				return fmt.Errorf("moved with a count of %d lines, echoed %d", k, s.lines)
			}
			s.label = m[1]
			s.moves++
			continue
		}
		if line != want {
			return fmt.Errorf("sent %q, got %q", want, line)
		}
		s.lines++
		return nil
	}
}

// migStatus is `batonctl status -json` with the migration counters.
type migStatus struct {
	PID        int    `json:"pid"`
	Generation uint64 `json:"generation"`
	Clients    int    `json:"clients"`
	Workers    []struct {
		Slot       int    `json:"slot"`
		PID        int    `json:"pid"`
		Generation uint64 `json:"generation"`
		Clients    int    `json:"clients"`
		Adopted    bool   `json:"adopted"`
	} `json:"workers"`
	Migration struct {
		HandedBack uint64 `json:"handed_back"`
		Resumed    uint64 `json:"resumed"`
		Lost       uint64 `json:"lost"`
		Migrating  int    `json:"migrating"`
	} `json:"migration"`
}

func migrationStatus(s *sysd) (migStatus, error) {
	var st migStatus
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bins.batonctl, "-admin", fmt.Sprintf("/proc/%d/root/run/baton/admin.sock", s.pid), "status", "-json")
	out, err := cmd.Output()
	if err != nil {
		return st, fmt.Errorf("batonctl status -json: %w", err)
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return st, fmt.Errorf("batonctl status -json: %w: %q", err, out)
	}
	return st, nil
}
