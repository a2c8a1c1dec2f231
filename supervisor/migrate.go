package supervisor

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/baton-gw/baton/proxy"
	"github.com/baton-gw/baton/roster"
)

// ErrNoMigrate: the slot's worker does not take part in migration (its library did not ask
// for it in HELLO); drain it instead.
var ErrNoMigrate = errors.New("worker does not take part in migration (drain it instead)")

// defaultMigrateTimeout is how long a worker has to answer a MIGRATE when Config says nothing.
const defaultMigrateTimeout = 10 * time.Second

func (s *Supervisor) migrateTimeout() time.Duration {
	if s.cfg.MigrateTimeout > 0 {
		return s.cfg.MigrateTimeout
	}
	return defaultMigrateTimeout
}

// migrate asks one worker to hand back every session it holds, and records it.
func (s *Supervisor) migrate(e *roster.Entry, b *proxy.Backend) {
	if err := b.Migrate(s.migrateTimeout(), nil); err != nil {
		s.log.Warn("could not ask a worker for its sessions", "pid", b.Info().PID, "error", err)
		return
	}
	s.roster.Update(e, roster.Migrating, func(w *roster.Worker) { w.Migrating = true })
}

// MigrateResult says what a Migrate request did.
type MigrateResult struct {
	Asked   int `json:"asked"`   // workers asked to hand their sessions back
	Clients int `json:"clients"` // sessions they held when asked
}

// Migrate moves the sessions of the workers in slots (every slot, and every worker of an older
// generation, if slots is empty) to other workers of this generation, without a reload: each
// slot's worker is drained and replaced at once (as batonctl drain -replace), and when the
// fresh workers are ready (or ctx ends) it is asked to hand every session back. Sessions it
// declines drain as usual. A slot whose worker does not take part in migration fails the whole
// request before anything is drained (ErrNoMigrate).
func (s *Supervisor) Migrate(ctx context.Context, slots []int) (MigrateResult, error) {
	all := len(slots) == 0
	if all {
		for i := range s.cfg.Workers {
			slots = append(slots, i)
		}
	}
	type target struct {
		e *roster.Entry
		b *proxy.Backend
	}
	var ts []target
	s.mu.Lock()
	for _, n := range slots {
		if n < 0 || n >= len(s.slots) {
			s.mu.Unlock()
			return MigrateResult{}, fmt.Errorf("slot %d: %w (%d workers)", n, ErrNoSuchSlot, len(s.slots))
		}
		sl := s.slots[n]
		if sl.backend == nil || sl.proc == nil {
			s.mu.Unlock()
			return MigrateResult{}, fmt.Errorf("slot %d: %w", n, ErrNoWorker)
		}
		if !sl.backend.Info().Migrate {
			s.mu.Unlock()
			return MigrateResult{}, fmt.Errorf("slot %d: %w", n, ErrNoMigrate)
		}
		ts = append(ts, target{sl.entry, sl.backend})
	}
	if all {
		for b, o := range s.others {
			if b.Info().Migrate {
				ts = append(ts, target{o.entry, b})
			}
		}
	}
	s.mu.Unlock()
	for _, n := range slots {
		if err := s.DrainSlot(n, true); err != nil {
			return MigrateResult{}, err
		}
	}
	s.awaitAllReady(ctx)
	var res MigrateResult
	for _, t := range ts {
		res.Clients += t.b.Live()
		s.migrate(t.e, t.b)
		res.Asked++
	}
	return res, nil
}

// awaitAllReady waits until every slot of this generation has a ready worker, or ctx ends.
func (s *Supervisor) awaitAllReady(ctx context.Context) {
	for {
		ws, changed := s.roster.Watch()
		if ReadyIn(ws, s.cfg.Generation) >= s.cfg.Workers {
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}
