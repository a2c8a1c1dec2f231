// Package demo is batond's built-in demo game, run when batond is given no worker command: a
// tiny lobby where each line you type is echoed back, after a greeting that says which worker
// (slot, pid, generation) serves you. `nc 127.0.0.1 7000` is enough to play.
package demo

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/baton-gw/baton/worker"
)

// Main runs one demo worker under batond and returns the process exit code. label (a version
// name such as "v2", may be empty) appears in the greeting, so a deployment shows which
// release serves a client.
func Main(label string) int {
	l, err := worker.Listen()
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo worker:", err)
		return 1
	}
	name := "baton demo"
	if label != "" {
		name += " " + label
	}
	greeting := fmt.Sprintf("%s · worker %d · pid %d · generation %d\n", name, l.Slot(), os.Getpid(), l.Generation())
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				break // drained: serve who is here, then leave
			}
			fmt.Fprintln(os.Stderr, "demo worker: accept:", err)
			return 1
		}
		go serve(c, greeting)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 24*time.Hour)
	defer cancel()
	_ = l.Wait(ctx)
	return 0
}

func serve(c net.Conn, greeting string) {
	defer c.Close()
	if _, err := c.Write([]byte(greeting)); err != nil {
		return
	}
	r := bufio.NewReaderSize(c, 4096)
	for {
		line, err := r.ReadSlice('\n')
		if len(line) > 0 {
			if _, werr := c.Write(line); werr != nil {
				return
			}
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
	}
}
