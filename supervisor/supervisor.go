package supervisor

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/proxy"
)

// Errors a slot records as the reason for its last exit.
var (
	ErrNeverReady = errors.New("worker did not report READY within the start timeout")
	ErrStopping   = errors.New("supervisor is stopping")
)

// State is a slot's or worker's state as status shows it.
type State string

// States.
const (
	StateStarting  State = "starting"  // spawned, not yet READY
	StateReady     State = "ready"     // serving
	StateDraining  State = "draining"  // told to drain; takes no new clients
	StateBackoff   State = "backoff"   // crashed; waiting to restart
	StateCrashLoop State = "crashloop" // crashed repeatedly soon after start; restarts at the capped delay
	StateStopped   State = "stopped"
)

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
}

// Supervisor runs the workers of one generation and admits registrations.
type Supervisor struct {
	cfg Config
	gw  *proxy.Gateway
	log hclog.Logger

	mu       sync.Mutex
	slots    []*slot
	others   map[*proxy.Backend]*other // registered workers of other generations
	stopping bool
	paused   bool          // registrations held back while a newer batond starts
	resume   chan struct{} // closed by ResumeRegistrations
	regL     *net.UnixListener
	wg       sync.WaitGroup
	quit     chan struct{}
}

type slot struct {
	n        int
	state    State
	proc     *Process
	pid      int
	started  time.Time
	restarts int
	failures int // consecutive quick failures
	lastExit string
	backend  *proxy.Backend
	reg      chan struct{} // poked when a backend registers for this slot
}

// other is a worker of another generation (older, usually) that registered with us.
type other struct {
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
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	s := &Supervisor{cfg: cfg, gw: gw, log: cfg.Logger, others: map[*proxy.Backend]*other{}, quit: make(chan struct{})}
	for i := 0; i < cfg.Workers; i++ {
		s.slots = append(s.slots, &slot{n: i, state: StateStarting, reg: make(chan struct{}, 1)})
	}
	return s
}

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

// Start spawns every slot's worker and keeps it alive until Stop.
func (s *Supervisor) Start() {
	for _, sl := range s.slots {
		s.wg.Add(1)
		go s.runSlot(sl)
	}
}

func (s *Supervisor) runSlot(sl *slot) {
	defer s.wg.Done()
	log := s.log.Named(fmt.Sprintf("slot%d", sl.n))
	for {
		if s.isStopping() {
			return
		}
		err := s.runOnce(sl, log)
		s.mu.Lock()
		uptime := time.Since(sl.started)
		b := sl.backend
		sl.backend = nil
		sl.proc = nil
		if s.stopping {
			sl.state = StateStopped
			s.mu.Unlock()
			if b != nil {
				b.Kick(ErrStopping)
			}
			return
		}
		if uptime >= s.cfg.Backoff.Healthy {
			sl.failures = 0
		}
		delay := s.cfg.Backoff.Delay(sl.failures)
		sl.failures++
		sl.restarts++
		sl.lastExit = err.Error()
		sl.state = StateBackoff
		if sl.failures >= s.cfg.Backoff.CrashLoop {
			sl.state = StateCrashLoop
		}
		state := sl.state
		s.mu.Unlock()
		if b != nil {
			b.Kick(fmt.Errorf("worker process exited: %w", err))
		}
		lvl := hclog.Warn
		if state == StateCrashLoop {
			lvl = hclog.Error
		}
		log.Log(lvl, "worker exited; restarting", "reason", err, "uptime", uptime.Round(time.Millisecond), "delay", delay, "state", state)
		select {
		case <-time.After(delay):
		case <-s.quit:
			s.mu.Lock()
			sl.state = StateStopped
			s.mu.Unlock()
			return
		}
	}
}

// runOnce starts the worker and returns why it ended.
func (s *Supervisor) runOnce(sl *slot, log hclog.Logger) error {
	cmd := exec.Command(s.cfg.Command[0], s.cfg.Command[1:]...)
	cmd.Dir = s.cfg.Dir
	cmd.Env = append(workerEnviron(), s.cfg.Env...)
	cmd.Env = append(cmd.Env,
		"BATON_SOCKET="+s.cfg.Socket,
		"BATON_WORKER="+strconv.Itoa(sl.n),
		"BATON_GENERATION="+strconv.FormatUint(s.cfg.Generation, 10),
		"BATON_TOKEN="+Token(s.cfg.Key, s.cfg.Generation, sl.n),
	)
	// Own process group: a signal meant for batond's terminal (Ctrl-C) is not delivered to
	// the workers directly; batond drains them instead. No Pdeathsig: workers outlive batond.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// Output. Under systemd (JOURNAL_STREAM: our stderr is the journal) workers write to the
	// journal directly, which outlives every batond: a worker that keeps its sessions across a
	// reload or a batond crash keeps its log too. Otherwise their lines are re-logged through
	// a pipe; the pipe dies with this batond, which is why worker.Listen ignores SIGPIPE.
	var pr *os.File
	if s.cfg.PassOutput {
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	} else {
		var pw *os.File
		var err error
		if pr, pw, err = os.Pipe(); err != nil {
			s.mu.Lock()
			sl.started = time.Now()
			s.mu.Unlock()
			return fmt.Errorf("pipe: %w", err)
		}
		defer pw.Close() // the child holds its copy
		cmd.Stdout, cmd.Stderr = pw, pw
	}
	// Start and publish the pidfd under the lock: a registration from the new process (it may
	// come at once) and Stop both see it, or neither does.
	s.mu.Lock()
	sl.started = time.Now()
	sl.state = StateStarting
	if s.stopping {
		s.mu.Unlock()
		if pr != nil {
			pr.Close()
		}
		return ErrStopping
	}
	if err := cmd.Start(); err != nil {
		s.mu.Unlock()
		if pr != nil {
			pr.Close()
		}
		return fmt.Errorf("start: %w", err)
	}
	// Our own pidfd, opened before we reap the child, so the pid cannot have been recycled.
	proc, err := OpenProcess(cmd.Process.Pid)
	if err != nil {
		s.mu.Unlock()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if pr != nil {
			pr.Close()
		}
		return fmt.Errorf("pidfd: %w", err)
	}
	sl.proc, sl.pid = proc, cmd.Process.Pid
	s.mu.Unlock()
	if pr != nil {
		go relog(pr, log.Named(fmt.Sprintf("pid%d", cmd.Process.Pid)))
	}
	defer func() {
		// Every return below follows cmd.Wait, so the process is gone: say so before the
		// pidfd closes, or a Stop racing with this exit would wait on Exited forever.
		proc.markExited()
		proc.Close()
	}()
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	log.Debug("worker started", "pid", cmd.Process.Pid)

	// Start timeout: registered and READY, or killed.
	timer := time.NewTimer(s.cfg.StartTimeout)
	defer timer.Stop()
	ready := false
	for !ready {
		var readyC <-chan struct{}
		s.mu.Lock()
		if sl.backend != nil {
			readyC = sl.backend.ReadyC()
		}
		s.mu.Unlock()
		select {
		case <-sl.reg:
		case <-readyC:
			ready = true
		case err := <-waited:
			return exitReason(err)
		case <-timer.C:
			_ = proc.KillAndWait(context.Background())
			<-waited
			return ErrNeverReady
		case <-s.quit:
			return exitReason(<-waited) // Stop or Detach takes over; still starting
		}
	}
	s.mu.Lock()
	if sl.state == StateStarting {
		sl.state = StateReady
	}
	s.mu.Unlock()
	return exitReason(<-waited)
}

// workerEnviron is batond's environment minus what is batond's alone: systemd's notify socket
// (with NotifyAccess=all a worker could otherwise speak for the service), socket activation
// variables, and tableflip's marker (a worker is nobody's upgrade).
func workerEnviron() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "TABLEFLIP_HAS_PARENT_7DIU3",
			"BATON_SOCKET", "BATON_WORKER", "BATON_GENERATION", "BATON_TOKEN":
			continue
		}
		env = append(env, kv)
	}
	return env
}

func exitReason(err error) error {
	if err == nil {
		return errors.New("exited with status 0")
	}
	return err
}

// relog copies a worker's output, line by line, into its named logger. It reads until EOF
// whatever comes: a reader that stopped would SIGPIPE the worker at its next write. Lines longer
// than the buffer are logged in pieces.
func relog(r io.ReadCloser, log hclog.Logger) {
	defer r.Close()
	br := bufio.NewReaderSize(r, 16*1024)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			log.Info(strings.TrimRight(string(line), "\r\n"))
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
	}
}

func (s *Supervisor) isStopping() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopping
}

// Stop drains every worker (this generation's and others that registered), waits up to ctx for
// them to exit, then sends SIGTERM, waits KillGrace, then SIGKILL.
func (s *Supervisor) Stop(ctx context.Context, drain time.Duration) {
	procs, backends, ok := s.finish()
	if !ok {
		return
	}
	for _, b := range backends {
		_ = b.Drain(drain)
	}
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
		s.log.Warn("workers still running at the stop deadline; sending SIGTERM")
		for _, p := range procs {
			_ = p.Signal(unix.SIGTERM)
		}
		if !allExited(after(s.cfg.KillGrace)) {
			s.log.Warn("workers ignored SIGTERM; sending SIGKILL")
			for _, p := range procs {
				_ = p.Signal(unix.SIGKILL)
			}
			allExited(after(s.cfg.KillGrace))
		}
	}
	s.wg.Wait()
}

// after is time.After as a done channel.
func after(d time.Duration) <-chan struct{} {
	c := make(chan struct{})
	time.AfterFunc(d, func() { close(c) })
	return c
}

// WorkerStatus is one worker as `batonctl status` shows it.
type WorkerStatus struct {
	Slot       int       `json:"slot"`
	PID        int       `json:"pid"`
	Generation uint64    `json:"generation"`
	State      State     `json:"state"`
	Clients    int       `json:"clients"`
	Restarts   int       `json:"restarts"`
	Started    time.Time `json:"started,omitzero"`
	Uptime     string    `json:"uptime"`
	LastExit   string    `json:"last_exit,omitempty"`
}

// Status lists this generation's slots, then workers of other generations.
func (s *Supervisor) Status() []WorkerStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	var out []WorkerStatus
	for _, sl := range s.slots {
		w := WorkerStatus{Slot: sl.n, Generation: s.cfg.Generation, State: sl.state, Restarts: sl.restarts, LastExit: sl.lastExit}
		if sl.proc != nil {
			w.PID, w.Started, w.Uptime = sl.pid, sl.started, now.Sub(sl.started).Round(time.Second).String()
		}
		if sl.backend != nil {
			st := sl.backend.Status()
			w.Clients = st.Live
			if st.Draining {
				w.State = StateDraining
			}
		}
		out = append(out, w)
	}
	for b, o := range s.others {
		st := b.Status()
		out = append(out, WorkerStatus{Slot: st.Slot, PID: st.PID, Generation: st.Generation, State: StateDraining,
			Clients: st.Live, Started: st.Registered, Uptime: now.Sub(st.Registered).Round(time.Second).String()})
		_ = o
	}
	return out
}

// ReadyCount is the number of this generation's workers that are serving.
func (s *Supervisor) ReadyCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, sl := range s.slots {
		if sl.state == StateReady && sl.backend != nil && !isDone(sl.backend.Done()) {
			n++
		}
	}
	return n
}

// Detach hands the workers over to the next batond after an upgrade: every worker is told to
// drain (it keeps its sessions and re-registers with the next batond, which gives it no new
// clients), and this supervisor stops restarting anything. The processes are left running.
func (s *Supervisor) Detach(drain time.Duration) {
	_, backends, ok := s.finish()
	if !ok {
		return
	}
	for _, b := range backends {
		_ = b.Drain(drain)
	}
}

// finish ends supervision (no more restarts, no more registrations) once, and returns every
// worker process and backend it knew, for Stop or Detach to drain. ok is false if it had
// already finished.
func (s *Supervisor) finish() (procs []*Process, backends []*proxy.Backend, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping {
		return nil, nil, false
	}
	s.stopping = true
	close(s.quit)
	for _, sl := range s.slots {
		if sl.proc != nil {
			procs = append(procs, sl.proc)
		}
		if sl.backend != nil {
			backends = append(backends, sl.backend)
		}
	}
	for b, o := range s.others {
		backends = append(backends, b)
		if o.proc != nil {
			procs = append(procs, o.proc)
		}
	}
	return procs, backends, true
}

// LastExits summarises why this generation's slots last exited, for a failed start's message.
func (s *Supervisor) LastExits() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var parts []string
	for _, sl := range s.slots {
		if sl.lastExit != "" {
			parts = append(parts, fmt.Sprintf("slot %d: %s after %d restarts", sl.n, sl.lastExit, sl.restarts))
		} else if sl.state != StateReady {
			parts = append(parts, fmt.Sprintf("slot %d: %s", sl.n, sl.state))
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
