package suite

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"
)

// Reaper runs argv as its child, as a child subreaper that reaps every process re-parented to
// it, and returns once it has no child left. It stands where systemd stands for a real batond:
// after a reload the old batond exits and its workers become orphans; whoever inherits them must
// reap them as they exit, or they linger as zombies and `batonctl reload -migrate`, which waits
// until the old workers no longer exist (kill 0), waits for that reaping too. The suite itself is
// a subreaper but reaps only when a configuration stops (it cannot tell orphans from its own
// children started through os/exec, whose Wait must get their status).
//
// SIGTERM and SIGINT do not stop it: it goes on reaping until its children are gone (the suite
// signals every descendant, then SIGKILLs what is left).
func Reaper(args []string, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		return errors.New("usage: baton-bench reaper [--] command [args...]")
	}
	if err := becomeSubreaper(); err != nil {
		return fmt.Errorf("prctl(PR_SET_CHILD_SUBREAPER): %w", err)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	// Only now: an ignored signal stays ignored across exec, and the child must keep SIGTERM.
	// Its exit is collected below (wait4), not by cmd.Wait.
	signal.Ignore(syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	first := cmd.Process.Pid
	code := 0
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.ECHILD):
			if code != 0 {
				return fmt.Errorf("%s exited with status %d", args[0], code)
			}
			return nil
		case err != nil:
			return fmt.Errorf("wait4: %w", err)
		}
		if pid == first && ws.Exited() {
			code = ws.ExitStatus()
		}
	}
}
