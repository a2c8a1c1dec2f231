package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/baton-gw/baton/cmd/internal/admin"
)

// askLost is how long batonctl keeps asking for the outcome when the answer to its request was
// lost (the batond that took it exited?) and its own wait is over; askTimeout bounds one ask.
const (
	askLost    = 3 * time.Second
	askTimeout = time.Second
)

func reload(c *admin.Client, timeout time.Duration, args []string, stdout, stderr io.Writer) int {
	cmd := newCommand("batonctl reload", "batonctl [-admin PATH] reload [-timeout D] | reload -status",
		"Starts the batond binary on disk as the next generation and waits for the outcome: exit 0\n"+
			"once the new batond serves, 1 (with the reason) if it failed and the running one keeps\n"+
			"serving, 3 if batonctl stopped waiting before the outcome was known (the reload goes on;\n"+
			"'batonctl reload -status' tells its outcome). A reload while another runs is refused (exit 1).\n"+
			"With -status, prints the latest reload's record: exit 0 succeeded (or none), 1 failed, 3 running.")
	wait := cmd.fs.Duration("timeout", 2*time.Minute, "stop waiting for the outcome after this long (exit 3)")
	onlyStatus := cmd.fs.Bool("status", false, "print the latest reload's record instead of starting one")
	migrate := cmd.fs.Bool("migrate", false, "the old workers hand their live sessions to the new ones; wait until the old generation is gone and say what moved")
	if code, done := cmd.parse(args, 0, stdout, stderr); done {
		return code
	}
	if *onlyStatus {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		rec, err := c.LastReload(ctx)
		if err != nil {
			fmt.Fprintln(stderr, "batonctl:", err)
			return exitFailed
		}
		return printRecord(stdout, stderr, rec)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *wait)
	defer cancel()
	before, err := c.Status(ctx)
	if err != nil {
		fmt.Fprintln(stderr, "batonctl:", err) // nothing was started
		return exitFailed
	}
	asked := time.Now()
	rec, err := c.Reload(ctx, *migrate)
	switch {
	case err == nil && *migrate:
		if code := printRecord(stdout, stderr, rec); code != exitOK {
			return code
		}
		dl, _ := ctx.Deadline()
		return awaitOldGeneration(c, before, time.Until(dl), stdout, stderr)
	case err == nil, errors.Is(err, admin.ErrReloadFailed):
		return printRecord(stdout, stderr, rec)
	case errors.Is(err, admin.ErrReloadRefused):
		fmt.Fprintf(stderr, "batonctl: %v\n'batonctl reload -status' tells the running reload's outcome\n", err)
		return exitFailed
	case errors.Is(err, admin.ErrTimeout):
		// Our wait is over: one last question, in case the outcome came meanwhile.
		return awaitOutcome(c, before, asked, time.Now(), *wait, stdout, stderr)
	case errors.Is(err, admin.ErrAnswerLost), errors.Is(err, admin.ErrNotRunning):
		// The request went out and its answer did not come back (the batond that took it
		// exited?): whoever answers the socket now knows the outcome.
		dl, _ := ctx.Deadline()
		return awaitOutcome(c, before, asked, later(dl, time.Now().Add(askLost)), *wait, stdout, stderr)
	default:
		fmt.Fprintln(stderr, "batonctl: reload:", err)
		return exitFailed
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// awaitOutcome asks GET /v1/reload until it reports the outcome of the reload this batonctl
// asked the batond `before` for, or until deadline: then the outcome is unknown (exit 3). It
// never reports a failure it has not been told of.
func awaitOutcome(c *admin.Client, before admin.Status, asked, deadline time.Time, waited time.Duration, stdout, stderr io.Writer) int {
	var last string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), askTimeout)
		rec, err := c.LastReload(ctx)
		cancel()
		switch {
		case err != nil:
			last = err.Error()
		case rec.FromPID == before.PID && !rec.Started.Before(asked.Add(-time.Second)) && rec.Done():
			return printRecord(stdout, stderr, rec)
		case rec.State == admin.ReloadRunning:
			last = "reloading: " + runningDetail(rec)
		default:
			last = fmt.Sprintf("the latest reload batond knows of is %s (from pid %d)", rec.State, rec.FromPID)
		}
		if time.Now().Add(100 * time.Millisecond).After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Fprintf(stderr, "batonctl: stopped waiting after %v before the reload's outcome was known: it may still be in progress (%s)\n"+
		"'batonctl reload -status' tells its outcome\n", waited, last)
	return exitPending
}

func runningDetail(rec admin.ReloadRecord) string {
	if rec.ToPID == 0 {
		return fmt.Sprintf("since %s, the next batond is starting", rec.Started.Format("15:04:05"))
	}
	return fmt.Sprintf("since %s, batond pid %d starting generation %d", rec.Started.Format("15:04:05"), rec.ToPID, rec.ToGeneration)
}

// printRecord prints a reload's record and returns the exit status it stands for.
func printRecord(stdout, stderr io.Writer, rec admin.ReloadRecord) int {
	took := rec.Finished.Sub(rec.Started).Round(time.Millisecond)
	switch rec.State {
	case admin.ReloadSucceeded:
		fmt.Fprintf(stdout, "reloaded: generation %d (pid %d) → generation %d (pid %d) in %v, finished %s\n",
			rec.FromGeneration, rec.FromPID, rec.ToGeneration, rec.ToPID, took, rec.Finished.Format(time.DateTime))
		return exitOK
	case admin.ReloadFailed:
		fmt.Fprintf(stderr, "batonctl: reload failed after %v: %s\nbatond pid %d (generation %d) keeps serving\n",
			took, rec.Error, rec.FromPID, rec.FromGeneration)
		return exitFailed
	case admin.ReloadRunning:
		fmt.Fprintf(stdout, "a reload from generation %d (pid %d) is in progress: %s\n", rec.FromGeneration, rec.FromPID, runningDetail(rec))
		return exitPending
	default:
		fmt.Fprintln(stdout, "no reload since this batond started")
		return exitOK
	}
}
