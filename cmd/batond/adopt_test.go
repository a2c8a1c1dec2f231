package main

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/baton-gw/baton/supervisor"
)

// After a kill -9 of batond (no systemd: the listener dies with it), the restarted batond
// adopts the surviving workers back into their slots: the same four pids serve, with their
// sessions, in the same generation, and new clients go to the least loaded of them. No fresh
// worker is started.
func TestAdoptionAfterCrash(t *testing.T) {
	g := startGateway(t, opts{workers: 4, args: []string{"-drain-timeout", "5m", "-adopt-window", "5s"}})
	waitAllReady(t, g, 4)
	before := g.status()
	pids := map[int]int{}
	for _, w := range before.Workers {
		pids[w.Slot] = w.PID
	}
	held := holdSessions(t, g.addr, 200)
	g.crash()
	held.check("with batond down")
	g.restart()
	after := g.status()
	if after.Generation != before.Generation {
		t.Errorf("generation %d after the crash, want %d unchanged", after.Generation, before.Generation)
	}
	if len(after.Workers) != 4 {
		t.Fatalf("%d workers after the restart, want exactly the 4 adopted: %+v", len(after.Workers), after.Workers)
	}
	for _, w := range after.Workers {
		if w.PID != pids[w.Slot] || !w.Adopted || w.State != supervisor.StateReady || w.Generation != before.Generation {
			t.Errorf("slot %d: %+v, want pid %d adopted and ready in generation %d", w.Slot, w, pids[w.Slot], before.Generation)
		}
	}
	if after.Clients != 200 {
		t.Errorf("%d clients counted after adoption, want the 200 held", after.Clients)
	}
	held.check("after the restart")
	if code, out := g.ctl("status"); code != 0 || !strings.Contains(out, "adopted") {
		t.Errorf("batonctl status does not say the slots were adopted (exit %d):\n%s", code, out)
	}
	// New clients: least loaded first. The 200 are spread evenly (±1); 40 more keep it so.
	var extra []*client
	for i := 0; i < 40; i++ {
		c, err := dial(g.addr)
		if err != nil {
			t.Fatal(err)
		}
		extra = append(extra, c)
	}
	defer func() {
		for _, c := range extra {
			c.c.Close()
		}
	}()
	waitFor(t, "240 clients spread evenly over the 4 adopted workers", 10*time.Second, func() (bool, string) {
		st := g.status()
		lo, hi, n := 1<<30, 0, 0
		for _, w := range st.Workers {
			lo, hi, n = min(lo, w.Clients), max(hi, w.Clients), n+w.Clients
		}
		return n == 240 && hi-lo <= 1, fmt.Sprintf("%+v", st.Workers)
	})
	for _, w := range g.status().Workers {
		if w.PID != pids[w.Slot] {
			t.Errorf("slot %d is served by pid %d, not the adopted %d", w.Slot, w.PID, pids[w.Slot])
		}
	}
	checkInvariant(t, g)
}
