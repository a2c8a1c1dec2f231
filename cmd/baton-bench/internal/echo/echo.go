// Package echo owns the benchmark's own echo server: the plain Go echo (a goroutine per
// connection doing io.Copy back to the client, as examples/go/echo does) listening with
// SO_REUSEPORT, so that several processes can share one port (configuration B of bench/run),
// and restartable one process at a time (its reload).
//
// With -rw it copies with read and write through a 32 KiB buffer instead of io.Copy: between
// two *net.TCPConn, io.Copy splices through a pipe (two more descriptors per connection, four
// splice calls per echo), which is what examples/go/echo does when it accepts directly, and
// not what it does under batond, where its connections are not *net.TCPConn.
//
// On SIGTERM or SIGINT it closes its listener (connections still in its accept queue are reset
// by the kernel: that is the SO_REUSEPORT restart's known cost), keeps serving the sessions it
// has until they end or the drain time passes, and exits 0.
package echo

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Main runs the echo server with args (without the program name) and returns the exit code.
func Main(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("echo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("listen", "127.0.0.1:7000", "TCP `address` to listen on")
	reuse := fs.Bool("reuseport", false, "set SO_REUSEPORT on the listener (several processes share the port)")
	drain := fs.Duration("drain", 5*time.Minute, "after SIGTERM, serve open sessions this long at most")
	pidfile := fs.String("pidfile", "", "write the pid to this `file` once listening")
	rw := fs.Bool("rw", false, "copy with read and write (no splice)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := serve(*addr, *reuse, *rw, *drain, *pidfile); err != nil {
		fmt.Fprintln(stderr, "baton-bench echo:", err)
		return 1
	}
	return 0
}

func serve(addr string, reuse, rw bool, drain time.Duration, pidfile string) error {
	l, err := Listen(addr, reuse)
	if err != nil {
		return err
	}
	if pidfile != "" {
		tmp := pidfile + ".tmp"
		if err := os.WriteFile(tmp, fmt.Appendf(nil, "%d\n", os.Getpid()), 0o644); err != nil {
			return err
		}
		if err := os.Rename(tmp, pidfile); err != nil {
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	Serve(ctx, l, rw, drain)
	return nil
}

// Listen listens on the TCP address addr, with SO_REUSEPORT if reuse is set.
func Listen(addr string, reuse bool) (net.Listener, error) {
	lc := net.ListenConfig{}
	if reuse {
		lc.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			})
			if err != nil {
				return err
			}
			return serr
		}
	}
	return lc.Listen(context.Background(), "tcp", addr)
}

// Serve echoes every connection accepted on l (a goroutine each, io.Copy back, or read and write
// if rw) until ctx ends; then it closes l and returns once the open connections have ended, or
// after drain. It owns l.
func Serve(ctx context.Context, l net.Listener, rw bool, drain time.Duration) {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				break
			}
			// Out of descriptors and the like: wait a little and go on, as net/http does.
			time.Sleep(5 * time.Millisecond)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			if !rw {
				_, _ = io.Copy(c, c)
				return
			}
			buf := make([]byte, 32<<10) // io.Copy's size
			for {
				n, err := c.Read(buf)
				if n > 0 {
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
	l.Close()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(drain):
	}
}
