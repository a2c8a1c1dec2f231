package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/cmd/internal/admin"
)

// Faults during a migrating reload (issue 13, item 6), each against the ownership table of
// handoff/PROTOCOL.md ("Who owns the socket"): a fault may cost only the sessions the faulty
// process owned at that instant. Each test says which sessions that is, makes the instant
// deterministic with a worker role (roles_test.go: gated, noack, dieonresume, decliner) or
// SIGSTOP, and checks, to the session, that exactly those may end while every other one goes
// on with its state (the demo's line count, which player.say checks on every move).

// joinPlayers connects n demo players, each echoing 3 lines, and groups them by the slot that
// serves them.
func joinPlayers(t *testing.T, g *gateway, n int) (all []*player, bySlot map[int][]*player) {
	t.Helper()
	bySlot = map[int][]*player{}
	for i := range n {
		c, err := dial(g.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.c.Close() })
		p := &player{client: c, id: i, gen: c.generation()}
		for range 3 {
			if err := p.say(); err != nil {
				t.Fatalf("player %d: %v", i, err)
			}
		}
		slot, _ := c.worker()
		all = append(all, p)
		bySlot[slot] = append(bySlot[slot], p)
	}
	if len(bySlot) < 2 {
		t.Fatalf("all %d players on one worker: %v", n, bySlot)
	}
	return all, bySlot
}

// port is the player's own port: what its worker sees as the client's.
func (p *player) port() string {
	_, port, _ := net.SplitHostPort(p.c.LocalAddr().String())
	return port
}

// goesOn checks that the player's session still echoes, with its count, after moving exactly
// moves times, and that it is served by generation gen.
func (p *player) goesOn(t *testing.T, what string, moves, gen int) {
	t.Helper()
	for range 2 {
		if err := p.say(); err != nil {
			t.Errorf("%s: player %d (port %s) broke: %v", what, p.id, p.port(), err)
			return
		}
	}
	if p.moves != moves || p.gen != gen {
		t.Errorf("%s: player %d moved %d times, now on generation %d; want %d moves, generation %d", what, p.id, p.moves, p.gen, moves, gen)
	}
}

// ended says whether the player's session is over: the connection was closed or reset under
// it (not a timeout, not a wrong line: that would be a session served badly, not lost).
func (p *player) ended() (bool, error) {
	err := p.say()
	if err == nil {
		return false, nil
	}
	if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return true, nil
	}
	return false, err
}

// handed reads the ports of the sessions the gated role handed back.
func handed(dir string) map[string]bool {
	b, _ := os.ReadFile(filepath.Join(dir, "handed"))
	out := map[string]bool{}
	for _, l := range strings.Fields(string(b)) {
		out[l] = true
	}
	return out
}

// release lets the gated role hand back n sessions in all.
func release(t *testing.T, dir string, n int) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "release.tmp"), []byte(strconv.Itoa(n)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "release.tmp"), filepath.Join(dir, "release")); err != nil {
		t.Fatal(err)
	}
}

// sendSignal sends sig to pid through a pidfd; with wait it waits until the process is gone.
func sendSignal(t *testing.T, pid int, sig unix.Signal, wait bool) {
	t.Helper()
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		t.Fatalf("pid %d: %v", pid, err)
	}
	defer unix.Close(fd)
	if err := unix.PidfdSendSignal(fd, sig, nil, 0); err != nil {
		t.Fatalf("%v to pid %d: %v", sig, pid, err)
	}
	if wait && !pidfdWait(fd, 15*time.Second) {
		t.Fatalf("pid %d still runs 15s after %v", pid, sig)
	}
}

// asked says whether the worker with pid is listed as asked for its sessions.
func asked(st admin.Status, pid int) bool {
	for _, w := range st.Workers {
		if w.PID == pid && w.Migrating {
			return true
		}
	}
	return false
}

func migration(st admin.Status) string {
	m := st.Migration
	return fmt.Sprintf("asked %d, handed back %d, resumed %d, migrating %d, declined %d, lost %d; %d clients",
		m.Asked, m.HandedBack, m.Resumed, m.Migrating, m.Declined, m.Lost, st.Clients)
}

// kill -9 of an OLD worker mid-migration. It may cost exactly the sessions that worker had not
// handed back when it died (they end with it, as without migration); every session it had
// handed back is delivered with its state, and no other session is touched. The old worker of
// slot 0 plays "gated": asked for its sessions, it hands back exactly half of them, then holds
// the rest (unanswered, well within the migrate timeout) until the kill.
func TestMigrateFaultOldWorkerKilled(t *testing.T) {
	dir := t.TempDir()
	self, _ := os.Executable()
	g := startGateway(t, opts{workers: 2, command: []string{self},
		env:  []string{roleEnv + "=gated@0/1", roleDirEnv + "=" + dir},
		args: []string{"-drain-timeout", "10m", "-migrate-timeout", "60s"}})
	const n = 40
	all, bySlot := joinPlayers(t, g, n)
	gatedPID := g.status().Workers[0].PID
	keep, other := bySlot[0], bySlot[1]
	half := len(keep) / 2
	finished := g.ctlStart("reload", "-migrate", "-timeout", "90s")

	// The demo of slot 1 hands everything back at once; the gated worker is asked and waits.
	waitFor(t, "slot 1's sessions moved and the gated worker asked", 60*time.Second, func() (bool, string) {
		st := g.status()
		return st.Migration.Resumed == uint64(len(other)) && asked(st, gatedPID), migration(st)
	})
	release(t, dir, half)
	waitFor(t, fmt.Sprintf("the gated worker to hand back %d sessions, all acked", half), 30*time.Second, func() (bool, string) {
		st := g.status()
		h := len(handed(dir))
		return h == half && st.Migration.Resumed == uint64(len(other)+half) && st.Migration.Migrating == 0,
			fmt.Sprintf("%d handed back; %s", h, migration(st))
	})
	// Mid-migration: it owns len(keep)-half sessions, batond none, the new workers the rest.
	sendSignal(t, gatedPID, unix.SIGKILL, true)

	code, out := finished()
	moved := len(other) + half
	if code != 0 || !strings.Contains(out, fmt.Sprintf("migrated %d sessions (handed back %d, declined 0, lost 0)", moved, moved)) {
		t.Errorf("batonctl reload -migrate: exit %d, want 0 and %d moved, none lost:\n%s", code, moved, out)
	}
	back := handed(dir)
	lost := 0
	for _, p := range all {
		slot, _ := p.worker()
		if slot == 1 || back[p.port()] {
			p.goesOn(t, "after the kill", 1, 2)
			continue
		}
		gone, err := p.ended()
		if !gone {
			t.Errorf("player %d, held by the killed worker, still served (or broken otherwise: %v)", p.id, err)
		}
		lost++
	}
	if lost != len(keep)-half {
		t.Errorf("%d sessions ended, want the %d the gated worker still held", lost, len(keep)-half)
	}
	st := g.status()
	if st.Clients != moved || st.Migration.Lost != 0 || st.Migration.Migrating != 0 {
		t.Errorf("after the kill: %s; want %d clients, none lost by batond", migration(st), moved)
	}
	for _, w := range st.Workers {
		if w.Generation != st.Generation {
			t.Errorf("a worker of generation %d is left: %+v", w.Generation, w)
		}
	}
	t.Logf("%d sessions: %d on the plain old worker and %d handed back by the gated one moved; the %d it still held ended with it", n, len(other), half, lost)
}

// kill -9 of a NEW worker before its ACK. It may cost nothing: batond owns every session it
// delivered and that worker did not ACK, waits until the worker is gone, and delivers each
// again, with its state, to another worker of the serving generation. Slot 1 of the new
// generation takes RESUMEs and never ACKs them: "noack" holds them until batond's handoff
// timeout kills it (SIGKILL), "dieonresume" SIGKILLs itself at the first.
func TestMigrateFaultNewWorkerKilledBeforeAck(t *testing.T) {
	for _, role := range []string{"noack", "dieonresume"} {
		t.Run(role, func(t *testing.T) {
			dir := t.TempDir()
			self, _ := os.Executable()
			g := startGateway(t, opts{workers: 2, command: []string{self},
				env:  []string{roleEnv + "=" + role + "@1/2", roleDirEnv + "=" + dir},
				args: []string{"-drain-timeout", "10m", "-migrate-timeout", "30s", "-handoff-timeout", "4s"}})
			const n = 40
			all, _ := joinPlayers(t, g, n)
			code, out := g.ctl("reload", "-migrate", "-timeout", "90s")
			if code != 0 || !strings.Contains(out, fmt.Sprintf("migrated %d sessions (handed back %d, declined 0, lost 0)", n, n)) {
				t.Fatalf("batonctl reload -migrate: exit %d, want 0 and all %d moved, none lost:\n%s", code, n, out)
			}
			b, _ := os.ReadFile(filepath.Join(dir, "resumes"))
			got := len(strings.Split(strings.TrimSpace(string(b)), "\n"))
			if len(b) == 0 {
				t.Fatalf("the %s worker got no RESUME: the test proves nothing", role)
			}
			for _, p := range all {
				p.goesOn(t, "after the new worker's death", 1, 2)
			}
			st := checkInvariant(t, g)
			m := st.Migration
			if st.Clients != n || m.Resumed != n || m.HandedBack != n || m.Lost != 0 || m.Migrating != 0 {
				t.Errorf("%s; want %d clients, %d resumed, none lost", migration(st), n, n)
			}
			if st.Gateway.Redispatched == 0 {
				t.Errorf("no session was delivered again after the %s worker died: %+v", role, st.Gateway)
			}
			if w := st.Workers[1]; w.Restarts < 1 || w.Generation != st.Generation {
				t.Errorf("slot 1 was not replaced after its worker died: %+v", w)
			}
			t.Logf("%s: took %d RESUMEs without an ACK and died; all %d sessions went on (%d deliveries again): %s",
				role, got, n, st.Gateway.Redispatched, strings.TrimSpace(out))
		})
	}
}
