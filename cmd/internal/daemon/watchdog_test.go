package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/baton-gw/baton/proxy"
)

func TestWatchdogTimeout(t *testing.T) {
	const self = 4242
	for _, c := range []struct {
		usec, pid string
		upgraded  bool
		want      time.Duration
		err       bool
	}{
		{"", "", false, 0, false},                      // no watchdog
		{"3000000", "", false, 3 * time.Second, false}, // no WATCHDOG_PID: for us
		{"3000000", "4242", false, 3 * time.Second, false},
		{"3000000", "17", false, 0, false},              // another process's
		{"3000000", "17", true, 3 * time.Second, false}, // our tableflip parent's: we are MainPID now
		{"abc", "", false, 0, true},
		{"0", "", false, 0, true},
		{"-5", "4242", false, 0, true},
	} {
		env := map[string]string{"WATCHDOG_USEC": c.usec, "WATCHDOG_PID": c.pid}
		got, err := watchdogTimeout(func(k string) string { return env[k] }, self, c.upgraded)
		if got != c.want || (err != nil) != c.err || (err != nil && !errors.Is(err, errWatchdogEnv)) {
			t.Errorf("WATCHDOG_USEC=%q WATCHDOG_PID=%q upgraded=%v: %v, %v; want %v, error %v", c.usec, c.pid, c.upgraded, got, err, c.want, c.err)
		}
	}
}

// The watchdog sends WATCHDOG=1 to systemd's notify socket (a real one here) every third of
// the timeout while the gateway is alive, nothing while it is not, again once it recovers, and
// stops for good when the gateway is closed.
func TestWatchdogFeedsOnlyWhileAlive(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)

	var wedged, closed atomic.Bool
	alive := func(maxAge time.Duration) error {
		switch {
		case maxAge != 150*time.Millisecond:
			return fmt.Errorf("maxAge %v, want half the timeout", maxAge)
		case closed.Load():
			return fmt.Errorf("%w: %w", proxy.ErrNotAlive, proxy.ErrClosed)
		case wedged.Load():
			return fmt.Errorf("%w: wedged", proxy.ErrNotAlive)
		}
		return nil
	}
	w := watchdog{timeout: 300 * time.Millisecond, alive: alive, send: notifier{log: hclog.NewNullLogger()}.send, log: hclog.NewNullLogger()}
	done := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { defer close(done); w.run(ctx) }()

	// count reads the datagrams that arrive within d.
	count := func(d time.Duration) int {
		n := 0
		buf := make([]byte, 256)
		deadline := time.Now().Add(d)
		for {
			conn.SetReadDeadline(deadline)
			k, err := conn.Read(buf)
			if err != nil {
				return n
			}
			if got := string(buf[:k]); got != "WATCHDOG=1" {
				t.Errorf("notify socket got %q, want WATCHDOG=1", got)
			}
			n++
		}
	}
	if n := count(time.Second); n < 5 || n > 12 {
		t.Errorf("%d WATCHDOG=1 in 1s while alive, want about 10 (every 100ms, a third of 300ms)", n)
	}
	wedged.Store(true)
	count(150 * time.Millisecond) // one may have been on its way
	if n := count(time.Second); n != 0 {
		t.Errorf("%d WATCHDOG=1 in 1s while not alive, want none", n)
	}
	wedged.Store(false)
	if n := count(time.Second); n < 5 {
		t.Errorf("%d WATCHDOG=1 in 1s after recovering, want about 10", n)
	}
	closed.Store(true)
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("the watchdog still runs 2s after the gateway closed")
	}
	count(50 * time.Millisecond)
}
