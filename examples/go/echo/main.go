// Command echo is a minimal baton worker: it writes every byte a client sends straight back.
//
// Run it under batond (`batond -- ./echo`), or alone for local development with
// BATON_FALLBACK_LISTEN=127.0.0.1:7000. When batond tells it to drain, it stops accepting, waits
// until its last client has gone, and exits 0. The protocol conformance suite relies on exactly
// that behaviour, and on exit status 1 (with the reason on stderr) when registration fails. If
// batond refuses it for good later (a final error, PROTOCOL.md), it serves the clients it holds
// until they leave, then says why and exits 1.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/baton-gw/baton/worker"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		os.Exit(1)
	}
}

func run() error {
	l, err := worker.Listen()
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
		c, err := l.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				// A final rejection: no more clients will come, but those we hold are still
				// ours to serve.
				refused = err
			}
			break // drained, interrupted or refused: finish below
		}
		go echo(c)
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
