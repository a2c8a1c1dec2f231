package supervisor

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

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

// newPipe makes a worker's output pipe. The child's fd 3 is a duplicate of batond's read end:
// they share one open file description, so when batond makes its own non-blocking (start,
// after cmd.Start has put the child's in blocking mode with Fd()) the child's is too, which
// does not matter to a worker that never reads it.
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

// reclaim takes over the output (stdout and stderr) of a worker batond did not start, through
// proc. It skips a descriptor that is not a pipe (the journal, a terminal, a file) or a pipe
// batond already reads.
func (o *outputs) reclaim(proc *Process, log hclog.Logger) error {
	var errs []error
	for _, fd := range []int{1, 2} {
		if err := o.reclaimFD(proc, fd, log); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (o *outputs) reclaimFD(proc *Process, n int, log hclog.Logger) error {
	pid := strconv.Itoa(proc.PID())
	id, err := os.Readlink("/proc/" + pid + "/fd/" + strconv.Itoa(n))
	if err != nil || !strings.HasPrefix(id, "pipe:") {
		return nil
	}
	// Reserve the pipe first: two registrations sharing it must not both take it.
	o.mu.Lock()
	if _, have := o.reading[id]; have || o.closed {
		o.mu.Unlock()
		return nil
	}
	o.reading[id] = nil
	o.mu.Unlock()
	fd, err := o.takeReadEnd(proc, pid, id)
	if err != nil {
		o.mu.Lock()
		delete(o.reading, id)
		o.mu.Unlock()
		return err
	}
	o.start(fd, id, log)
	return nil
}

func (o *outputs) takeReadEnd(proc *Process, pid, id string) (int, error) {
	n, ok := readEndIn(pid, id)
	if !ok {
		return -1, ErrNoOutputPipe
	}
	fd, err := proc.GetFD(n)
	if err != nil {
		return -1, fmt.Errorf("taking over the output pipe (fd %d of pid %s): %w", n, pid, err)
	}
	return fd, nil
}

// holdsReadEnd says whether process pid holds a read end of the pipe its stdout writes to
// (true when stdout is no pipe: nothing to lose).
func holdsReadEnd(pid int) bool {
	p := strconv.Itoa(pid)
	id, err := os.Readlink("/proc/" + p + "/fd/1")
	if err != nil || !strings.HasPrefix(id, "pipe:") {
		return true
	}
	_, ok := readEndIn(p, id)
	return ok
}

// readEndIn finds a descriptor of process pid open for reading on the pipe id (OutputFD
// first: a busy worker holds thousands of descriptors).
func readEndIn(pid, id string) (int, bool) {
	if isReadEnd(pid, strconv.Itoa(OutputFD), id) {
		return OutputFD, true
	}
	ents, err := os.ReadDir("/proc/" + pid + "/fd")
	if err != nil {
		return 0, false
	}
	for _, e := range ents {
		if isReadEnd(pid, e.Name(), id) {
			n, _ := strconv.Atoi(e.Name())
			return n, true
		}
	}
	return 0, false
}

// isReadEnd says whether descriptor fd of process pid is the pipe id, open read-only.
func isReadEnd(pid, fd, id string) bool {
	if l, err := os.Readlink("/proc/" + pid + "/fd/" + fd); err != nil || l != id {
		return false
	}
	info, err := os.ReadFile("/proc/" + pid + "/fdinfo/" + fd)
	if err != nil {
		return false
	}
	return fdinfoReadOnly(info)
}

// fdinfoReadOnly reads the octal "flags:" line of /proc/PID/fdinfo/FD.
func fdinfoReadOnly(info []byte) bool {
	for _, line := range strings.Split(string(info), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			flags, err := strconv.ParseUint(strings.TrimSpace(v), 8, 64)
			return err == nil && flags&unix.O_ACCMODE == unix.O_RDONLY
		}
	}
	return false
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
	if o.closed || o.reading[id] != nil {
		o.mu.Unlock()
		f.Close() // stopped, or read already (a reservation is nil)
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
		if f != nil {
			f.Close()
		}
	}
	o.mu.Unlock()
	o.wg.Wait()
}

// closeAfter lets the readers reach EOF for up to d (workers that exited have written their
// last lines, a traceback at SIGTERM say), then closes.
func (o *outputs) closeAfter(d time.Duration) {
	done := make(chan struct{})
	go func() { o.wg.Wait(); close(done) }() // ends at the latest when close has closed every reader
	select {
	case <-done:
	case <-time.After(d):
	}
	o.close()
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
