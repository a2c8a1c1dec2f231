package supervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/baton-gw/baton/roster"
)

// run is one worker process's life as the slot sees it: done closes when it has ended, then
// err says why.
type run struct {
	done <-chan struct{}
	err  func() error
}

// adoptedRun watches a process batond did not start: its end shows on the pidfd, its exit
// status is its parent's to read.
func adoptedRun(p *Process) run {
	return run{done: p.Exited(), err: func() error { return ErrAdoptedExited }}
}

// runOnce starts the slot's worker and returns why it ended.
func (s *Supervisor) runOnce(sl *slot, log hclog.Logger) error {
	proc, r, err := s.spawn(sl, log)
	if err != nil {
		return err
	}
	defer func() {
		// The process has been reaped (r.done): say so before the pidfd closes, or a Stop
		// racing with this exit would wait on Exited forever.
		proc.markExited()
		proc.Close()
	}()
	return s.supervise(sl, proc, r, log)
}

// command builds the worker's command line, environment and process attributes.
func (s *Supervisor) command(n int) *exec.Cmd {
	cmd := exec.Command(s.cfg.Command[0], s.cfg.Command[1:]...)
	cmd.Dir = s.cfg.Dir
	cmd.Env = append(workerEnviron(), s.cfg.Env...)
	cmd.Env = append(cmd.Env,
		"BATON_SOCKET="+s.cfg.Socket,
		"BATON_WORKER="+strconv.Itoa(n),
		"BATON_GENERATION="+strconv.FormatUint(s.cfg.Generation, 10),
		"BATON_TOKEN="+Token(s.cfg.Key, s.cfg.Generation, n),
	)
	// Its own process group, led by the worker: a signal meant for batond's terminal (Ctrl-C)
	// is not delivered to the workers directly (batond drains them instead), and a launcher's
	// children belong to the worker (group.go). No Pdeathsig: workers outlive batond.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd
}

// spawn starts the slot's worker and publishes its pidfd under the lock: a registration from
// the new process (it may come at once) and Stop both see it, or neither does.
func (s *Supervisor) spawn(sl *slot, log hclog.Logger) (*Process, run, error) {
	cmd := s.command(sl.n)
	// Output: under systemd (JOURNAL_STREAM: our stderr is the journal) workers write to the
	// journal directly, which outlives every batond; otherwise through a pipe (output.go).
	var wp *workerPipe
	if s.cfg.PassOutput {
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	} else {
		var err error
		if wp, err = s.out.newPipe(); err != nil {
			s.setStarted(sl)
			return nil, run{}, fmt.Errorf("output pipe: %w", err)
		}
		cmd.Stdout, cmd.Stderr = wp.W, wp.W
		cmd.ExtraFiles = []*os.File{wp.Keep} // fd 3 = OutputFD
		cmd.Env = append(cmd.Env, "BATON_OUTPUT_FD="+strconv.Itoa(OutputFD))
	}
	s.mu.Lock()
	sl.started = time.Now()
	if s.stopping {
		s.mu.Unlock()
		wp.abandonIfAny()
		return nil, run{}, ErrStopping
	}
	if err := cmd.Start(); err != nil {
		s.mu.Unlock()
		wp.abandonIfAny()
		return nil, run{}, fmt.Errorf("start: %w", err)
	}
	// Our own pidfd, opened before we reap the child, so the pid cannot have been recycled.
	proc, err := OpenProcess(cmd.Process.Pid)
	if err != nil {
		s.mu.Unlock()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		wp.abandonIfAny()
		return nil, run{}, fmt.Errorf("pidfd: %w", err)
	}
	sl.proc = proc
	s.mu.Unlock()
	s.roster.Update(sl.entry, roster.Spawned, func(w *roster.Worker) {
		w.PID, w.Started, w.State, w.Adopted = cmd.Process.Pid, sl.started, roster.Starting, false
	})
	if wp != nil {
		wp.W.Close() // the child holds its copies
		wp.Keep.Close()
		s.out.follow(wp, s.outputLog(s.cfg.Generation, sl.n, cmd.Process.Pid))
	}
	done := make(chan struct{})
	var werr error
	go func() {
		werr = cmd.Wait()
		close(done)
	}()
	log.Debug("worker started", "pid", cmd.Process.Pid, "pgid", proc.Group())
	return proc, run{done: done, err: func() error { return exitReason(werr) }}, nil
}

func (s *Supervisor) setStarted(sl *slot) {
	s.mu.Lock()
	sl.started = time.Now()
	s.mu.Unlock()
}

func (wp *workerPipe) abandonIfAny() {
	if wp != nil {
		wp.abandon()
	}
}

// supervise waits for the worker to register and report READY within the start timeout (or
// kills its process group), then follows it until it ends, noting its channel going and
// coming back, and ends it at its drain deadline if an operator drained it (DrainSlot).
func (s *Supervisor) supervise(sl *slot, proc *Process, r run, log hclog.Logger) error {
	if err := s.awaitReady(sl, proc, r); err != nil {
		return err
	}
	s.roster.Update(sl.entry, roster.BecameReady, func(w *roster.Worker) {
		if w.State == roster.Starting {
			w.State = roster.Ready
		}
	})
	terminated := false
	for {
		s.mu.Lock()
		b, deadline := sl.backend, sl.drainDeadline
		s.mu.Unlock()
		var gone <-chan struct{}
		if b != nil {
			gone = b.Done()
		}
		var late <-chan time.Time
		if !deadline.IsZero() && !terminated {
			t := time.NewTimer(time.Until(deadline))
			defer t.Stop()
			late = t.C
		}
		select {
		case <-r.done:
			return r.err()
		case <-sl.reg: // a registration, or DrainSlot set a deadline
		case <-late:
			log.Warn("drain deadline passed", "pid", proc.PID())
			s.terminate([]*Process{proc}, log)
			terminated = true
		case <-gone:
			s.mu.Lock()
			current := sl.backend == b
			if current {
				sl.backend = nil
			}
			s.mu.Unlock()
			if current {
				s.roster.Update(sl.entry, roster.Disconnected, func(w *roster.Worker) { w.Connected = false })
				s.roster.SetLoad(sl.entry, nil)
			}
		}
	}
}

// awaitReady returns once the slot's worker is READY, or why it never will be.
func (s *Supervisor) awaitReady(sl *slot, proc *Process, r run) error {
	timer := time.NewTimer(s.cfg.StartTimeout)
	defer timer.Stop()
	for {
		var readyC <-chan struct{}
		s.mu.Lock()
		if sl.backend != nil {
			readyC = sl.backend.ReadyC()
		}
		s.mu.Unlock()
		select {
		case <-sl.reg:
		case <-readyC:
			return nil
		case <-r.done:
			return r.err()
		case <-timer.C:
			ctx, cancel := context.WithTimeout(context.Background(), s.cfg.KillGrace+10*time.Second)
			kerr := proc.KillAndWait(ctx) // the whole group: a launcher's child included
			cancel()
			if kerr != nil {
				s.log.Error("could not confirm the never-ready worker is gone", "pid", proc.PID(), "error", kerr)
			}
			<-r.done
			return ErrNeverReady
		case <-s.quit:
			<-r.done // Stop or Detach takes over; still starting
			return r.err()
		}
	}
}

// workerEnviron is batond's environment minus what is batond's alone: systemd's notify socket
// (with NotifyAccess=all a worker could otherwise speak for the service) and watchdog, socket
// activation variables, and tableflip's marker (a worker is nobody's upgrade).
func workerEnviron() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES",
			"TABLEFLIP_HAS_PARENT_7DIU3",
			"BATON_SOCKET", "BATON_WORKER", "BATON_GENERATION", "BATON_TOKEN", "BATON_OUTPUT_FD":
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
