package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/baton-gw/baton/proxy"
)

// systemd's watchdog (WatchdogSec= in baton.service): batond sends WATCHDOG=1 every third of
// the timeout, but only while its gateway proves it works (proxy.Gateway.Alive: the
// housekeeping goroutine, which takes the dispatch lock, went round recently). A batond that is
// stopped, deadlocked or wedged stops feeding, and systemd kills it (SIGABRT, which makes the
// Go runtime print every goroutine's stack to the journal) and restarts it; its workers live
// on (KillMode=process).

// errWatchdogEnv: WATCHDOG_USEC is not a positive number of microseconds.
var errWatchdogEnv = errors.New("bad WATCHDOG_USEC")

// watchdogTimeout returns systemd's watchdog timeout for this process, 0 if it has none.
// WATCHDOG_PID names the process systemd started, which is not this one after a reload: the
// batond that tableflip starts inherits its parent's environment, becomes the main process
// (MAINPID=) and must feed the watchdog from then on. So the timeout applies when WATCHDOG_PID
// is unset or is this process, or when this batond was started by another batond (upgrade).
// (coreos/go-systemd's SdWatchdogEnabled says 0 in that last case.)
func watchdogTimeout(getenv func(string) string, pid int, upgraded bool) (time.Duration, error) {
	usec := getenv("WATCHDOG_USEC")
	if usec == "" {
		return 0, nil
	}
	n, err := strconv.ParseInt(usec, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("%w: %q", errWatchdogEnv, usec)
	}
	if wpid := getenv("WATCHDOG_PID"); wpid != "" && wpid != strconv.Itoa(pid) && !upgraded {
		return 0, nil // meant for another process (batond started by a watched one)
	}
	return time.Duration(n) * time.Microsecond, nil
}

// watchdog feeds systemd's watchdog while alive says batond works.
type watchdog struct {
	timeout time.Duration
	alive   func(maxAge time.Duration) error
	send    func(state string)
	log     hclog.Logger
}

// run sends WATCHDOG=1 at once and then every timeout/3 while alive(timeout/2) is nil, until
// ctx ends or the gateway is closed (batond is about to exit). When it is not alive, it says
// why once and sends nothing: systemd then restarts batond once the timeout has passed since
// the last WATCHDOG=1.
func (w watchdog) run(ctx context.Context) {
	t := time.NewTicker(w.timeout / 3)
	defer t.Stop()
	healthy := true
	for {
		err := w.alive(w.timeout / 2)
		switch {
		case errors.Is(err, proxy.ErrClosed):
			return // the end of a stop: nothing left to prove
		case err == nil:
			w.send("WATCHDOG=1")
			if !healthy {
				w.log.Info("batond works again: feeding systemd's watchdog again")
			}
		case healthy:
			w.log.Error("not feeding systemd's watchdog: systemd restarts batond if this lasts", "error", err, "watchdog_sec", w.timeout)
		}
		healthy = err == nil
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// startWatchdog starts feeding systemd's watchdog if the unit has one, and returns the function
// that stops feeding and waits for the feeder to end (idempotent): a batond handing over to the
// next one calls it, since the next one feeds from then on.
func (d *daemon) startWatchdog() (stop func()) {
	timeout, err := watchdogTimeout(os.Getenv, os.Getpid(), d.upg.HasParent())
	if err != nil {
		d.log.Error("systemd's watchdog is not fed", "error", err)
	}
	if timeout <= 0 {
		return func() {}
	}
	d.log.Info("feeding systemd's watchdog while the gateway works", "watchdog_sec", timeout, "every", timeout/3)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	w := watchdog{timeout: timeout, alive: d.gw.Alive, send: d.notify.send, log: d.log.Named("watchdog")}
	go func() {
		defer close(done)
		w.run(ctx)
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			cancel()
			<-done
		})
	}
}
