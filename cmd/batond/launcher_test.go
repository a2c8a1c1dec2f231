package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/baton-gw/baton/supervisor"
)

// Workers started through launchers that fork: the process batond spawns is a shell, and the
// process that registers is its child. Both must serve; the slot's state follows the child.
func TestLaunchersThatFork(t *testing.T) {
	lobby := pythonWorker(t, lobbyScript)[1]
	for _, c := range []struct{ name, script string }{
		{"exec", "exec python3 " + lobby},
		{"child", "python3 " + lobby + "; echo done"},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := startGateway(t, opts{workers: 2, args: pythonArgs, command: []string{"sh", "-c", c.script}})
			waitAllReady(t, g, 2)
			for i := 0; i < 4; i++ {
				lc, err := dialLobby(g.addr, 10*time.Second)
				if err != nil {
					t.Fatalf("client %d: %v", i, err)
				}
				lc.c.Close()
			}
			st := g.status()
			for _, w := range st.Workers {
				if w.State != supervisor.StateReady || w.Restarts != 0 {
					t.Errorf("worker %+v: want ready, never restarted", w)
				}
				if c.name == "child" && pgidOf(t, w.PID) == w.PID {
					t.Errorf("worker pid %d leads its group: the registering process should be the shell's child", w.PID)
				}
			}
		})
	}
}

// A wrapper whose child never registers is killed, with its child, at the start timeout: no
// process of it is left behind.
func TestWrapperKilledAsGroupAtStartTimeout(t *testing.T) {
	build(t)
	dir := t.TempDir()
	marker := filepath.Join(dir, "started")
	// The wrapper starts a child that never registers and waits for it.
	script := fmt.Sprintf("sleep 600 & echo $! >> %s; wait", marker)
	g := startGatewayNoWait(t, opts{workers: 1, command: []string{"sh", "-c", script},
		args: []string{"-start-timeout", "2s", "-ready-timeout", "60s"}})
	var first []int
	waitFor(t, "the wrapper's child to start", 20*time.Second, func() (bool, string) {
		b, _ := os.ReadFile(marker)
		first = nil
		for _, f := range strings.Fields(string(b)) {
			pid, _ := strconv.Atoi(f)
			first = append(first, pid)
		}
		return len(first) > 0, string(b)
	})
	child := first[0]
	pgid := pgidOf(t, child)
	if pgid == child || pgid == 0 {
		t.Fatalf("the child %d should be in its wrapper's group, not lead one (pgid %d)", child, pgid)
	}
	waitFor(t, "the never-ready wrapper and its child to be killed", 30*time.Second, func() (bool, string) {
		for _, pid := range []int{child, pgid} {
			if running(pid) {
				return false, fmt.Sprintf("pid %d still running", pid)
			}
		}
		return true, ""
	})
	waitFor(t, "the start timeout in batond's log", 10*time.Second, func() (bool, string) {
		return strings.Contains(g.log.String(), supervisor.ErrNeverReady.Error()), ""
	})
}

// pgidOf reads a process's group from /proc (0 if it is gone).
func pgidOf(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	pg, _ := strconv.Atoi(f[2])
	return pg
}

// running says whether pid exists and is not a zombie (a zombie waits for its parent, which
// may be a container's init that never reaps; it runs nothing).
func running(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(f) > 0 && f[0] != "Z" && f[0] != "X"
}
