package supervisor

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/proxy"
	"github.com/baton-gw/baton/roster"
)

// Stop drains every worker (this generation's and others that registered), waits up to ctx for
// them to exit, then sends SIGTERM, waits KillGrace, then SIGKILL, each to the worker's whole
// process group; it returns once every process of every worker is gone (or could not be
// confirmed gone within the grace) and every goroutine of the supervisor has ended.
func (s *Supervisor) Stop(ctx context.Context, drain time.Duration) {
	procs, release, ok := s.finish(drain)
	if !ok {
		return
	}
	defer release()
	allExited := func(c <-chan struct{}) bool {
		for _, p := range procs {
			select {
			case <-p.Exited():
			case <-c:
				return false
			}
		}
		return true
	}
	if !allExited(ctx.Done()) {
		s.log.Warn("workers still running at the stop deadline")
		s.terminate(procs, s.log)
	}
	for _, p := range procs {
		s.reapGroup(p, s.log)
	}
	s.wg.Wait()
	s.out.closeAfter(time.Second)
}

// terminate ends workers that outstayed their deadline (a stop's, or a drain's): SIGTERM to
// each and its process group, KillGrace for them to exit, then SIGKILL and KillGrace more. It
// returns whether all of them exited. The one way batond ends a worker by force.
func (s *Supervisor) terminate(procs []*Process, log hclog.Logger) bool {
	exited := func() bool {
		grace := after(s.cfg.KillGrace)
		for _, p := range procs {
			select {
			case <-p.Exited():
			case <-grace:
				return false
			}
		}
		return true
	}
	pids := make([]int, len(procs))
	for i, p := range procs {
		pids[i] = p.PID()
	}
	log.Warn("sending SIGTERM", "pids", pids)
	for _, p := range procs {
		_ = p.Signal(unix.SIGTERM)
	}
	if exited() {
		return true
	}
	log.Warn("workers ignored SIGTERM; sending SIGKILL", "pids", pids)
	for _, p := range procs {
		_ = p.Signal(unix.SIGKILL)
	}
	if exited() {
		return true
	}
	log.Error("workers still running after SIGKILL", "pids", pids)
	return false
}

// Detach hands the workers over to the next batond after an upgrade: every worker is told to
// drain (it keeps its sessions and re-registers with the next batond, which gives it no new
// clients and takes its output over), this supervisor stops restarting anything and stops
// reading worker output. The processes are left running.
func (s *Supervisor) Detach(drain time.Duration) {
	_, release, ok := s.finish(drain)
	if !ok {
		return
	}
	release()
	s.out.close()
}

// finish ends supervision (no more restarts, no more registrations) once, tells every worker
// it knew to drain, and returns their processes, and release to call when done with them.
// ok is false if it had already finished. The handles of other generations' workers are
// duplicates: their watchers may close their own at any time.
func (s *Supervisor) finish(drain time.Duration) (procs []*Process, release func(), ok bool) {
	type drainee struct {
		e *roster.Entry
		b *proxy.Backend
	}
	var ds []drainee
	var dups []*Process
	release = func() {
		for _, p := range dups {
			p.Close()
		}
	}
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		return nil, release, false
	}
	s.stopping = true
	close(s.quit)
	for c := range s.admits {
		_ = c.SetReadDeadline(time.Now()) // a handshake under way ends now
	}
	for _, sl := range s.slots {
		if sl.proc != nil {
			procs = append(procs, sl.proc)
		}
		if sl.backend != nil {
			ds = append(ds, drainee{sl.entry, sl.backend})
		}
	}
	for sl := range s.retired {
		if sl.proc != nil {
			procs = append(procs, sl.proc)
		}
		if sl.backend != nil {
			ds = append(ds, drainee{sl.entry, sl.backend})
		}
	}
	for b, o := range s.others {
		ds = append(ds, drainee{o.entry, b})
		if p, err := o.proc.dup(); err == nil {
			dups = append(dups, p)
			procs = append(procs, p)
		}
	}
	s.mu.Unlock()
	for _, d := range ds {
		s.drain(d.e, d.b, drain)
	}
	return procs, release, true
}

// drain tells one worker to drain and records it.
func (s *Supervisor) drain(e *roster.Entry, b *proxy.Backend, d time.Duration) {
	_ = b.Drain(d)
	s.markDraining(e, time.Now().Add(d))
}

// markDraining records e's worker as draining until deadline.
func (s *Supervisor) markDraining(e *roster.Entry, deadline time.Time) {
	s.roster.Update(e, roster.Drained, func(w *roster.Worker) { w.State, w.DrainDeadline = roster.Draining, deadline })
}

// after is time.After as a done channel.
func after(d time.Duration) <-chan struct{} {
	c := make(chan struct{})
	time.AfterFunc(d, func() { close(c) })
	return c
}

// Status lists this generation's slots, then workers of other generations (from the roster).
func (s *Supervisor) Status() []WorkerStatus { return s.roster.Snapshot() }

// ReadyCount is the number of this generation's workers that are serving.
func (s *Supervisor) ReadyCount() int { return ReadyIn(s.roster.Snapshot(), s.cfg.Generation) }

// ReadyIn counts the workers of generation gen in ws that serve: ready, with their channel up.
func ReadyIn(ws []WorkerStatus, gen uint64) int {
	n := 0
	for _, w := range ws {
		if w.Generation == gen && w.State == roster.Ready && w.Connected {
			n++
		}
	}
	return n
}

// LastExits summarises why this generation's slots last exited, for a failed start's message.
func (s *Supervisor) LastExits() string {
	var parts []string
	for _, w := range s.roster.Snapshot() {
		if w.Generation != s.cfg.Generation {
			continue
		}
		if w.LastExit != "" {
			parts = append(parts, fmt.Sprintf("slot %d: %s after %d restarts", w.Slot, w.LastExit, w.Restarts))
		} else if w.State != roster.Ready {
			parts = append(parts, fmt.Sprintf("slot %d: %s", w.Slot, w.State))
		}
	}
	if len(parts) == 0 {
		return "no worker exited"
	}
	return strings.Join(parts, "; ")
}

func isDone(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
