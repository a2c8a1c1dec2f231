package daemon

import (
	"context"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/baton-gw/baton/cmd/internal/admin"
)

// drainProgressEvery is how often a stopping batond logs how far the drain is.
const drainProgressEvery = 2 * time.Second

// lifecycle owns batond's phase (starting, serving, stopping) and the deadline that goes with
// it; reloading is serving while a reload runs.
type lifecycle struct {
	mu    sync.Mutex
	phase admin.Phase
	by    time.Time // starting: the health gate's deadline; stopping: the workers' stop deadline
}

func (l *lifecycle) set(p admin.Phase, by time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.phase, l.by = p, by
}

func (l *lifecycle) get() (admin.Phase, time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.phase, l.by
}

// setPhase fills st's phase and its sentence.
func (d *daemon) setPhase(st *admin.Status) {
	p, by := d.life.get()
	left := max(time.Until(by), 0).Round(time.Second)
	st.Phase = p
	switch p {
	case admin.PhaseStarting:
		st.PhaseDetail = fmt.Sprintf("starting: %d of %d workers ready, waiting up to %v", d.sup.ReadyCount(), d.cfg.Workers, left)
	case admin.PhaseServing:
		st.PhaseDetail = "serving"
		if rec := d.LastReload(); rec.State == admin.ReloadRunning {
			st.Phase, st.PhaseDetail = admin.PhaseReloading, "reloading: "+reloadingDetail(rec)
		}
	case admin.PhaseStopping:
		n := 0
		for _, w := range st.Workers {
			if w.PID != 0 && w.State != "stopped" {
				n++
			}
		}
		st.PhaseDetail = fmt.Sprintf("stopping: draining %d workers, %d clients, %v left", n, st.Clients, left)
	}
}

// shutdown is the graceful stop on the first SIGTERM/SIGINT. The admin socket answers
// throughout; a second SIGTERM/SIGINT cuts the drain short (the workers get SIGTERM at once,
// then SIGKILL); progress is logged every few seconds.
func (d *daemon) shutdown(first os.Signal, sigs <-chan os.Signal) {
	d.log.Info("stopping: no new clients; the workers drain (a second SIGTERM or SIGINT stops at once)",
		"signal", first, "stop_timeout", d.cfg.StopTimeout)
	d.notify.stopping()
	d.life.set(admin.PhaseStopping, time.Now().Add(d.cfg.StopTimeout))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		d.stop(ctx)
	}()
	tick := time.NewTicker(drainProgressEvery)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case s := <-sigs:
			switch {
			case s == syscall.SIGHUP:
				d.log.Warn("SIGHUP while stopping: ignored")
			case ctx.Err() == nil:
				d.log.Warn("second signal: stopping at once: SIGTERM to every worker now, SIGKILL to those still running after the kill grace", "signal", s)
				cancel()
			}
		case <-tick.C:
			st := d.Status()
			d.log.Info(st.PhaseDetail)
		}
	}
}

// stop is the graceful stop: no new clients, in-flight handoffs finish, workers drain (until
// ctx ends or -stop-timeout), then the generation is marked stopped cleanly.
func (d *daemon) stop(ctx context.Context) {
	d.gw.StopAccepting()
	// The gateway closed its copies of the listeners; tableflip holds more (for the next
	// batond). Close those now too: without systemd nothing else holds the listening sockets,
	// so new clients are refused at once (a balancer in front retries elsewhere) instead of
	// waiting in a backlog that nobody accepts from and being reset when we exit. Under
	// systemd the socket unit keeps its own copy: clients wait for the restarted batond.
	d.upg.Stop()
	ictx, cancel := context.WithTimeout(ctx, d.cfg.HandoffTimeout+time.Second)
	d.gw.WaitIdle(ictx)
	cancel()
	d.life.set(admin.PhaseStopping, time.Now().Add(d.cfg.StopTimeout))
	sctx, cancel := context.WithTimeout(ctx, d.cfg.StopTimeout)
	d.sup.Stop(sctx, d.cfg.StopTimeout)
	cancel()
	d.gw.Close()
	d.markStopped()
	d.log.Info("stopped")
}
