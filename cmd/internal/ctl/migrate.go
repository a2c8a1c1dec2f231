package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/baton-gw/baton/cmd/internal/admin"
	"golang.org/x/sys/unix"
)

func migrate(c *admin.Client, timeout time.Duration, args []string, stdout, stderr io.Writer) int {
	cmd := newCommand("batonctl migrate", "batonctl [-admin PATH] migrate [-wait D] (SLOT | -all)",
		"Moves the live sessions of a worker (or of every worker, and of every older generation's)\n"+
			"to other workers without a reload: the worker is drained, a fresh one starts in its slot,\n"+
			"and once that one is ready the drained worker hands each session over, socket and state.\n"+
			"Sessions it declines stay with it and drain as usual. Workers must take part (see README\n"+
			"\"Upgrading without waiting\"); a slot whose worker does not is refused (exit 1).\n"+
			"Waits until the drained workers are gone (or -wait passes, exit 3) and says what moved.")
	all := cmd.fs.Bool("all", false, "every slot's worker")
	wait := cmd.fs.Duration("wait", time.Minute, "wait this long for the drained workers to be gone")
	if code, done := cmd.parse(args, 1, stdout, stderr); done {
		return code
	}
	target := cmd.fs.Arg(0)
	switch {
	case *all && target != "", !*all && target == "":
		return usageError(stderr, cmd.name, "give one of SLOT, -all")
	case *all:
		target = "all"
	default:
		if _, err := strconv.Atoi(target); err != nil {
			return usageError(stderr, cmd.name, fmt.Sprintf("slot %q is not a number", target))
		}
	}
	before, ok := fetchStatus(c, timeout, stderr)
	if !ok {
		return exitFailed
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout+30*time.Second)
	defer cancel()
	res, err := c.Migrate(ctx, target)
	if err != nil {
		fmt.Fprintln(stderr, "batonctl: migrate:", err)
		return exitFailed
	}
	fmt.Fprintf(stdout, "asked %d worker(s) holding %d sessions to hand them over\n", res.Asked, res.Clients)
	gone := func(st admin.Status) bool {
		for _, w := range before.Workers {
			if w.PID != 0 && (target == "all" || strconv.Itoa(w.Slot) == target) && running(st, w.PID) {
				return false
			}
		}
		return true
	}
	return awaitMigration(c, before, gone, *wait, stdout, stderr)
}

// running says whether the worker with pid is still listed.
func running(st admin.Status, pid int) bool {
	for _, w := range st.Workers {
		if w.PID == pid {
			return true
		}
	}
	return false
}

// awaitMigration polls the status until done says the migrated workers are gone, or wait
// passes (exit 3), and says what moved since `before`.
func awaitMigration(c *admin.Client, before admin.Status, done func(admin.Status) bool, wait time.Duration, stdout, stderr io.Writer) int {
	start := time.Now()
	deadline := start.Add(wait)
	for {
		st, ok := fetchStatus(c, askTimeout, io.Discard)
		if ok && done(st) && st.Migration.Migrating == 0 {
			fmt.Fprintf(stdout, "%s in %v\n", migrationSummary(before, st), time.Since(start).Round(10*time.Millisecond))
			return exitOK
		}
		if time.Now().After(deadline) {
			msg := "no answer from batond"
			if ok {
				msg = migrationSummary(before, st) + " so far"
			}
			fmt.Fprintf(stderr, "batonctl: stopped waiting after %v with workers still holding sessions (declined, or still moving): %s\n", wait, msg)
			return exitPending
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// migrationSummary says what moved between two statuses of the same batond (a reload's new
// batond counts from zero, so before is then its own first status).
func migrationSummary(before, now admin.Status) string {
	b, n := before.Migration, now.Migration
	if before.PID != now.PID {
		b = n
		b.HandedBack, b.Resumed, b.Declined, b.Lost = 0, 0, 0, 0
	}
	return fmt.Sprintf("migrated %d sessions (handed back %d, declined %d, lost %d)",
		n.Resumed-b.Resumed, n.HandedBack-b.HandedBack, n.Declined-b.Declined, n.Lost-b.Lost)
}

// awaitOldGeneration follows a migrating reload: until every worker the old batond listed
// (before) has exited, then says what moved. The old workers re-register with the new batond
// only once the old one has handed over, so being absent from its status is not enough.
func awaitOldGeneration(c *admin.Client, before admin.Status, wait time.Duration, stdout, stderr io.Writer) int {
	gone := func(admin.Status) bool {
		for _, w := range before.Workers {
			if w.PID != 0 && alive(w.PID) {
				return false
			}
		}
		return true
	}
	return awaitMigration(c, before, gone, wait, stdout, stderr)
}

// alive says whether process pid still runs. A pidfd tells an exited process that nobody has
// reaped yet (a zombie, which kill(pid, 0) still finds) from a running one: it is readable
// once the process has exited. Without a pidfd (EPERM for another user's process on older
// kernels, say), kill(pid, 0) decides.
func alive(pid int) bool {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return !errors.Is(err, unix.ESRCH) && unix.Kill(pid, 0) != unix.ESRCH
	}
	defer unix.Close(fd)
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(p, 0)
	return err != nil || n == 0
}
