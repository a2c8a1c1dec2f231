package main

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// upgraded is the one line a player of the demo sees when its session moved to a new worker.
var upgraded = regexp.MustCompile(`^\* the server was upgraded to generation (\d+); you are now on worker (\d+) \((\d+) lines echoed so far\)$`)

// player is a demo session that counts what it echoed and expects the count to survive moves.
type player struct {
	*client
	id    int
	lines int // lines echoed so far, in every worker
	moves int // upgrade lines seen
	gen   int // generation of the worker serving it, from the last greeting or upgrade line
}

// say sends one numbered line and reads its echo, accepting one upgrade line before it (the
// session moved since the last line): its count must be exactly the lines echoed so far.
func (p *player) say() error {
	s := fmt.Sprintf("player %d line %d", p.id, p.lines)
	p.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := p.c.Write([]byte(s + "\n")); err != nil {
		return err
	}
	for {
		line, err := p.r.ReadString('\n')
		if err != nil {
			return fmt.Errorf("after %d lines: %w", p.lines, err)
		}
		line = strings.TrimRight(line, "\n")
		if m := upgraded.FindStringSubmatch(line); m != nil {
			n, _ := strconv.Atoi(m[3])
			if n != p.lines {
				return fmt.Errorf("moved with a count of %d lines, echoed %d", n, p.lines)
			}
			p.gen, _ = strconv.Atoi(m[1])
			p.moves++
			continue
		}
		if line != s {
			return fmt.Errorf("sent %q, got %q", s, line)
		}
		p.lines++
		return nil
	}
}

// A migrating reload moves every session, with its state, to the new generation: each player
// sees one upgrade line carrying its exact count and nothing else changes; the old workers are
// gone within seconds, not at the drain deadline (10 minutes here).
func TestMigratingReloadMovesSessions(t *testing.T) {
	g := startGateway(t, opts{workers: 2, args: []string{"-drain-timeout", "10m", "-migrate-timeout", "5s"}})
	const n = 40
	ps := make([]*player, n)
	for i := range ps {
		c, err := dial(g.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.c.Close() })
		ps[i] = &player{client: c, id: i, gen: c.generation()}
		for range 3 {
			if err := ps[i].say(); err != nil {
				t.Fatalf("player %d: %v", i, err)
			}
		}
	}
	for round := 1; round <= 3; round++ {
		before := g.status()
		start := time.Now()
		code, out := g.ctl("reload", "-migrate", "-timeout", "60s")
		took := time.Since(start)
		if code != 0 {
			t.Fatalf("round %d: batonctl reload -migrate: exit %d\n%s\n%s", round, code, out, g.log)
		}
		if !strings.Contains(out, fmt.Sprintf("migrated %d sessions (handed back %d, declined 0, lost 0)", n, n)) {
			t.Fatalf("round %d: outcome does not say all %d moved:\n%s", round, n, out)
		}
		st := g.status()
		for _, w := range st.Workers {
			if w.Generation != st.Generation {
				t.Fatalf("round %d: a worker of generation %d is left: %+v", round, w.Generation, w)
			}
		}
		for _, w := range before.Workers {
			if w.PID != 0 && alive(w.PID) {
				t.Fatalf("round %d: old worker pid %d still runs", round, w.PID)
			}
		}
		if st.Clients != n || st.Migration.Resumed != n {
			t.Fatalf("round %d: %d clients, %d resumed; want %d", round, st.Clients, st.Migration.Resumed, n)
		}
		for _, p := range ps {
			for range 2 {
				if err := p.say(); err != nil {
					t.Fatalf("round %d, player %d: %v\n%s", round, p.id, err, g.log)
				}
			}
			if p.moves != round || p.gen != int(st.Generation) {
				t.Fatalf("round %d, player %d: moved %d times, on generation %d (serving %d)", round, p.id, p.moves, p.gen, st.Generation)
			}
		}
		t.Logf("round %d: reload -migrate of %d sessions took %v: %s", round, n, took.Round(time.Millisecond), strings.TrimSpace(out))
	}
}

// alive says whether process pid still runs. An exited worker may stay a zombie for a while
// (its batond has gone, and whoever inherits it reaps late), which kill(pid, 0) still finds;
// its pidfd is readable once it has exited, reaped or not (batonctl checks the same way).
func alive(pid int) bool {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return err != unix.ESRCH && syscall.Kill(pid, 0) != syscall.ESRCH
	}
	defer unix.Close(fd)
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(p, 0)
	return err != nil || n == 0
}

// batonctl migrate SLOT moves one worker's sessions to the others without a reload: the slot
// gets a fresh worker, its players see one upgrade line with their exact count, the other
// slot's players see nothing, and status counts the move. Then -all moves everyone.
func TestBatonctlMigrateSlot(t *testing.T) {
	g := startGateway(t, opts{workers: 2, args: []string{"-drain-timeout", "10m", "-migrate-timeout", "5s"}})
	var ps []*player
	for i := 0; i < 30; i++ {
		c, err := dial(g.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.c.Close() })
		p := &player{client: c, id: i, gen: c.generation()}
		if err := p.say(); err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	before := g.status()
	slot0 := 0
	for _, p := range ps {
		if s, _ := p.worker(); s == 0 {
			slot0++
		}
	}
	if slot0 == 0 || slot0 == len(ps) {
		t.Fatalf("%d of %d players on slot 0: need some on each slot", slot0, len(ps))
	}
	code, out := g.ctl("migrate", "-wait", "30s", "0")
	if code != 0 {
		t.Fatalf("batonctl migrate 0: exit %d\n%s\n%s", code, out, g.log)
	}
	if want := fmt.Sprintf("migrated %d sessions (handed back %d, declined 0, lost 0)", slot0, slot0); !strings.Contains(out, want) {
		t.Fatalf("output does not say %q:\n%s", want, out)
	}
	for _, w := range before.Workers {
		if w.Slot == 0 && alive(w.PID) {
			t.Fatalf("slot 0's old worker pid %d still runs", w.PID)
		}
	}
	for _, p := range ps {
		s, _ := p.worker()
		for range 2 {
			if err := p.say(); err != nil {
				t.Fatalf("player %d (slot %d): %v", p.id, s, err)
			}
		}
		if want := map[bool]int{true: 1, false: 0}[s == 0]; p.moves != want {
			t.Fatalf("player %d on slot %d saw %d upgrade lines, want %d", p.id, s, p.moves, want)
		}
	}
	st := g.status()
	if st.Migration.Resumed != uint64(slot0) || st.Clients != len(ps) {
		t.Fatalf("status: %d resumed, %d clients; want %d, %d", st.Migration.Resumed, st.Clients, slot0, len(ps))
	}
	// A slot that does not exist is refused, and nothing is drained.
	if code, out := g.ctl("migrate", "5"); code != 1 || !strings.Contains(out, "no such slot") {
		t.Fatalf("migrate 5: exit %d: %s", code, out)
	}
	code, out = g.ctl("migrate", "-wait", "30s", "-all")
	if code != 0 || !strings.Contains(out, fmt.Sprintf("migrated %d sessions", len(ps))) {
		t.Fatalf("batonctl migrate -all: exit %d\n%s", code, out)
	}
	for _, p := range ps {
		if err := p.say(); err != nil {
			t.Fatalf("player %d after -all: %v", p.id, err)
		}
	}
}
