package supervisor

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A worker is a process group. batond starts each worker as the leader of its own group, so a
// launcher (`sh -c`, a wrapper script, `uv run`, `python -m`) and everything it starts share
// one group: a registration from any member is the worker's, and killing the worker kills and
// waits for every member. Processes that leave the group (setsid, setpgid) are on their own.

// groupOf returns the process group of pid.
func groupOf(pid int) (int, error) {
	pg, err := unix.Getpgid(pid)
	if err != nil {
		return 0, os.NewSyscallError("getpgid", err)
	}
	return pg, nil
}

// killableGroup says whether pgid may be signalled as a whole: never batond's own group, and
// never a group that leads a session (a login shell's: a worker registered by hand from a
// terminal would otherwise take the operator's shell with it).
func killableGroup(pgid int) bool {
	if pgid <= 1 || pgid == syscall.Getpgrp() {
		return false
	}
	sid, err := unix.Getsid(pgid)
	return err != nil || sid != pgid
}

// groupMembers lists the processes whose process group is pgid, from /proc.
func groupMembers(pgid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pg, live := statPgrp(pid); live && pg == pgid {
			out = append(out, pid)
		}
	}
	return out
}

// statPgrp reads field 5 (pgrp) of /proc/PID/stat; live is false for a process that has
// exited (a zombie, state Z or X: it holds nothing, and its reaping is its parent's business,
// which may be a container's init that never reaps). The command name in field 2 may contain
// spaces and parentheses, so fields are counted after its last ')'.
func statPgrp(pid int) (pgrp int, live bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	return parseStat(b)
}

func parseStat(b []byte) (pgrp int, live bool) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, false
	}
	f := bytes.Fields(b[i+1:]) // state, ppid, pgrp, ...
	if len(f) < 3 {
		return 0, false
	}
	pg, err := strconv.Atoi(string(f[2]))
	return pg, err == nil && string(f[0]) != "Z" && string(f[0]) != "X"
}

// killGroup SIGKILLs every member of pgid and waits, through a pidfd on each, until none is
// left. Members forked while it works are found by the next scan; the scans are bounded by ctx.
func killGroup(ctx context.Context, pgid int) error {
	if !killableGroup(pgid) {
		return nil
	}
	pause := time.Millisecond
	for {
		members := groupMembers(pgid)
		if len(members) == 0 {
			return nil
		}
		_ = unix.Kill(-pgid, unix.SIGKILL)
		for _, pid := range members {
			if err := waitGone(ctx, pid); err != nil {
				return fmt.Errorf("process group %d: %w", pgid, err)
			}
		}
		// A member forked meanwhile is found by the next scan; no scan follows another at once.
		select {
		case <-ctx.Done():
			return fmt.Errorf("process group %d still has members: %w", pgid, ctx.Err())
		case <-time.After(pause):
			pause = min(2*pause, 100*time.Millisecond)
		}
	}
}

// signalGroup sends sig to every member of pgid (SIGTERM at a drain deadline or a stop).
func signalGroup(pgid int, sig syscall.Signal) {
	if killableGroup(pgid) {
		_ = unix.Kill(-pgid, sig)
	}
}

// waitGone waits until pid has exited (a zombie counts: its parent reaps it, not us).
func waitGone(ctx context.Context, pid int) error {
	p, err := OpenProcess(pid)
	if err != nil {
		return nil // already gone (ESRCH)
	}
	defer p.Close()
	select {
	case <-p.Exited():
		return nil
	case <-ctx.Done():
		return fmt.Errorf("pid %d: %w", pid, ctx.Err())
	case <-time.After(time.Minute):
		return fmt.Errorf("pid %d survived SIGKILL for a minute", pid)
	}
}
