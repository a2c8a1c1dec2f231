package agent

import (
	"bufio"
	"context"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/baton-gw/baton/roster"
)

func w(gen uint64, state roster.State, clients, capacity int) roster.Worker {
	return roster.Worker{Generation: gen, State: state, Connected: true, Clients: clients, Capacity: capacity}
}

func TestReply(t *testing.T) {
	for _, c := range []struct {
		name    string
		ws      []roster.Worker
		drained bool
		want    string
	}{
		{"drained host", []roster.Worker{w(2, roster.Ready, 0, 100)}, true, "drain\n"},
		{"nobody", nil, false, "down#no ready workers\n"},
		{"only starting", []roster.Worker{w(2, roster.Starting, 0, 100)}, false, "down#no ready workers\n"},
		{"only old generation", []roster.Worker{w(1, roster.Draining, 40, 100)}, false, "down#no ready workers\n"},
		{"idle", []roster.Worker{w(2, roster.Ready, 0, 100), w(2, roster.Ready, 0, 100)}, false, "up ready 100% maxconn:200\n"},
		// 150 of 200 free; 90 clients in all (40 on a draining old worker).
		{"mixed", []roster.Worker{w(2, roster.Ready, 30, 100), w(2, roster.Ready, 20, 100), w(1, roster.Draining, 40, 100)}, false, "up ready 75% maxconn:240\n"},
		{"nearly full", []roster.Worker{w(2, roster.Ready, 999, 1000)}, false, "up ready 1% maxconn:1000\n"},
		{"full", []roster.Worker{w(2, roster.Ready, 100, 100)}, false, "up ready 0% maxconn:100\n"},
		{"disconnected is not serving", []roster.Worker{{Generation: 2, State: roster.Ready, Capacity: 100}}, false, "down#no ready workers\n"},
	} {
		if got := Reply(c.ws, 2, c.drained, true); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
		// Outside the window after an undrain: the same without "ready", which would end an
		// operator's MAINT or DRAIN set through HAProxy's runtime API.
		want := strings.Replace(c.want, "up ready ", "up ", 1)
		if got := Reply(c.ws, 2, c.drained, false); got != want {
			t.Errorf("%s, no undrain lately: %q, want %q", c.name, got, want)
		}
	}
}

type fakeSource struct {
	drained     atomic.Bool
	undrainedAt atomic.Int64 // unix nanoseconds; 0: never
}

func (f *fakeSource) Workers() []roster.Worker { return []roster.Worker{w(1, roster.Ready, 1, 4)} }
func (f *fakeSource) Generation() uint64       { return 1 }
func (f *fakeSource) HostDrained() bool        { return f.drained.Load() }
func (f *fakeSource) UndrainedAt() time.Time {
	if n := f.undrainedAt.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

func TestServerAnswersEachConnection(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	src := &fakeSource{}
	s := NewServer(l, src, hclog.NewNullLogger())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	check := func(want string) {
		t.Helper()
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || line != want {
			t.Fatalf("agent said %q (%v), want %q", line, err, want)
		}
	}
	check("up 75% maxconn:4\n") // never undrained: no "ready"
	src.drained.Store(true)
	check("drain\n")
	src.drained.Store(false)
	src.undrainedAt.Store(time.Now().UnixNano())
	check("up ready 75% maxconn:4\n") // undoes the drain it said
	src.undrainedAt.Store(time.Now().Add(-ReadyWindow - time.Second).UnixNano())
	check("up 75% maxconn:4\n")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
