package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/baton-gw/baton/worker"
)

// printer is a worker that writes a line to stdout for every message it echoes, with SIGPIPE
// at its default disposition: a write into a pipe nobody reads would kill it with all its
// sessions (the Go runtime exits on EPIPE from fd 1 or 2 unless SIGPIPE is ignored).
func printer() int {
	l, err := worker.Listen()
	if err != nil {
		fmt.Fprintln(os.Stderr, "printer:", err)
		return 1
	}
	if signal.Ignored(syscall.SIGPIPE) {
		fmt.Fprintln(os.Stderr, "printer: SIGPIPE is ignored: worker.Listen must leave it at its default")
		return 3
	}
	gen, slot := os.Getenv("BATON_GENERATION"), os.Getenv("BATON_WORKER")
	for {
		c, err := l.Accept()
		if err != nil {
			break
		}
		go func() {
			defer c.Close()
			fmt.Fprintf(c, "printer gen=%s slot=%s pid=%d\n", gen, slot, os.Getpid())
			r := bufio.NewScanner(c)
			for r.Scan() {
				fmt.Printf("printer gen=%s slot=%s pid=%d: %s\n", gen, slot, os.Getpid(), r.Text())
				if _, err := fmt.Fprintf(c, "%s\n", r.Text()); err != nil {
					return
				}
			}
		}()
	}
	l.Wait(context.Background()) // drained: the sessions in hand play out
	return 0
}
