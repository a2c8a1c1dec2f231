package supervisor

import (
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/baton-gw/baton/handoff"
	"github.com/baton-gw/baton/proxy"
	"github.com/baton-gw/baton/roster"
)

// admitOwn attaches a worker of this generation to its slot. The peer must be the slot's
// process or a member of its process group (a launcher's child), or, in the adoption window
// after a crash, the survivor that claims a slot nobody holds. Anyone else presenting the
// slot's token gets SLOT; a survivor that missed the adoption window keeps its sessions and
// is drained like a worker of another generation.
func (s *Supervisor) admitOwn(ch *handoff.Channel, info proxy.BackendInfo, welcome []byte, peer *Process) {
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		s.rejectPeer(ch, peer, handoff.CodeShutdown, "batond is stopping")
		return
	}
	if info.Slot >= len(s.slots) {
		s.mu.Unlock()
		if s.cfg.Adopt {
			s.admitOther(ch, info, welcome, peer) // a survivor of a larger configuration
			return
		}
		s.rejectPeer(ch, peer, handoff.CodeSlot, fmt.Sprintf("slot %d does not exist (%d workers)", info.Slot, len(s.slots)))
		return
	}
	sl, adopted := s.slotOfLocked(info, peer), false
	switch {
	case sl != nil:
		peer.Close() // the slot's own process, or its launcher's child: sl.proc stands for both
	case s.slots[info.Slot].proc == nil && s.slots[info.Slot].adoptable && !info.Draining:
		// A survivor that says it drains was drained by the batond that crashed: it never
		// serves again, so it is no slot's worker; it drains as a worker of another generation
		// (the last case) and the slot gets a fresh one.
		sl, adopted = s.slots[info.Slot], true
		sl.proc, sl.started = peer, time.Now()
	case s.cfg.Adopt:
		s.mu.Unlock()
		s.admitOther(ch, info, welcome, peer)
		return
	default:
		owner, group := 0, 0
		if p := s.slots[info.Slot].proc; p != nil {
			owner, group = p.PID(), p.Group()
		}
		s.mu.Unlock()
		reason := fmt.Sprintf("slot %d belongs to pid %d (process group %d), not pid %d (process group %d)", info.Slot, owner, group, info.PID, peer.Group())
		s.rejectPeer(ch, peer, handoff.CodeSlot, reason)
		return
	}
	proc := sl.proc
	if err := ch.Send(welcome); err != nil {
		if adopted {
			sl.proc = nil
		}
		s.mu.Unlock()
		if adopted {
			peer.Close()
		}
		ch.Close()
		return
	}
	// A worker batond drained stays draining, whatever its HELLO says: no CONN before DRAIN.
	drainUntil := sl.drainDeadline
	redrain := sl.drained || sl.retired
	if redrain {
		info.Draining = true
		if drainUntil.IsZero() {
			drainUntil = time.Now().Add(s.cfg.DrainTimeout)
		}
	}
	old := sl.backend
	sl.backend = s.gw.Add(info, ch, proc)
	b := sl.backend
	s.mu.Unlock()
	s.registered(sl, b, proc, info, adopted)
	if redrain {
		_ = b.Drain(max(time.Until(drainUntil), 0))
		s.markDraining(sl.entry, drainUntil)
	}
	if old != nil {
		old.Kick(errors.New("worker re-registered"))
	}
	select {
	case sl.reg <- struct{}{}:
	default:
	}
}

// slotOfLocked returns the slot (serving, or drained and replaced) whose worker the peer is:
// its process, or a member of its process group.
func (s *Supervisor) slotOfLocked(info proxy.BackendInfo, peer *Process) *slot {
	is := func(sl *slot) bool {
		return sl.n == info.Slot && sl.proc != nil &&
			(sl.proc.PID() == info.PID || (peer.Group() != 0 && peer.Group() == sl.proc.Group()))
	}
	if sl := s.slots[info.Slot]; is(sl) {
		return sl
	}
	for sl := range s.retired {
		if is(sl) {
			return sl
		}
	}
	return nil
}

// rejectPeer rejects a registration whose process handle was already opened.
func (s *Supervisor) rejectPeer(ch *handoff.Channel, peer *Process, code handoff.ErrorCode, reason string) {
	peer.Close()
	s.reject(ch, code, reason)
}

// registered records a slot's worker as connected (and adopted) and takes its output over if
// batond does not read it yet.
func (s *Supervisor) registered(sl *slot, b *proxy.Backend, proc *Process, info proxy.BackendInfo, adopted bool) {
	log := s.log.Named(fmt.Sprintf("slot%d", sl.n))
	s.takeOutput(proc, info, log)
	kind := roster.Registered
	if adopted {
		kind = roster.Adopted
		log.Info("adopted the worker of the previous batond", "pid", info.PID, "clients", info.Live, "ready", info.Ready)
	} else {
		log.Debug("worker registered", "pid", info.PID, "live", info.Live)
	}
	s.roster.SetLoad(sl.entry, b)
	s.roster.Update(sl.entry, kind, func(w *roster.Worker) {
		w.PID, w.Connected, w.Migrate = info.PID, true, info.Migrate
		if adopted {
			w.Adopted, w.Started, w.State = true, time.Now(), roster.Starting
		}
	})
}

// takeOutput re-logs the output of a worker batond did not start, if it can (output.go), and
// warns when a worker no longer holds its pipe's read end: its writes will fail (EPIPE, or
// SIGPIPE) once no batond reads, for example when this one hands over.
func (s *Supervisor) takeOutput(p *Process, info proxy.BackendInfo, log hclog.Logger) {
	if s.cfg.PassOutput {
		return
	}
	if err := s.out.reclaim(p, s.outputLog(info.Generation, info.Slot, p.PID())); err != nil {
		log.Error("cannot re-log this worker's output: it waits in its pipe and the worker's writes block once 1 MiB is unread", "pid", p.PID(), "error", err)
	}
	if !holdsReadEnd(info.PID) {
		log.Warn("the worker closed its copy of the output pipe's read end (fd 3, BATON_OUTPUT_FD): its stdout/stderr will break when this batond hands over or dies", "pid", info.PID)
	}
}

// outputLog is the logger of one worker process's output: named by its generation, slot and
// pid, whichever batond re-logs it.
func (s *Supervisor) outputLog(gen uint64, slot, pid int) hclog.Logger {
	return s.log.Named(fmt.Sprintf("gen%d.slot%d.pid%d", gen, slot, pid))
}

// admitOther takes a worker of another generation: after a reload (older) or one that
// outlived a crashed batond and is not adopted. It keeps its sessions, gets no new clients,
// and is drained. peer becomes the worker's process handle.
func (s *Supervisor) admitOther(ch *handoff.Channel, info proxy.BackendInfo, welcome []byte, peer *Process) {
	if info.Generation > s.cfg.Generation {
		// A worker of a newer batond that reached us in the instant before we paused
		// registrations: it belongs to the newer one. SHUTDOWN is not final; it retries.
		s.rejectPeer(ch, peer, handoff.CodeShutdown, fmt.Sprintf("generation %d belongs to a newer batond (this is %d); retry", info.Generation, s.cfg.Generation))
		return
	}
	if err := ch.Send(welcome); err != nil {
		peer.Close()
		ch.Close()
		return
	}
	info.Draining = true // no CONN before DRAIN reaches it
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		s.rejectPeer(ch, peer, handoff.CodeShutdown, "batond is stopping")
		return
	}
	b := s.gw.Add(info, ch, peer)
	e := s.roster.Add(roster.Registered, roster.Worker{Slot: info.Slot, PID: info.PID, Generation: info.Generation,
		Migrate: info.Migrate, State: roster.Draining, Connected: true, Started: time.Now()})
	s.roster.SetLoad(e, b)
	o := &other{entry: e, backend: b, proc: peer, deadline: time.Now().Add(s.cfg.DrainTimeout)}
	s.others[b] = o
	s.wg.Add(1)
	s.mu.Unlock()
	s.drain(e, b, s.cfg.DrainTimeout)
	s.takeOutput(peer, info, s.log)
	s.log.Info("worker of another generation registered; draining it", "slot", info.Slot, "pid", info.PID, "generation", info.Generation, "clients", info.Live)
	if s.cfg.MigrateOthers && info.Migrate {
		s.migrate(e, b)
	}
	go s.watchOther(o)
}

// watchOther forgets the worker when it exits or its channel ends, and enforces its drain
// deadline: SIGTERM, then SIGKILL, to its process group.
func (s *Supervisor) watchOther(o *other) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.others, o.backend)
		s.mu.Unlock()
		s.roster.Remove(o.entry)
		o.proc.Close()
	}()
	t := time.NewTimer(time.Until(o.deadline))
	defer t.Stop()
	select {
	case <-o.proc.Exited():
		o.backend.Exited(errors.New("worker exited"))
		s.reapGroup(o.proc, s.log)
		return
	case <-o.backend.Done():
		return // it may register again, as a new other
	case <-t.C:
	}
	s.log.Warn("drain deadline passed", "pid", o.proc.PID())
	s.terminate([]*Process{o.proc}, s.log)
	s.reapGroup(o.proc, s.log)
	o.backend.Kick(errors.New("worker exited at its drain deadline"))
}
