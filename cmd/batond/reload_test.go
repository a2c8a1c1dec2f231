package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/baton-gw/baton/cmd/internal/admin"
	"github.com/baton-gw/baton/supervisor"
)

// ctl runs batonctl against g and returns its exit code and output.
func (g *gateway) ctl(args ...string) (int, string) {
	g.t.Helper()
	cmd := exec.Command(bins.batonct, append([]string{"-admin", filepath.Join(g.dir, "admin.sock")}, args...)...)
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), string(out)
	}
	if err != nil {
		g.t.Fatal(err)
	}
	return 0, string(out)
}

// sessions holds n long-lived demo sessions and checks them on demand.
type sessions struct {
	t  *testing.T
	cs []*client
}

func holdSessions(t *testing.T, addr string, n int) *sessions {
	t.Helper()
	s := &sessions{t: t}
	for i := 0; i < n; i++ {
		c, err := dial(addr)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.echo("hi"); err != nil {
			t.Fatal(err)
		}
		s.cs = append(s.cs, c)
	}
	t.Cleanup(s.close)
	return s
}

func (s *sessions) check(what string) {
	s.t.Helper()
	for i, c := range s.cs {
		if err := c.echo(fmt.Sprintf("%s %d", what, i)); err != nil {
			s.t.Fatalf("session %d (%s) broke %s: %v", i, c.greeting, what, err)
		}
	}
}

func (s *sessions) close() {
	for _, c := range s.cs {
		c.c.Close()
	}
	s.cs = nil
}

// background runs short clients at ~rate/s until stopped and returns the failures.
type background struct {
	stop chan struct{}
	res  chan *load
}

func startBackground(addr string, rate int) *background {
	b := &background{stop: make(chan struct{}), res: make(chan *load, 1)}
	go func() { b.res <- runLoad(addr, rate, b.stop, nil) }()
	return b
}

func (b *background) finish(t *testing.T) *load {
	t.Helper()
	close(b.stop)
	l := <-b.res
	if n := l.failed.Load(); n != 0 {
		t.Errorf("%d background clients failed: %v", n, l.failures)
	}
	return l
}

// A reload under load: new clients go to the new generation, old sessions play on, old workers
// exit when their last session ends, and nothing fails.
func TestReloadKeepsSessions(t *testing.T) {
	g := startGateway(t, opts{workers: 2})
	held := holdSessions(t, g.addr, 20)
	bg := startBackground(g.addr, 100)
	time.Sleep(300 * time.Millisecond)
	code, out := g.ctl("reload")
	if code != 0 || !strings.Contains(out, "generation 1") || !strings.Contains(out, "generation 2") {
		t.Fatalf("reload: exit %d: %s", code, out)
	}
	time.Sleep(300 * time.Millisecond)
	l := bg.finish(t)
	t.Logf("background clients during the reload: %d ok", l.ok.Load())
	held.check("after the reload")
	c, err := dial(g.addr)
	if err != nil || c.generation() != 2 {
		t.Fatalf("a new client after the reload: %v %q", err, c.greeting)
	}
	c.c.Close()
	st := g.status()
	if st.Generation != 2 || st.Draining == 0 {
		t.Errorf("status after reload: generation %d, %d draining", st.Generation, st.Draining)
	}
	var old []int
	for _, w := range st.Workers {
		if w.Generation == 1 {
			old = append(old, w.PID)
			if w.State != supervisor.StateDraining {
				t.Errorf("old worker %d is %s, not draining", w.PID, w.State)
			}
		}
	}
	held.close()
	waitFor(t, "old workers to exit once their sessions end", 10*time.Second, func() (bool, string) {
		for _, pid := range old {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
				return false, fmt.Sprintf("pid %d alive", pid)
			}
		}
		for _, w := range g.status().Workers {
			if w.Generation != 2 {
				return false, fmt.Sprintf("status still lists %+v", w)
			}
		}
		return true, ""
	})
	checkInvariant(t, g)
}

// Every way a reload can fail leaves the old generation serving, undisturbed, and says why.
func TestReloadFailures(t *testing.T) {
	dir := t.TempDir()
	bin := ownBinary(t, dir)
	conf := filepath.Join(dir, "baton.toml")
	good := "workers = 2\nready_timeout = \"4s\"\nstart_timeout = \"3s\"\n"
	os.WriteFile(conf, []byte(good), 0o644)
	g := startGateway(t, opts{binary: bin, workers: 2, args: []string{"-config", conf}})
	pid0 := g.status().PID
	held := holdSessions(t, g.addr, 10)
	goodBinary, _ := os.ReadFile(bin)

	for _, c := range []struct {
		name   string
		break_ func()
		reason string
	}{
		{"binary does not start", func() {
			os.Remove(bin) // a deploy swaps the file, never writes over a running binary
			os.WriteFile(bin, []byte("this is not a program\n"), 0o755)
		}, "can't start child"},
		{"bad config", func() {
			os.WriteFile(conf, []byte(good+"\nworkers = = 3\n"), 0o644)
		}, conf + ":5:"},
		{"workers crash at start", func() {
			os.WriteFile(conf, []byte(good+"command = [\"sh\", \"-c\", \"echo dying >&2; exit 7\"]\n"), 0o644)
		}, "exit status 7"},
		{"workers never ready", func() {
			os.WriteFile(conf, []byte(good+"command = [\"sleep\", \"600\"]\n"), 0o644)
		}, "0 of 2 workers ready"},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.break_()
			bg := startBackground(g.addr, 100)
			code, out := g.ctl("reload")
			bg.finish(t)
			if code != 1 || !strings.Contains(out, c.reason) {
				t.Errorf("reload: exit %d, want 1 with %q:\n%s", code, c.reason, out)
			}
			held.check("after a failed reload")
			st := g.status()
			if st.PID != pid0 || st.Generation != 1 {
				t.Errorf("after a failed reload status is pid %d generation %d; want the old batond %d, generation 1", st.PID, st.Generation, pid0)
			}
			for _, w := range st.Workers {
				if w.Generation != 1 || w.State != supervisor.StateReady {
					t.Errorf("worker %+v: the old generation must be untouched", w)
				}
			}
			// the failed generation's workers are gone
			waitFor(t, "no process of the failed generation left", 10*time.Second, func() (bool, string) {
				out, _ := exec.Command("pgrep", "-f", "sleep 600").Output()
				return len(strings.TrimSpace(string(out))) == 0, string(out)
			})
			// repair for the next case
			os.Remove(bin)
			os.WriteFile(bin, goodBinary, 0o755)
			os.WriteFile(conf, []byte(good), 0o644)
		})
	}
	// And it recovers: a good reload after all that.
	code, out := g.ctl("reload")
	if code != 0 {
		t.Fatalf("reload after repairs: exit %d: %s", code, out)
	}
	held.check("after the good reload")
	checkInvariant(t, g)
}

// The next reload works at once however much is still draining: five reloads in a row while
// sessions of three generations are open.
func TestFiveReloadsWithThreeGenerationsDraining(t *testing.T) {
	g := startGateway(t, opts{workers: 2})
	var all []*sessions
	for gen := 1; gen <= 3; gen++ {
		all = append(all, holdSessions(t, g.addr, 5))
		if gen < 3 {
			if code, out := g.ctl("reload"); code != 0 {
				t.Fatalf("reload %d: %s", gen, out)
			}
		}
	}
	bg := startBackground(g.addr, 100)
	for i := 0; i < 5; i++ {
		start := time.Now()
		if code, out := g.ctl("reload"); code != 0 {
			t.Fatalf("reload %d of 5: exit %d: %s", i+1, code, out)
		}
		t.Logf("reload %d took %v", i+1, time.Since(start).Round(time.Millisecond))
	}
	bg.finish(t)
	// Draining workers re-register with each new batond (with backoff), so let status settle.
	var st admin.Status
	waitFor(t, "5 sessions in each of generations 1-3 in status", 15*time.Second, func() (bool, string) {
		st = g.status()
		gens := map[uint64]int{}
		for _, w := range st.Workers {
			gens[w.Generation] += w.Clients
		}
		return gens[1] == 5 && gens[2] == 5 && gens[3] == 5, fmt.Sprint(gens)
	})
	if st.Generation != 8 {
		t.Errorf("generation %d after 7 reloads, want 8", st.Generation)
	}
	for i, s := range all {
		s.check(fmt.Sprintf("generation %d after five reloads", i+1))
	}
	checkInvariant(t, g)
}

var _ = context.Background
var _ sync.Mutex
var _ atomic.Int64
