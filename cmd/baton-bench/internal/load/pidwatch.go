package load

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// pidWatch learns when a set of processes (the old generation's workers) have all exited,
// through pidfds opened before anything could make their pids free for reuse.
type pidWatch struct {
	fds  []int // -1: exited (or already gone when the watch began)
	done chan int64
	quit chan struct{}
	wg   sync.WaitGroup
}

// watchPIDs opens a pidfd for each pid; a pid that no longer exists counts as exited.
func watchPIDs(pids []int) (*pidWatch, error) {
	w := &pidWatch{done: make(chan int64, 1), quit: make(chan struct{})}
	for _, pid := range pids {
		fd, err := unix.PidfdOpen(pid, 0) // pidfds are close-on-exec
		switch {
		case errors.Is(err, unix.ESRCH):
			fd = -1
		case err != nil:
			w.closeFDs()
			return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
		}
		w.fds = append(w.fds, fd)
	}
	return w, nil
}

// start reports on w.done the engine time at which the last process exited. The goroutine ends
// then, or at close.
func (w *pidWatch) start(e *engine) {
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		for {
			var pfd []unix.PollFd
			for _, fd := range w.fds {
				if fd >= 0 {
					pfd = append(pfd, unix.PollFd{Fd: int32(fd), Events: unix.POLLIN})
				}
			}
			if len(pfd) == 0 {
				w.done <- e.now()
				return
			}
			select {
			case <-w.quit:
				return
			default:
			}
			n, err := unix.Poll(pfd, 100) // wakes to look at quit
			if err != nil && !errors.Is(err, unix.EINTR) {
				return // not expected for pidfds; the waiter's bound ends the wait
			}
			if n <= 0 {
				continue
			}
			for _, p := range pfd {
				if p.Revents != 0 {
					for i, fd := range w.fds {
						if fd == int(p.Fd) {
							unix.Close(fd)
							w.fds[i] = -1
						}
					}
				}
			}
		}
	}()
}

// wait drives the engine (so that it sees the sessions cut meanwhile) until every process
// exited or d passed. It returns the engine time of the last exit (0 if not all did) and how
// many processes are left.
func (w *pidWatch) wait(e *engine, d time.Duration) (int64, int) {
	var at int64
	end := e.now() + int64(d)
	_ = e.run(end, func(now int64) (int64, bool) {
		select {
		case at = <-w.done:
			return 0, true
		default:
			return now + int64(10*time.Millisecond), false
		}
	})
	if at > 0 {
		return at, 0
	}
	close(w.quit)
	w.wg.Wait()
	left := 0
	for _, fd := range w.fds {
		if fd >= 0 {
			left++
		}
	}
	return 0, left
}

// close stops the watch and closes the pidfds.
func (w *pidWatch) close() {
	select {
	case <-w.quit:
	default:
		close(w.quit)
	}
	w.wg.Wait()
	w.closeFDs()
}

func (w *pidWatch) closeFDs() {
	for i, fd := range w.fds {
		if fd >= 0 {
			unix.Close(fd)
			w.fds[i] = -1
		}
	}
}
