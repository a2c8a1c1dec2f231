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

// kill -9 of batond mid-migration, without systemd (the test starts it again, as an init
// system would). It may cost exactly the sessions batond held at that instant: handed back by
// an old worker, not yet acked by a new one. Every other session goes on: those the new
// workers hold (moved and acked, or new clients), and those the old worker had not handed back
// (it keeps them, re-registers with the restarted batond and drains). The instant is
// deterministic: slot 0's old worker plays "gated" and hands back a first third of its
// sessions (acked before the crash); then new clients fill the new generation to its capacity
// and the gated worker hands back a second third, which no worker has room for: batond holds
// them in its queue when it is killed. The last third never leaves the old worker.
//
// (SIGSTOP of the new workers would widen the window too, but a stopped worker whose batond
// dies is in an orphaned process group: the kernel sends it SIGHUP, which ends a Go program.)
func TestMigrateFaultBatondKilled(t *testing.T) {
	dir := t.TempDir()
	self, _ := os.Executable()
	const n, capacity = 40, 30
	g := startGateway(t, opts{workers: 2, command: []string{self},
		env: []string{roleEnv + "=gated@0/1", roleDirEnv + "=" + dir},
		// No queue or drain deadline may strike during the test: only the kill.
		args: []string{"-capacity", strconv.Itoa(capacity), "-drain-timeout", "10m", "-migrate-timeout", "60s", "-queue-timeout", "60s"}})
	all, bySlot := joinPlayers(t, g, n)
	gatedPID := g.status().Workers[0].PID
	keep, other := bySlot[0], bySlot[1]
	k1, k2 := len(keep)/3, len(keep)/3
	finished := g.ctlStart("reload", "-migrate", "-timeout", "120s")

	waitFor(t, "slot 1's sessions moved and the gated worker asked", 60*time.Second, func() (bool, string) {
		st := g.status()
		return st.Migration.Resumed == uint64(len(other)) && asked(st, gatedPID), migration(st)
	})
	release(t, dir, k1)
	waitFor(t, fmt.Sprintf("the gated worker to hand back %d sessions, all acked", k1), 30*time.Second, func() (bool, string) {
		st := g.status()
		h := len(handed(dir))
		return h == k1 && st.Migration.Resumed == uint64(len(other)+k1) && st.Migration.Migrating == 0,
			fmt.Sprintf("%d handed back; %s", h, migration(st))
	})
	acked := handed(dir)
	gen := int(g.status().Generation)
	var fillers []*client
	for range 2*capacity - len(other) - k1 {
		c, err := dial(g.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.c.Close() })
		if c.generation() != gen {
			t.Fatalf("a new client was served by generation %d: %s", c.generation(), c.greeting)
		}
		fillers = append(fillers, c)
	}
	release(t, dir, k1+k2)
	waitFor(t, fmt.Sprintf("batond to hold %d handed-back sessions that no worker has room for", k2), 30*time.Second, func() (bool, string) {
		st := g.status()
		h := len(handed(dir))
		return h == k1+k2 && st.Migration.Migrating == k2, fmt.Sprintf("%d handed back; %s", h, migration(st))
	})
	// The instant: the gated worker owns len(keep)-k1-k2 sessions, batond k2, the new workers
	// len(other)+k1 and the fillers.
	g.crash()
	// Room for the restarted batond's self-check (its probe connection).
	for _, c := range fillers[:2] {
		c.c.Close()
	}
	fillers = fillers[2:]
	g.restart()

	lost := 0
	for _, p := range all {
		slot, _ := p.worker()
		switch {
		case slot == 1 || acked[p.port()]:
			p.goesOn(t, "acked before the crash", 1, gen)
		case handed(dir)[p.port()]: // held by batond at the crash
			if gone, err := p.ended(); !gone {
				t.Errorf("player %d, held by batond at the crash, still served (or broken otherwise: %v)", p.id, err)
			}
			lost++
		default:
			p.goesOn(t, "never handed back", 0, 1)
		}
	}
	for i, c := range fillers {
		if err := c.echo(fmt.Sprintf("filler %d", i)); err != nil {
			t.Errorf("new client %d of the new generation broke: %v", i, err)
		}
	}
	left := len(keep) - k1 - k2
	want := len(other) + k1 + len(fillers) + left
	waitFor(t, "the restarted batond to count every session that goes on", 30*time.Second, func() (bool, string) {
		st := g.status()
		old := 0
		for _, w := range st.Workers {
			if w.PID == gatedPID {
				old = w.Clients
			}
		}
		return st.Clients == want && old == left && int(st.Generation) == gen && st.Gateway.InFlight == 0,
			fmt.Sprintf("want %d clients, %d on the old worker: %s %+v", want, left, migration(st), st.Workers)
	})
	if lost != k2 {
		t.Errorf("%d sessions ended, want exactly the %d batond held", lost, k2)
	}
	t.Logf("kill -9 of batond holding %d handed-back sessions: those %d ended; %d acked before, %d new clients and %d never handed back went on",
		k2, lost, len(other)+k1, len(fillers), left)

	// The old worker drains as without migration: it leaves when its last session ends.
	for _, p := range keep {
		if !handed(dir)[p.port()] {
			p.c.Close()
		}
	}
	fd, err := unix.PidfdOpen(gatedPID, 0)
	if err == nil {
		defer unix.Close(fd)
		if !pidfdWait(fd, 20*time.Second) {
			t.Errorf("the old worker still runs 20s after its last session ended")
		}
	}
	if code, out := finished(); code != 0 {
		t.Errorf("batonctl reload -migrate across the crash: exit %d:\n%s", code, out)
	} else {
		t.Logf("batonctl reload -migrate across the crash: %s", strings.TrimSpace(out))
	}
}

// A worker that declines keeps its sessions and drains as without migration: status counts
// them declined, they go on echoing on the old worker (no move, their generation), and the old
// worker exits once they end. Nothing is lost; the other old worker's sessions all move.
func TestMigrateFaultDeclined(t *testing.T) {
	dir := t.TempDir()
	self, _ := os.Executable()
	g := startGateway(t, opts{workers: 2, command: []string{self},
		env:  []string{roleEnv + "=decliner@0/1", roleDirEnv + "=" + dir},
		args: []string{"-drain-timeout", "10m", "-migrate-timeout", "30s"}})
	const n = 40
	_, bySlot := joinPlayers(t, g, n)
	declinerPID := g.status().Workers[0].PID
	keep, other := bySlot[0], bySlot[1]
	finished := g.ctlStart("reload", "-migrate", "-timeout", "90s")
	waitFor(t, "slot 1's sessions moved and slot 0's declined", 60*time.Second, func() (bool, string) {
		st := g.status()
		m := st.Migration
		return m.Resumed == uint64(len(other)) && m.Declined == uint64(len(keep)) && m.Migrating == 0, migration(st)
	})
	st := g.status()
	found := false
	for _, w := range st.Workers {
		if w.PID == declinerPID {
			found = true
			if w.Generation != 1 || w.State != "draining" || w.Clients != len(keep) {
				t.Errorf("the declining worker: %+v; want generation 1, draining, %d clients", w, len(keep))
			}
		}
	}
	if !found {
		t.Fatalf("the declining worker (pid %d) is not listed: %+v", declinerPID, st.Workers)
	}
	if code, out := g.ctl("status"); code != 0 || !strings.Contains(out, fmt.Sprintf("%d declined", len(keep))) {
		t.Errorf("batonctl status does not count the %d declined sessions (exit %d):\n%s", len(keep), code, out)
	}
	for _, p := range other {
		p.goesOn(t, "moved", 1, int(st.Generation))
	}
	for _, p := range keep {
		p.goesOn(t, "declined", 0, 1)
	}
	if !alive(declinerPID) {
		t.Fatal("the declining worker exited with its sessions open")
	}
	for _, p := range keep {
		p.c.Close()
	}
	code, out := finished()
	if code != 0 || !strings.Contains(out, fmt.Sprintf("migrated %d sessions (handed back %d, declined %d, lost 0)", len(other), len(other), len(keep))) {
		t.Errorf("batonctl reload -migrate: exit %d, want 0 with %d moved and %d declined:\n%s", code, len(other), len(keep), out)
	}
	if alive(declinerPID) {
		t.Errorf("the declining worker still runs after its sessions ended and batonctl saw it gone")
	}
	t.Logf("%d sessions declined stayed on the old worker until they ended; %d moved: %s", len(keep), len(other), strings.TrimSpace(out))
}
