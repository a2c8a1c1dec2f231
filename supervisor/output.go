package supervisor

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// Worker output. Without systemd's journal, each worker writes its stdout and stderr into a pipe
// whose lines batond re-logs under the worker's Named logger. The worker outlives the batond
// that started it (reloads, crashes), so the pipe must outlive it too: the worker itself keeps
// a copy of the pipe's read end at fd 3 (BATON_OUTPUT_FD). While a reader exists, a write never
// fails with EPIPE and never raises SIGPIPE, whoever has gone; when no batond reads, the pipe
// (1 MiB) fills and writes wait. A batond that admits a worker it did not start (after a reload
// or a crash) takes the read end back from the worker with pidfd_getfd and re-logs from where
// the previous reader stopped. The one mechanism serves reloads and crashes alike; tableflip's
// file passing would serve only reloads, and it cannot forget a file once added, so every
// worker restart would leave a read end behind in it.

// OutputFD is the descriptor at which a worker holds the read end of its own output pipe.
const OutputFD = 3

// pipeSize is what a worker may write while no batond reads (the unprivileged maximum).
const pipeSize = 1 << 20

// ErrNoOutputPipe is returned when a worker's output cannot be taken over: its stdout is a
// pipe but the worker no longer holds the pipe's read end.
var ErrNoOutputPipe = errors.New("worker holds no read end of its output pipe")

// outputs owns the read ends batond re-logs from and the goroutines that read them.
type outputs struct {
	mu      sync.Mutex
	reading map[string]*os.File // by pipe identity ("pipe:[inode]")
	closed  bool
	wg      sync.WaitGroup
}

func newOutputs() *outputs { return &outputs{reading: map[string]*os.File{}} }

// workerPipe is a new output pipe for a worker about to be spawned: W is its stdout and stderr,
// Keep its fd 3. Both are the spawner's to close once the child has them.
type workerPipe struct {
	W, Keep *os.File
	r       int // our read end, not yet followed
	id      string
}

// newPipe makes a worker's output pipe. The read end given to the child is a separate,
// blocking-mode file (os/exec's Fd() call on it cannot touch the one batond polls).
func (o *outputs) newPipe() (*workerPipe, error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, os.NewSyscallError("pipe2", err)
	}
	_, _ = unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, pipeSize) // best effort: 64 KiB otherwise
	keep, err := unix.FcntlInt(uintptr(p[0]), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		unix.Close(p[0])
		unix.Close(p[1])
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", err)
	}
	return &workerPipe{
		W:    os.NewFile(uintptr(p[1]), "worker output"),
		Keep: os.NewFile(uintptr(keep), "worker output (read end)"),
		r:    p[0],
		id:   pipeID(p[0]),
	}, nil
}

// abandon closes everything of a pipe whose worker never started.
func (wp *workerPipe) abandon() {
	wp.W.Close()
	wp.Keep.Close()
	unix.Close(wp.r)
}

// follow starts re-logging a spawned worker's pipe (after Start, with W and Keep closed).
func (o *outputs) follow(wp *workerPipe, log hclog.Logger) {
	o.start(wp.r, wp.id, log)
}

// reclaim takes over the output of a worker batond did not start (pid), through proc. It does
// nothing when the worker's stdout is not a pipe (the journal, a terminal, a file) or when
// batond already reads that pipe.
func (o *outputs) reclaim(proc *Process, log hclog.Logger) error {
	pid := strconv.Itoa(proc.PID())
	id, err := os.Readlink("/proc/" + pid + "/fd/1")
	if err != nil || !strings.HasPrefix(id, "pipe:") {
		return nil
	}
	o.mu.Lock()
	_, have := o.reading[id]
	o.mu.Unlock()
	if have {
		return nil
	}
	n, ok := readEndIn(pid, id)
	if !ok {
		return ErrNoOutputPipe
	}
	fd, err := proc.GetFD(n)
	if err != nil {
		return fmt.Errorf("taking over the output pipe (fd %d of pid %s): %w", n, pid, err)
	}
	o.start(fd, id, log)
	return nil
}

// readEndIn finds a descriptor of process pid open for reading on the pipe id.
func readEndIn(pid, id string) (int, bool) {
	ents, err := os.ReadDir("/proc/" + pid + "/fd")
	if err != nil {
		return 0, false
	}
	for _, e := range ents {
		if l, err := os.Readlink("/proc/" + pid + "/fd/" + e.Name()); err != nil || l != id {
			continue
		}
		info, err := os.ReadFile("/proc/" + pid + "/fdinfo/" + e.Name())
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				flags, err := strconv.ParseUint(strings.TrimSpace(v), 8, 64)
				if n, aerr := strconv.Atoi(e.Name()); err == nil && aerr == nil && flags&unix.O_ACCMODE == unix.O_RDONLY {
					return n, true
				}
			}
		}
	}
	return 0, false
}

func pipeID(fd int) string {
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil {
		return ""
	}
	return fmt.Sprintf("pipe:[%d]", st.Ino)
}

// start re-logs the read end fd (owned from now on) until the worker's last writer is gone or
// close. The fd is made non-blocking so that the runtime poller parks the reader and close
// wakes it.
func (o *outputs) start(fd int, id string, log hclog.Logger) {
	_ = unix.SetNonblock(fd, true)
	f := os.NewFile(uintptr(fd), "worker output")
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		f.Close()
		return
	}
	o.reading[id] = f
	o.wg.Add(1)
	o.mu.Unlock()
	go func() {
		defer o.wg.Done()
		relog(f, log)
		o.mu.Lock()
		if o.reading[id] == f {
			delete(o.reading, id)
		}
		o.mu.Unlock()
		f.Close()
	}()
}

// close stops re-logging: batond's read ends close (the workers keep theirs, so nobody gets
// EPIPE) and every reader goroutine is joined. Lines still in the pipes wait for the next
// batond.
func (o *outputs) close() {
	o.mu.Lock()
	o.closed = true
	for _, f := range o.reading {
		f.Close()
	}
	o.mu.Unlock()
	o.wg.Wait()
}

// relog copies a worker's output, line by line, into its named logger, until EOF or close.
// Lines longer than the buffer are logged in pieces.
func relog(f *os.File, log hclog.Logger) {
	br := bufio.NewReaderSize(f, 16*1024)
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
