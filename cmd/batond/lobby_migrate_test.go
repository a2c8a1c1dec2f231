package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The Python lobby under live session migration: 200 players in 20 rooms (10 per worker) chat
// with numbered lines while five migrating reloads alternate the lobby's release (v1, v2).
// Every player keeps its name and room and sees exactly one upgrade line per reload, a room's
// players land on one worker, and every chat line reaches every member of the sender's room
// exactly once, in the order sent; the old workers are gone within seconds of each reload.
func TestPythonLobbyMigratingReloads(t *testing.T) {
	dir := t.TempDir()
	versionFile := filepath.Join(dir, "version")
	setVersion := func(v string) {
		if err := os.WriteFile(versionFile, []byte(v), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	setVersion("v1")
	lobby := pythonWorker(t, lobbyScript)
	// The release label is read when each worker starts: a reload after writing the file
	// starts the next release, as a deployment that switches releases/current would.
	script := fmt.Sprintf(`exec %s %s --version "$(cat %s)"`, lobby[0], lobby[1], versionFile)
	g := startGateway(t, opts{
		workers: 2,
		args:    append([]string{"-drain-timeout", "10m", "-migrate-timeout", "15s"}, pythonArgs...),
		command: []string{"sh", "-c", script},
	})
	waitAllReady(t, g, 2)

	const n, roomsPerWorker = 200, 10
	const step = 30 * time.Second
	ps := make([]*chatPlayer, n)
	t.Cleanup(func() {
		for _, p := range ps {
			if p != nil {
				p.c.Close()
			}
		}
	})
	perSlot := map[int]int{}
	for i := range ps {
		lc, err := dialLobby(g.addr, step)
		if err != nil {
			t.Fatalf("player %d: %v", i, err)
		}
		lc.c.SetDeadline(time.Time{})
		room := fmt.Sprintf("s%dr%d", lc.slot, perSlot[lc.slot]%roomsPerWorker)
		perSlot[lc.slot]++
		ps[i] = &chatPlayer{c: lc.c, name: fmt.Sprintf("p%d", i), room: room, slot: lc.slot, done: make(chan struct{})}
		go ps[i].read(lc.r)
		if err := ps[i].say(ps[i].name + "\n/join " + room); err != nil {
			t.Fatal(err)
		}
	}
	rooms := map[string][]*chatPlayer{}
	for _, p := range ps {
		rooms[p.room] = append(rooms[p.room], p)
	}
	if len(rooms) != 2*roomsPerWorker {
		t.Fatalf("players spread over %d rooms, want %d (per worker: %v)", len(rooms), 2*roomsPerWorker, perSlot)
	}
	// Once /who lists the whole room, every join notice has come before it: from here on,
	// only chat and upgrade lines may come.
	for _, p := range ps {
		want := whoLine(p.room, rooms[p.room])
		waitFor(t, fmt.Sprintf("%s: %q", p.name, want), step, func() (bool, string) {
			if !p.hasPrefix("* " + p.name + " joined [" + p.room + "] ") {
				return false, p.tail()
			}
			if err := p.say("/who"); err != nil {
				return false, err.Error()
			}
			time.Sleep(200 * time.Millisecond)
			return p.markAfter(want), p.tail()
		})
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.chat(stop, 300*time.Millisecond)
		}()
	}
	stopChat := sync.OnceFunc(func() { close(stop); wg.Wait() })
	t.Cleanup(stopChat)

	versions := []string{"v2", "v1", "v2", "v1", "v2"}
	for round, v := range versions {
		time.Sleep(1500 * time.Millisecond) // chat on the current release first
		before := g.status()
		setVersion(v)
		start := time.Now()
		code, out := g.ctl("reload", "-migrate", "-timeout", "120s")
		if code != 0 {
			t.Fatalf("reload %d: batonctl reload -migrate: exit %d\n%s\n%s", round+1, code, out, g.log)
		}
		want := fmt.Sprintf("migrated %d sessions (handed back %d, declined 0, lost 0)", n, n)
		if !strings.Contains(out, want) {
			t.Fatalf("reload %d: outcome does not say %q:\n%s", round+1, want, out)
		}
		waitFor(t, "the old workers to exit", 10*time.Second, func() (bool, string) {
			for _, w := range before.Workers {
				if w.PID != 0 && alive(w.PID) {
					return false, fmt.Sprintf("pid %d (generation %d) still runs", w.PID, w.Generation)
				}
			}
			return true, ""
		})
		st := g.status()
		for _, w := range st.Workers {
			if w.Generation != st.Generation {
				t.Fatalf("reload %d: a worker of generation %d is left: %+v", round+1, w.Generation, w)
			}
		}
		t.Logf("reload %d to %s: %v, %s", round+1, v, time.Since(start).Round(time.Millisecond), strings.TrimSpace(out))
		for _, p := range ps {
			waitFor(t, fmt.Sprintf("%s's upgrade line %d", p.name, round+1), step, func() (bool, string) {
				return len(p.upgrades()) >= round+1, p.tail()
			})
		}
	}
	time.Sleep(1500 * time.Millisecond) // chat on the last release too
	stopChat()

	// Every line each member sent reaches every member of its room.
	for _, p := range ps {
		for _, m := range rooms[p.room] {
			last := m.sent() - 1
			want := fmt.Sprintf("[%s] %s: line %d", p.room, m.name, last)
			waitFor(t, fmt.Sprintf("%s to get %q", p.name, want), step, func() (bool, string) {
				return p.has(want), p.tail()
			})
		}
	}
	for room, members := range rooms {
		for _, p := range members {
			if err := p.check(members, versions); err != nil {
				t.Errorf("[%s] %s: %v", room, p.name, err)
			}
		}
		// The room stayed together: all its members name the same worker on each move.
		for r := range versions {
			slot := members[0].upgrades()[r].slot
			for _, p := range members[1:] {
				if s := p.upgrades()[r].slot; s != slot {
					t.Errorf("[%s] split by reload %d: %s on worker %d, %s on worker %d", room, r+1, members[0].name, slot, p.name, s)
				}
			}
		}
	}
	// Names and rooms survived: /who lists exactly the room's players.
	for room, members := range rooms {
		want := whoLine(room, members)
		p := members[0]
		p.mark()
		if err := p.say("/who"); err != nil {
			t.Fatal(err)
		}
		waitFor(t, fmt.Sprintf("%s: %q", p.name, want), step, func() (bool, string) { return p.markAfter(want), p.tail() })
	}
}

// whoLine is the lobby's answer to /who in room.
func whoLine(room string, members []*chatPlayer) string {
	names := make([]string, len(members))
	for i, m := range members {
		names[i] = m.name
	}
	sort.Strings(names)
	return fmt.Sprintf("in [%s]: %s", room, strings.Join(names, ", "))
}

// chatPlayer is a lobby client whose every received line is kept, in order, by a reader
// goroutine.
type chatPlayer struct {
	c          net.Conn
	name, room string
	slot       int
	done       chan struct{} // closed when the reader stops
	mu         sync.Mutex
	lines      []string
	from       int // index of the first line checked (after the joins)
	nextChats  int // chat lines written so far
}

var upgradeLine = regexp.MustCompile(`^\* the server was upgraded to (v\d+); you are now on worker (\d+)$`)

type upgrade struct {
	version string
	slot    int
}

func (p *chatPlayer) read(r *bufio.Reader) {
	defer close(p.done)
	for range 1_000_000 { // bounded: far more lines than the test sends
		s, err := r.ReadString('\n')
		if err != nil {
			return
		}
		p.mu.Lock()
		p.lines = append(p.lines, strings.TrimRight(s, "\r\n"))
		p.mu.Unlock()
	}
}

func (p *chatPlayer) say(s string) error {
	p.c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := p.c.Write([]byte(s + "\n"))
	return err
}

// chat sends "line 0", "line 1", ... every interval until stop.
func (p *chatPlayer) chat(stop <-chan struct{}, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		p.mu.Lock()
		k := p.nextChats
		p.mu.Unlock()
		if p.say(fmt.Sprintf("line %d", k)) != nil {
			return // the check reports what is missing
		}
		p.mu.Lock()
		p.nextChats++
		p.mu.Unlock()
	}
}

func (p *chatPlayer) sent() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.nextChats
}

func (p *chatPlayer) mark() {
	p.mu.Lock()
	p.from = len(p.lines)
	p.mu.Unlock()
}

// markAfter moves the start of the checked lines past the first line equal to line at or after
// it; false if there is none.
func (p *chatPlayer) markAfter(line string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := p.from; i < len(p.lines); i++ {
		if p.lines[i] == line {
			p.from = i + 1
			return true
		}
	}
	return false
}

func (p *chatPlayer) has(line string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range p.lines {
		if s == line {
			return true
		}
	}
	return false
}

func (p *chatPlayer) hasPrefix(prefix string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range p.lines {
		if strings.HasPrefix(s, prefix) {
			return true
		}
	}
	return false
}

func (p *chatPlayer) tail() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return fmt.Sprintf("%d lines, last: %q", len(p.lines), p.lines[max(0, len(p.lines)-5):])
}

func (p *chatPlayer) upgrades() []upgrade {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []upgrade
	for _, s := range p.lines[p.from:] {
		if m := upgradeLine.FindStringSubmatch(s); m != nil {
			slot, _ := strconv.Atoi(m[2])
			out = append(out, upgrade{m[1], slot})
		}
	}
	return out
}

// check: after the joins, only chat lines of the room's members (each sender's numbers 0, 1,
// 2, ... up to its last, once each and in order) and one upgrade line per reload, naming the
// versions in turn.
func (p *chatPlayer) check(members []*chatPlayer, versions []string) error {
	next := map[string]int{}
	for _, m := range members {
		next[m.name] = 0
	}
	chat := regexp.MustCompile(`^\[` + regexp.QuoteMeta(p.room) + `\] (p\d+): line (\d+)$`)
	var ups []string
	p.mu.Lock()
	lines := append([]string(nil), p.lines[p.from:]...)
	p.mu.Unlock()
	for _, s := range lines {
		if m := upgradeLine.FindStringSubmatch(s); m != nil {
			ups = append(ups, m[1])
			continue
		}
		m := chat.FindStringSubmatch(s)
		if m == nil {
			if strings.HasPrefix(s, "in ["+p.room+"]: ") {
				continue // the /who at the end
			}
			return fmt.Errorf("unexpected line %q", s)
		}
		want, ok := next[m[1]]
		if !ok {
			return fmt.Errorf("a line from %s, not of this room: %q", m[1], s)
		}
		if k, _ := strconv.Atoi(m[2]); k != want {
			return fmt.Errorf("from %s: line %d where %d was due (lost, duplicated or reordered)", m[1], k, want)
		}
		next[m[1]]++
	}
	for _, m := range members {
		if got, sent := next[m.name], m.sent(); got != sent {
			return fmt.Errorf("got %d of the %d lines %s sent", got, sent, m.name)
		}
	}
	if strings.Join(ups, ",") != strings.Join(versions, ",") {
		return fmt.Errorf("upgrade lines for %v, want exactly %v", ups, versions)
	}
	return nil
}
