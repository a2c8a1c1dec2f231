package supervisor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/baton-gw/baton/proxy"
	"github.com/baton-gw/baton/roster"
)

// Errors a slot records as the reason for its last exit.
var (
	ErrNeverReady = errors.New("worker did not report READY within the start timeout")
	ErrStopping   = errors.New("supervisor is stopping")
	// ErrAdoptedExited: an adopted worker is not batond's child, so its exit status is unknown.
	ErrAdoptedExited = errors.New("adopted worker exited (not batond's child: status unknown)")
)

// State is a worker's state as status shows it (owned by the roster).
type State = roster.State

// States (see roster).
const (
	StateStarting  = roster.Starting
	StateReady     = roster.Ready
	StateDraining  = roster.Draining
	StateBackoff   = roster.Backoff
	StateCrashLoop = roster.CrashLoop
	StateStopped   = roster.Stopped
)

// WorkerStatus is one worker as `batonctl status` shows it.
type WorkerStatus = roster.Worker

// Config configures one generation's supervisor.
type Config struct {
	Command      []string // resolved worker command and arguments
	Workers      int
	Generation   uint64
	Socket       string   // registration socket path, given to workers as BATON_SOCKET
	Key          []byte   // token key (see Token)
	AllowUIDs    []uint32 // peer uids allowed to register besides our own
	Env          []string // extra environment for workers
	Dir          string   // working directory of workers ("" = ours)
	StartTimeout time.Duration
	DrainTimeout time.Duration // how long draining workers get before SIGTERM
	KillGrace    time.Duration // between SIGTERM and SIGKILL
	Backoff      Backoff
	Logger       hclog.Logger
	// PassOutput gives workers batond's own stderr (the journal, under systemd) instead of
	// re-logging their output through a pipe.
	PassOutput bool
	// Adopt is set when this batond restarts after a crash of the one that served Generation:
	// that generation's workers still run, and each slot first waits up to AdoptWindow for its
	// worker to re-register and be adopted (same pid, same sessions) before starting a new one.
	Adopt       bool
	AdoptWindow time.Duration
	// Roster receives the workers' state (a new one if nil).
	Roster *roster.Roster
	// MigrateOthers: workers of older generations that take part in migration are asked to
	// hand their sessions back as soon as they register (a migrating reload), within
	// MigrateTimeout [10s].
	MigrateOthers  bool
	MigrateTimeout time.Duration
}

// Supervisor runs the workers of one generation and admits registrations.
type Supervisor struct {
	cfg    Config
	gw     *proxy.Gateway
	log    hclog.Logger
	roster *roster.Roster
	out    *outputs

	mu       sync.Mutex
	slots    []*slot
	others   map[*proxy.Backend]*other // registered workers of other generations
	retired  map[*slot]struct{}        // drained and replaced slots whose worker still runs
	stopping bool
	paused   bool          // registrations held back while a newer batond starts
	resume   chan struct{} // closed by ResumeRegistrations
	regL     *net.UnixListener
	admits   map[*net.UnixConn]struct{} // handshakes under way
	wg       sync.WaitGroup             // slot runners, admissions, watchers of others
	quit     chan struct{}
}

// slot is one of this generation's worker positions. Its public state lives in the roster
// (entry); what is here is what supervising it needs.
type slot struct {
	n         int
	entry     *roster.Entry
	proc      *Process // the worker: spawned here, or adopted
	backend   *proxy.Backend
	started   time.Time
	failures  int  // consecutive quick failures
	adoptable bool // waiting for a survivor of a crashed batond to re-register
	drained   bool // an operator drained its worker: restart at once when it ends
	// drainDeadline: when an operator-drained worker gets SIGTERM, then SIGKILL (zero: none).
	drainDeadline time.Time
	retired       bool          // replaced by a fresh worker: it ends with its worker
	reg           chan struct{} // poked when a backend registers for this slot
}

// other is a worker of another generation (older, usually) that registered with us.
type other struct {
	entry    *roster.Entry
	backend  *proxy.Backend
	proc     *Process
	deadline time.Time
}

// New creates a Supervisor. Call Start to spawn workers and Serve to admit registrations.
func New(cfg Config, gw *proxy.Gateway) *Supervisor {
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = 10 * time.Second
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 5 * time.Minute
	}
	if cfg.KillGrace <= 0 {
		cfg.KillGrace = 5 * time.Second
	}
	if cfg.Backoff.Base <= 0 {
		cfg.Backoff = DefaultBackoff()
	}
	if cfg.AdoptWindow <= 0 {
		cfg.AdoptWindow = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Roster == nil {
		cfg.Roster = roster.New()
	}
	s := &Supervisor{
		cfg: cfg, gw: gw, log: cfg.Logger, roster: cfg.Roster, out: newOutputs(),
		others: map[*proxy.Backend]*other{}, retired: map[*slot]struct{}{}, admits: map[*net.UnixConn]struct{}{}, quit: make(chan struct{}),
	}
	for i := 0; i < cfg.Workers; i++ {
		e := s.roster.Add(roster.Created, roster.Worker{Slot: i, Generation: cfg.Generation, State: roster.Starting})
		// Adoptable from the start: a survivor may register before the slot's runner runs.
		s.slots = append(s.slots, &slot{n: i, entry: e, reg: make(chan struct{}, 1), adoptable: cfg.Adopt})
	}
	return s
}

// Roster returns the table of workers this supervisor writes.
func (s *Supervisor) Roster() *roster.Roster { return s.roster }

// ResolveCommand resolves the program through PATH and every argument that names an existing
// path through its symlinks, once, so that a generation keeps running the release it started
// with: a crash-restart never picks up a half-deployed `releases/current`.
func ResolveCommand(args []string) ([]string, error) {
	if len(args) == 0 {
		return nil, errors.New("empty worker command")
	}
	out := make([]string, len(args))
	prog, err := exec.LookPath(args[0])
	if err != nil {
		return nil, fmt.Errorf("worker command: %w", err)
	}
	if out[0], err = filepath.EvalSymlinks(prog); err != nil {
		return nil, fmt.Errorf("worker command: %w", err)
	}
	if out[0], err = filepath.Abs(out[0]); err != nil {
		return nil, err
	}
	for i, a := range args[1:] {
		out[i+1] = a
		if strings.HasPrefix(a, "-") {
			continue
		}
		if _, err := os.Lstat(a); err == nil {
			if r, err := filepath.EvalSymlinks(a); err == nil {
				if abs, err := filepath.Abs(r); err == nil {
					out[i+1] = abs
				}
			}
		}
	}
	return out, nil
}

// Start spawns (or, after a crash, first waits to adopt) every slot's worker and keeps it
// alive until Stop.
func (s *Supervisor) Start() {
	for _, sl := range s.slots {
		s.wg.Add(1)
		go s.runSlot(sl, s.cfg.Adopt)
	}
}

func (s *Supervisor) runSlot(sl *slot, adopt bool) {
	defer s.wg.Done()
	log := s.log.Named(fmt.Sprintf("slot%d", sl.n))
	if adopt {
		if proc := s.awaitAdoption(sl); proc != nil {
			err := s.supervise(sl, proc, adoptedRun(proc), log)
			proc.Close()
			if !s.afterExit(sl, err, log) {
				return
			}
		}
	}
	for !s.isStopping() {
		if !s.afterExit(sl, s.runOnce(sl, log), log) {
			return
		}
	}
}

// awaitAdoption waits up to the adoption window for the slot's worker of the crashed batond to
// re-register (admitOwn adopts it), and returns its process, or nil to start a new one.
func (s *Supervisor) awaitAdoption(sl *slot) *Process {
	t := time.NewTimer(s.cfg.AdoptWindow)
	defer t.Stop()
	select {
	case <-sl.reg:
	case <-t.C:
	case <-s.quit:
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sl.adoptable = false
	return sl.proc
}

// afterExit records why the slot's worker ended, kills what is left of its process group,
// and waits out the restart delay. It returns false when the supervisor is stopping.
func (s *Supervisor) afterExit(sl *slot, err error, log hclog.Logger) bool {
	s.mu.Lock()
	uptime := time.Since(sl.started)
	b, proc := sl.backend, sl.proc
	sl.backend, sl.proc = nil, nil
	stopping, retired, drained := s.stopping, sl.retired, sl.drained
	if uptime >= s.cfg.Backoff.Healthy || drained {
		sl.failures = 0
	}
	delay := s.cfg.Backoff.Delay(sl.failures)
	if !stopping && !drained {
		sl.failures++
	}
	if drained {
		delay, sl.drained, sl.drainDeadline = 0, false, time.Time{} // drained on purpose: no crash, no wait
		err = fmt.Errorf("drained: %w", err)
	}
	crashloop := sl.failures >= s.cfg.Backoff.CrashLoop
	if retired {
		delete(s.retired, sl)
	}
	s.mu.Unlock()
	s.roster.SetLoad(sl.entry, nil) // its clients went with it
	if b != nil {
		b.Exited(fmt.Errorf("worker process exited: %w", err))
	}
	if proc != nil && !stopping {
		s.reapGroup(proc, log)
	}
	if retired {
		s.roster.Remove(sl.entry) // its slot has a newer worker
		return false
	}
	if stopping {
		s.roster.Update(sl.entry, roster.Exited, func(w *roster.Worker) { w.State, w.Connected = roster.Stopped, false })
		return false
	}
	state := roster.Backoff
	lvl := hclog.Warn
	if crashloop {
		state, lvl = roster.CrashLoop, hclog.Error
	}
	s.roster.Update(sl.entry, roster.Exited, func(w *roster.Worker) {
		w.State, w.Connected, w.Adopted = state, false, false
		w.Restarts++
		w.LastExit = err.Error()
	})
	log.Log(lvl, "worker exited; restarting", "reason", err, "uptime", uptime.Round(time.Millisecond), "delay", delay, "state", state)
	select {
	case <-time.After(delay):
		return true
	case <-s.quit:
		s.roster.Update(sl.entry, roster.Exited, func(w *roster.Worker) { w.State = roster.Stopped })
		return false
	}
}

// reapGroup kills whatever is left of an ended worker's process group (a launcher's children)
// and waits for it, so that no part of an old worker lingers.
func (s *Supervisor) reapGroup(p *Process, log hclog.Logger) {
	if p.Group() == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.KillGrace)
	defer cancel()
	if err := killGroup(ctx, p.Group()); err != nil {
		log.Error("could not end the rest of the worker's process group", "pgid", p.Group(), "error", err)
	}
}

func (s *Supervisor) isStopping() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopping
}
