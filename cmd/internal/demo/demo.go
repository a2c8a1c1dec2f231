// Package demo is batond's built-in demo game, run when batond is given no worker command: a
// tiny lobby where each line you type is echoed back, after a greeting that says which worker
// (slot, pid, generation) serves you. `nc 127.0.0.1 7000` is enough to play.
//
// It takes part in live session migration (a reload with -migrate): asked for a session, it
// hands it back with its state (how many lines it echoed, and any partial line it read but did
// not echo yet), and a worker of the new version greets the resumed player with one line and
// carries on counting.
package demo

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/baton-gw/baton/worker"
)

// Main runs one demo worker under batond and returns the process exit code. label (a version
// name such as "v2", may be empty) appears in the greeting, so a deployment shows which
// release serves a client.
func Main(label string) int {
	l, err := worker.Listen(worker.WithMigration())
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo worker:", err)
		return 1
	}
	name := "baton demo"
	if label != "" {
		name += " " + label
	}
	version := label
	if version == "" {
		version = fmt.Sprintf("generation %d", l.Generation())
	}
	g := greeter{
		hello:    fmt.Sprintf("%s · worker %d · pid %d · generation %d\n", name, l.Slot(), os.Getpid(), l.Generation()),
		upgraded: fmt.Sprintf("* the server was upgraded to %s; you are now on worker %d", version, l.Slot()),
	}
	for {
		c, err := l.AcceptConn()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				break // drained: serve who is here (or hand them over), then leave
			}
			fmt.Fprintln(os.Stderr, "demo worker: accept:", err)
			return 1
		}
		go serve(c, &g)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 24*time.Hour)
	defer cancel()
	_ = l.Wait(ctx)
	return 0
}

// greeter holds this worker's two greetings: for a new session, and for one that moved here.
type greeter struct {
	hello    string
	upgraded string // followed by the count of lines the session has echoed
}

// echoState is what travels with a migrating session.
type echoState struct {
	lines   uint64 // complete lines echoed so far, by every worker that served the session
	pending []byte // read from the client but not echoed yet (a partial line)
}

// stateVersion leads the encoded state, so that a later demo can read an older one's.
const stateVersion = 1

func (s *echoState) encode() []byte {
	b := binary.LittleEndian.AppendUint64([]byte{stateVersion}, s.lines)
	return append(b, s.pending...)
}

func decodeState(b []byte) (echoState, error) {
	if len(b) < 9 || b[0] != stateVersion {
		return echoState{}, fmt.Errorf("unknown session state (%d bytes)", len(b))
	}
	return echoState{lines: binary.LittleEndian.Uint64(b[1:9]), pending: b[9:]}, nil
}

func serve(c *worker.Conn, g *greeter) {
	st, greeting := echoState{}, g.hello
	if r, ok := c.Resumed(); ok {
		var err error
		if st, err = decodeState(r.State); err != nil {
			fmt.Fprintf(os.Stderr, "demo worker: session %d (was %d): %v; starting it afresh\n", c.ID(), r.PreviousID, err)
		}
		greeting = fmt.Sprintf("%s (%d lines echoed so far)\n", g.upgraded, st.lines)
	}
	if _, err := c.Write([]byte(greeting)); err != nil {
		c.Close()
		return
	}
	stop := make(chan struct{})
	defer close(stop)
	rearm := make(chan struct{}, 1)
	go interruptOnMigrate(c, stop, rearm)
	// A partial line that came with the session is read first, as if the client just sent it.
	r := bufio.NewReaderSize(io.MultiReader(bytes.NewReader(st.pending), c), 4096)
	st.pending = nil
	if echo(c, r, &st, rearm) {
		return // handed back: the socket is batond's now
	}
	c.Close()
}

// echo echoes lines until the client leaves (false) or the session was handed back (true).
// Reads and writes happen in this goroutine only, so when it hands the session back no write
// is in flight.
func echo(c *worker.Conn, r *bufio.Reader, st *echoState, rearm chan<- struct{}) bool {
	for {
		line, err := r.ReadSlice('\n')
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// Woken for a migration. Bytes read but not echoed travel in the state; unread
			// ones stay in the socket.
			rest, _ := r.Peek(r.Buffered())
			st.pending = append(append([]byte(nil), line...), rest...)
			if migrating(c) {
				herr := c.HandBack(st.encode())
				if herr == nil {
					return true
				}
				fmt.Fprintf(os.Stderr, "demo worker: session %d stays here: %v\n", c.ID(), herr)
			}
			// Still ours (the hand-back failed, or the request lapsed before it): the partial
			// line is echoed when the client completes it.
			r = bufio.NewReaderSize(io.MultiReader(bytes.NewReader(st.pending), c), 4096)
			st.pending = nil
			c.SetReadDeadline(time.Time{})
			select {
			case rearm <- struct{}{}:
			default:
			}
			continue
		}
		if len(line) > 0 {
			if _, werr := c.Write(line); werr != nil {
				return false
			}
			if line[len(line)-1] == '\n' {
				st.lines++
			}
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return false
		}
	}
}

func migrating(c *worker.Conn) bool {
	select {
	case <-c.MigrateRequested():
		return true
	default:
		return false
	}
}

// interruptOnMigrate wakes the reader (a read deadline in the past) when batond asks for the
// session, and waits again after a hand-back that did not happen (rearm).
func interruptOnMigrate(c *worker.Conn, stop <-chan struct{}, rearm <-chan struct{}) {
	for {
		select {
		case <-c.MigrateRequested():
			c.SetReadDeadline(time.Now())
		case <-stop:
			return
		}
		select {
		case <-rearm:
		case <-stop:
			return
		}
	}
}
