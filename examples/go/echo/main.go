// Command echo is a minimal baton worker: it writes every byte a client sends straight back.
//
// Run it under batond (`batond -- ./echo`), or alone for local development with
// BATON_FALLBACK_LISTEN=127.0.0.1:7000. When batond tells it to drain, it stops accepting, waits
// until its last client has gone, and exits 0. The protocol conformance suite relies on exactly
// that behaviour, and on exit status 1 (with the reason on stderr) when registration fails. If
// batond refuses it for good later (a final error, PROTOCOL.md), it serves the clients it holds
// until they leave, then says why and exits 1.
//
// With -migrate it takes part in live session migration (a reload with -migrate): asked for a
// session, it stops reading, hands the socket back with the number of bytes it echoed so far
// as the session's state, and a worker that resumes the session goes on counting. It adds no
// byte of its own to the stream (an echo returns exactly what it got), so a resumed session is
// only logged, on stderr.
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/baton-gw/baton/worker"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("echo", flag.ContinueOnError)
	migrate := fs.Bool("migrate", false, "hand sessions back when batond asks (live session migration)")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	var opts []worker.Option
	if *migrate {
		opts = append(opts, worker.WithMigration())
	}
	l, err := worker.Listen(opts...)
	if err != nil {
		return err
	}
	defer l.Close()

	// SIGTERM (batond's drain deadline, or a plain shutdown) and Ctrl-C stop the accept loop;
	// the sessions still open end with the process.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() {
		<-ctx.Done()
		l.Close()
	}()

	var refused error
	for {
		c, err := l.AcceptConn()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				// A final rejection: no more clients will come, but those we hold are still
				// ours to serve.
				refused = err
			}
			break // drained, interrupted or refused: finish below
		}
		if *migrate {
			go echoMigrating(c)
		} else {
			go echo(c)
		}
	}
	// Wait for the last client to leave. A signal meanwhile cuts the wait short; that too is a
	// requested stop, not a failure.
	_ = l.Wait(ctx)
	return refused
}

func echo(c net.Conn) {
	defer c.Close()
	_, _ = io.Copy(c, c)
}

// echoMigrating echoes with a plain read/write loop in one goroutine, so that when batond asks
// for the session no write is in flight and every byte read has been written back: the state
// is just the count of bytes echoed, and the bytes not read yet travel in the socket.
func echoMigrating(c *worker.Conn) {
	var echoed uint64
	if r, ok := c.Resumed(); ok {
		if len(r.State) == 8 {
			echoed = binary.LittleEndian.Uint64(r.State)
		}
		fmt.Fprintf(os.Stderr, "echo: resumed session %d (was %d, %d moves), %d bytes echoed before\n",
			c.ID(), r.PreviousID, r.Hops, echoed)
	}
	stop := make(chan struct{})
	defer close(stop)
	// One goroutine per request wakes the Read below with a deadline in the past.
	watch := func() {
		asked := c.MigrateRequested()
		go func() {
			select {
			case <-asked:
				c.SetReadDeadline(time.Now())
			case <-stop:
			}
		}()
	}
	watch()
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				break
			}
			echoed += uint64(n)
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if c.HandBack(binary.LittleEndian.AppendUint64(nil, echoed)) == nil {
				return // the socket is batond's now
			}
			// Not handed back (the channel dropped, or the request lapsed): still ours.
			c.SetReadDeadline(time.Time{})
			watch()
			continue
		}
		if err != nil {
			break
		}
	}
	c.Close()
}
