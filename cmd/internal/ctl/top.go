package ctl

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"golang.org/x/term"

	"github.com/baton-gw/baton/cmd/internal/admin"
)

// topView is a live view for an operator at a console. Plain ANSI (the alternate screen, a full
// redraw each interval) with golang.org/x/term for raw mode: the view is one table redrawn once
// a second, which needs no widget library.
func topView(c *admin.Client, timeout time.Duration, args []string, stdout, stderr io.Writer) int {
	cmd := newCommand("batonctl top", "batonctl [-admin PATH] top [-interval D]",
		"A live view of batond: phase, clients, accept and handoff rates, handoff latency,\n"+
			"generations and workers, redrawn every interval. q (or Ctrl-C) quits. Needs a terminal;\n"+
			"scripts use 'status -json' or 'workers'.")
	interval := cmd.fs.Duration("interval", time.Second, "redraw every `D`")
	if code, done := cmd.parse(args, 0, stdout, stderr); done {
		return code
	}
	fd := int(os.Stdin.Fd())
	if !term.IsTerminal(fd) {
		fmt.Fprintln(stderr, "batonctl: top needs a terminal (scripts: 'batonctl status -json' or 'batonctl workers')")
		return exitFailed
	}
	old, err := term.MakeRaw(fd)
	if err != nil {
		fmt.Fprintln(stderr, "batonctl: top:", err)
		return exitFailed
	}
	defer term.Restore(fd, old)
	fmt.Fprint(stdout, "\x1b[?1049h\x1b[?25l") // alternate screen, no cursor
	defer fmt.Fprint(stdout, "\x1b[?25h\x1b[?1049l")
	// The key reader blocks in read(2) on the terminal; it ends with the process.
	keys := make(chan byte, 8)
	go func() {
		b := make([]byte, 1)
		for {
			if n, err := os.Stdin.Read(b); err != nil || n == 0 {
				close(keys)
				return
			}
			keys <- b[0]
		}
	}()
	t := time.NewTicker(*interval)
	defer t.Stop()
	var prev *sample
	for {
		cur := fetch(c, timeout)
		fmt.Fprint(stdout, "\x1b[H\x1b[2J"+strings.ReplaceAll(render(prev, cur), "\n", "\r\n"))
		if cur.err == nil {
			prev = &cur
		}
		select {
		case k, ok := <-keys:
			if !ok || k == 'q' || k == 'Q' || k == 3 { // 3: Ctrl-C in raw mode
				return exitOK
			}
		case <-t.C:
		}
	}
}

type sample struct {
	at  time.Time
	st  admin.Status
	err error
}

func fetch(c *admin.Client, timeout time.Duration) sample {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	st, err := c.Status(ctx)
	return sample{at: time.Now(), st: st, err: err}
}

// render draws one screen; rates are the change since prev.
func render(prev *sample, cur sample) string {
	var b strings.Builder
	if cur.err != nil {
		fmt.Fprintf(&b, "batonctl top · %s · q quits\n\n%v\n(retrying)\n", cur.at.Format("15:04:05"), cur.err)
		return b.String()
	}
	st, g := cur.st, cur.st.Gateway
	// A counter is only comparable with the same batond's: a reload or a restart starts a new
	// batond whose counters begin at zero, and a decrease is such a reset whatever the pid says.
	// Then there is no rate for this interval ("—"), never an unsigned difference that wrapped.
	rate := func(now, before uint64) string {
		if prev == nil || prev.st.PID != st.PID || now < before {
			return "—"
		}
		dt := cur.at.Sub(prev.at).Seconds()
		return fmt.Sprintf("%.1f/s", float64(now-before)/max(dt, 1e-3))
	}
	var pg admin.Status
	if prev != nil {
		pg = prev.st
	}
	fmt.Fprintf(&b, "batond pid %d · generation %d · %s · %s · q quits\n", st.PID, st.Generation, st.PhaseDetail, cur.at.Format("15:04:05"))
	fmt.Fprintf(&b, "clients %d · draining workers %d · host drained: %v\n", st.Clients, st.Draining, st.HostDrained)
	fmt.Fprintf(&b, "accepted %d (%s) · handed off %d (%s) · closed by gateway %d (%s) · in flight %d\n",
		g.Accepted, rate(g.Accepted, pg.Gateway.Accepted), g.Acked, rate(g.Acked, pg.Gateway.Acked),
		g.ClosedTotal(), rate(g.ClosedTotal(), pg.Gateway.ClosedTotal()), g.InFlight)
	fmt.Fprintf(&b, "handoff latency p50 %v · p99 %v (%d handoffs)\n", st.Handoff.P50, st.Handoff.P99, st.Handoff.Count)
	byGen := map[uint64]int{}
	for _, w := range st.Workers {
		byGen[w.Generation] += w.Clients
	}
	gens := make([]uint64, 0, len(byGen))
	for gen := range byGen {
		gens = append(gens, gen)
	}
	sort.Slice(gens, func(i, j int) bool { return gens[i] > gens[j] })
	b.WriteString("generations:")
	for _, gen := range gens {
		fmt.Fprintf(&b, " %d (%d clients)", gen, byGen[gen])
	}
	b.WriteString("\n\n")
	workerTable(&b, st)
	return b.String()
}
