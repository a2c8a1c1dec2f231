// Package echo owns the benchmark's own echo server: the plain Go echo (a goroutine per
// connection doing io.Copy back to the client, as examples/go/echo does) listening with
// SO_REUSEPORT, so that several processes can share one port (configuration B of bench/run),
// and restartable one process at a time (its reload).
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
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := serve(*addr, *reuse, *drain, *pidfile); err != nil {
		fmt.Fprintln(stderr, "baton-bench echo:", err)
		return 1
	}
	return 0
}

func serve(addr string, reuse bool, drain time.Duration, pidfile string) error {
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
	l, err := lc.Listen(context.Background(), "tcp", addr)
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
	go func() {
		<-ctx.Done()
		l.Close()
	}()
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
			_, _ = io.Copy(c, c)
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(drain):
	}
	return nil
}
