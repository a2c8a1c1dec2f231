package systemd_test

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestAdoptionUnderSystemd (issue 10, items 3 and 7): 4 workers hold 200 sessions; batond is
// killed (kill -9), then hangs (SIGSTOP, so that systemd's watchdog kills it). Each time systemd
// starts batond again and it adopts the workers back into their slots: exactly the same 4 pids
// serve, in the same generation, marked adopted in `batonctl status`; every session goes on,
// with its client counted; new clients go to the least loaded workers.
//
// It waits on adoption in the daemon (a restarted batond keeps its generation and adopts).
func TestAdoptionUnderSystemd(t *testing.T) {
	const workers = 4
	h := startBaton(t, workers)
	before := h.status()
	pids := map[int]int{}
	for _, w := range before.Workers {
		pids[w.Slot] = w.PID
	}
	closeSessions := h.holdSessions(200)
	defer closeSessions()
	want := 200
	h.spread("before any crash", want)
	for _, crash := range []string{"kill -9", "SIGSTOP"} {
		switch crash {
		case "kill -9":
			h.kill()
		case "SIGSTOP":
			h.watchdogKill(crash)
		}
		h.adopted(crash, before.Generation, pids, want)
		h.sessionsFlow("after " + crash)
		if out, err := h.ns.run(20*time.Second, bins.batonctl, "-admin", "/run/baton/admin.sock", "status"); err != nil || !strings.Contains(out, "adopted") {
			t.Errorf("after %s: batonctl status does not say the slots were adopted (%v):\n%s", crash, err, out)
		}
		// New clients: to the least loaded, so the adopted workers' counts stay even.
		stop := h.holdSessions(40)
		defer stop()
		want += 40
		h.spread("40 new clients after "+crash, want)
		for _, w := range h.status().Workers {
			if w.PID != pids[w.Slot] {
				t.Errorf("after %s: slot %d is served by pid %d, not the adopted %d", crash, w.Slot, w.PID, pids[w.Slot])
			}
		}
	}
	if n := h.ns.show("baton.service", "NRestarts"); n != "2" {
		t.Errorf("NRestarts=%s, want 2", n)
	}
	closeSessions()
	if n := h.tr.failures(); n > 0 {
		t.Errorf("%d client failures:\n%s", n, h.tr.failureLog())
	}
}

// adopted checks that the serving batond has exactly the workers of pids, in generation gen,
// each adopted and ready, and counts the n clients they hold.
func (h *harness) adopted(what string, gen uint64, pids map[int]int, n int) {
	h.t.Helper()
	ok, last := waitFor(15*time.Second, func() (bool, string) {
		st, err := h.ns.batonStatus()
		if err != nil {
			return false, err.Error()
		}
		if st.Generation != gen || len(st.Workers) != len(pids) || st.Clients != n {
			return false, st.String()
		}
		for _, w := range st.Workers {
			if w.PID != pids[w.Slot] || !w.Adopted || w.State != "ready" || w.Generation != gen {
				return false, st.String()
			}
		}
		return true, ""
	})
	if !ok {
		h.t.Errorf("%s: want generation %d unchanged, exactly the %d workers %v, adopted and ready, with %d clients:\n%s",
			what, gen, len(pids), pids, n, last)
	}
}

// spread waits until the workers hold n clients in all, evenly (±1): least load first.
func (h *harness) spread(what string, n int) {
	h.t.Helper()
	ok, last := waitFor(15*time.Second, func() (bool, string) {
		st, err := h.ns.batonStatus()
		if err != nil {
			return false, err.Error()
		}
		lo, hi, sum := 1<<30, 0, 0
		for _, w := range st.Workers {
			lo, hi, sum = min(lo, w.Clients), max(hi, w.Clients), sum+w.Clients
		}
		return sum == n && hi-lo <= 1, fmt.Sprint(st)
	})
	if !ok {
		h.t.Errorf("%s: want %d clients spread evenly (±1) over the workers:\n%s", what, n, last)
	}
}
