package supervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrGone is returned when signalling a process that has already exited.
var ErrGone = errors.New("process has exited")

// Process is a pidfd-backed handle on a worker process, child or not, and on its process group
// (see group.go). Signals go through the pidfd, so a recycled PID can never be hit, and to the
// group while the process lives; exit is observed by the pidfd becoming readable (epoll through
// the runtime poller), never by polling PIDs.
type Process struct {
	pid    int
	pgid   int      // its process group when opened; 0 if unknown
	pidfd  *os.File // owned; closed by Close
	raw    syscall.RawConn
	exited chan struct{}
	once   sync.Once
}

// newProcess takes ownership of pidfd, which must be its own open file description opened with
// PIDFD_NONBLOCK (never a dup of os/exec's pidfd: O_NONBLOCK on that one would make
// exec.Cmd.Wait fail with EAGAIN instead of waiting), and starts watching it.
func newProcess(pid, pidfd int) (*Process, error) {
	f := os.NewFile(uintptr(pidfd), fmt.Sprintf("pidfd:%d", pid))
	raw, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	pgid, _ := groupOf(pid)
	p := &Process{pid: pid, pgid: pgid, pidfd: f, raw: raw, exited: make(chan struct{})}
	go p.watch()
	return p, nil
}

// OpenProcess opens a pidfd on a running process: a child we started and have not reaped (its
// pid cannot have been recycled), or a worker of another generation re-registering, or one that
// outlived a previous batond.
func OpenProcess(pid int) (*Process, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, os.NewSyscallError("pidfd_open", err)
	}
	return newProcess(pid, fd)
}

func (p *Process) watch() {
	// A pidfd becomes readable when the process exits; Read parks on the poller until then.
	// (Never Fd(): that would switch the pidfd to blocking mode behind the poller's back.)
	exited := false
	err := p.raw.Read(func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, _ := unix.Poll(fds, 0)
		exited = n > 0
		return exited
	})
	if err == nil && exited {
		p.markExited()
	}
}

func (p *Process) markExited() { p.once.Do(func() { close(p.exited) }) }

// PID returns the process id.
func (p *Process) PID() int { return p.pid }

// Exited is closed once the process has exited.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// Group returns the process group the process was in when opened (0 if unknown).
func (p *Process) Group() int { return p.pgid }

// Signal sends sig through the pidfd and then to the process's group, so that a launcher's
// children get it too (the group is left alone once the process is gone, and never when it
// is batond's own or a session leader's: see killableGroup).
func (p *Process) Signal(sig syscall.Signal) error {
	err := p.signal(sig)
	if err == nil && p.pgid != 0 {
		signalGroup(p.pgid, sig)
	}
	return err
}

func (p *Process) signal(sig syscall.Signal) error {
	var serr error
	err := p.raw.Control(func(fd uintptr) {
		serr = unix.PidfdSendSignal(int(fd), sig, nil, 0)
	})
	if err != nil {
		return err
	}
	if errors.Is(serr, unix.ESRCH) {
		return ErrGone
	}
	if serr != nil {
		return os.NewSyscallError("pidfd_send_signal", serr)
	}
	return nil
}

// KillAndWait sends SIGKILL to the process and its group and waits until the process and
// every member of the group have exited.
func (p *Process) KillAndWait(ctx context.Context) error {
	if err := p.waitKilled(ctx); err != nil {
		return err
	}
	if p.pgid != 0 {
		return killGroup(ctx, p.pgid)
	}
	return nil
}

func (p *Process) waitKilled(ctx context.Context) error {
	if err := p.Signal(unix.SIGKILL); err != nil && !errors.Is(err, ErrGone) {
		// The supervisor marks a reaped process exited before it closes the pidfd, so a
		// signal failing on a closed pidfd of an exited process is not a failure to kill.
		select {
		case <-p.exited:
			return nil
		default:
		}
		return err
	}
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("pid %d still running after SIGKILL: %w", p.pid, ctx.Err())
	}
}

// dup returns a second handle on the same process (its own pidfd), valid after p is closed.
func (p *Process) dup() (*Process, error) {
	fd, derr := -1, error(nil)
	if err := p.raw.Control(func(pfd uintptr) { fd, derr = unix.FcntlInt(pfd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", derr)
	}
	np, err := newProcess(p.pid, fd)
	if err == nil {
		np.pgid = p.pgid // as opened: the process may have exited since
	}
	return np, err
}

// GetFD duplicates the process's file descriptor targetfd into batond (pidfd_getfd(2); the
// copy is close-on-exec and the caller's to close). It needs ptrace access to the process: the
// same uid (and the process dumpable) or CAP_SYS_PTRACE.
func (p *Process) GetFD(targetfd int) (int, error) {
	fd, serr := -1, error(nil)
	if err := p.raw.Control(func(pfd uintptr) { fd, serr = unix.PidfdGetfd(int(pfd), targetfd, 0) }); err != nil {
		return -1, err
	}
	if serr != nil {
		return -1, os.NewSyscallError("pidfd_getfd", serr)
	}
	return fd, nil
}

// Close releases the pidfd (the process itself is not touched). Exited never fires after Close
// unless the process had exited before.
func (p *Process) Close() error {
	return p.pidfd.Close()
}
