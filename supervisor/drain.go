package supervisor

import (
	"errors"
	"fmt"
	"time"

	"github.com/baton-gw/baton/roster"
)

// Errors of operator drains.
var (
	ErrNoSuchSlot = errors.New("no such slot")
	ErrNoWorker   = errors.New("slot has no registered worker to drain")
)

// DrainSlot drains the worker of slot n, as an operator asks (batonctl drain SLOT): it gets no
// new clients, keeps its sessions, and exits when the last one leaves, or is ended at the drain
// deadline (SIGTERM, then SIGKILL: supervise enforces it). A fresh worker takes the slot when
// it has exited (at once, not as a crash); with replace, at once, while the drained one plays
// out beside it.
//
// The roster records the drain under the supervisor's lock, while sl is certainly still this
// worker's: once the lock is released the worker may exit and the slot's successor take sl
// (and its roster entry) over.
func (s *Supervisor) DrainSlot(n int, replace bool) error {
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		return ErrStopping
	}
	if n < 0 || n >= len(s.slots) {
		s.mu.Unlock()
		return fmt.Errorf("slot %d: %w (%d workers)", n, ErrNoSuchSlot, len(s.slots))
	}
	sl := s.slots[n]
	b := sl.backend
	if sl.proc == nil || b == nil {
		s.mu.Unlock()
		return fmt.Errorf("slot %d: %w", n, ErrNoWorker)
	}
	if !sl.drained {
		sl.drained = true
		sl.drainDeadline = time.Now().Add(s.cfg.DrainTimeout)
	}
	deadline := sl.drainDeadline
	pid := sl.proc.PID()
	s.markDraining(sl.entry, deadline)
	if replace {
		s.retireLocked(sl)
	}
	s.mu.Unlock()
	select {
	case sl.reg <- struct{}{}: // supervise starts counting down to the deadline
	default:
	}
	_ = b.Drain(time.Until(deadline)) // b is this worker's, whoever holds the slot by now
	s.log.Info("worker drained by the operator", "slot", n, "pid", pid, "deadline", deadline, "replaced_now", replace)
	return nil
}

// DrainAll drains every slot's worker (see DrainSlot) and returns how many it drained.
func (s *Supervisor) DrainAll(replace bool) int {
	n := 0
	for i := range s.cfg.Workers {
		if s.DrainSlot(i, replace) == nil {
			n++
		}
	}
	return n
}

// Undrain gives every slot whose worker an operator drained a fresh worker now (the drained
// one keeps its sessions beside it) and returns how many it started.
func (s *Supervisor) Undrain() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping {
		return 0
	}
	n := 0
	for _, sl := range s.slots {
		if sl.drained && !sl.retired && sl.proc != nil {
			s.retireLocked(sl)
			n++
		}
	}
	return n
}

// retireLocked moves sl's worker out of its slot (it ends with that worker) and starts a new
// runner for the slot.
func (s *Supervisor) retireLocked(sl *slot) {
	sl.retired = true
	s.retired[sl] = struct{}{}
	e := s.roster.Add(roster.Spawned, roster.Worker{Slot: sl.n, Generation: s.cfg.Generation, State: roster.Starting})
	fresh := &slot{n: sl.n, entry: e, reg: make(chan struct{}, 1)}
	s.slots[sl.n] = fresh
	s.wg.Add(1)
	go s.runSlot(fresh, false)
}
