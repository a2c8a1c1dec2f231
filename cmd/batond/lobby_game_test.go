package main

import (
	"fmt"
	"io"
	"strings"
	"testing"
	"time"
)

// The lobby as a game server behind a real batond: across a reload, the old worker tells its
// players, keeps them until the drain deadline, and then (SIGTERM from batond) says goodbye to
// each before it exits; the new generation serves new players, and /stats names each worker's
// generation.
func TestPythonLobbyGoodbyeAtDrainDeadline(t *testing.T) {
	g := startGateway(t, opts{
		workers: 1,
		args:    append([]string{"-drain-timeout", "3s"}, pythonArgs...),
		command: pythonWorker(t, lobbyScript),
	})
	waitAllReady(t, g, 1)
	const step = 20 * time.Second

	players := make([]*lobbyClient, 2)
	for i := range players {
		c, err := dialLobby(g.addr, step)
		if err != nil {
			t.Fatalf("player %d: %v", i, err)
		}
		defer c.c.Close()
		players[i] = c
		name := fmt.Sprintf("p%d", i)
		if err := c.send(name, step); err != nil {
			t.Fatal(err)
		}
		if _, err := c.expect(step, prefixed("* "+name+" joined [lobby]"), nil); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	old := players[0]
	if players[1].pid != old.pid {
		t.Fatalf("one worker, two pids: %d and %d", old.pid, players[1].pid)
	}
	if err := old.send("/stats", step); err != nil {
		t.Fatal(err)
	}
	wantStats := fmt.Sprintf("stats: %s; 2 clients (2 named) in 1 rooms", old.where)
	if s, err := old.expect(step, prefixed(wantStats), nil); err != nil {
		t.Fatalf("/stats: want %q: %q, %v", wantStats, s, err)
	}

	// A reload: the new batond drains the old generation's workers and enforces the deadline.
	// (An operator drain, batonctl drain SLOT, does not send SIGTERM at its deadline today.)
	drained := time.Now()
	if code, out := g.ctl("reload"); code != 0 {
		t.Fatalf("reload: exit %d: %s", code, out)
	}
	for i, c := range players {
		if _, err := c.expect(step, prefixed("* this server is being replaced"), nil); err != nil {
			t.Fatalf("player %d: no drain notice: %v", i, err)
		}
	}

	// A new player goes to the replacement, which reports its own process.
	fresh, err := dialLobby(g.addr, step)
	if err != nil {
		t.Fatalf("new player: %v", err)
	}
	defer fresh.c.Close()
	if fresh.pid == old.pid || fresh.where == old.where {
		t.Fatalf("new player on the drained worker: %q", fresh.where)
	}
	if err := fresh.send("/stats", step); err != nil {
		t.Fatal(err)
	}
	wantStats = fmt.Sprintf("stats: %s; 1 clients (0 named) in 0 rooms", fresh.where)
	if s, err := fresh.expect(step, prefixed(wantStats), nil); err != nil {
		t.Fatalf("/stats on the replacement: want %q: %q, %v", wantStats, s, err)
	}

	// The old players keep playing until the deadline, then each reads the goodbye and EOF.
	if err := players[1].send("still here", step); err != nil {
		t.Fatal(err)
	}
	if _, err := old.expect(step, prefixed("[lobby] p1: still here"), nil); err != nil {
		t.Fatalf("the drained worker stopped serving before its deadline: %v", err)
	}
	const goodbye = "* this server is shutting down: goodbye! (reconnect to play on)"
	for i, c := range players {
		if _, err := c.expect(step, func(s string) bool { return s == goodbye }, nil); err != nil {
			t.Fatalf("player %d: no goodbye: %v", i, err)
		}
		if s, err := c.line(); err != io.EOF {
			t.Fatalf("player %d: after the goodbye: %q, %v (want EOF)", i, s, err)
		}
	}
	if waited := time.Since(drained); waited < 2*time.Second {
		t.Fatalf("goodbye after %v, before the 3s drain deadline", waited)
	}
	waitFor(t, "the drained worker gone", step, func() (bool, string) {
		for _, w := range g.status().Workers {
			if w.PID == old.pid {
				return false, fmt.Sprintf("pid %d still listed: %+v", old.pid, w)
			}
		}
		return true, ""
	})
}

func prefixed(p string) func(string) bool {
	return func(s string) bool { return strings.HasPrefix(s, p) }
}
