package worker

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-gw/baton/handoff"
)

// A final rejection of a re-registration (PROTOCOL.md "Errors") ends the registration: no
// further HELLO, and Accept returns the rejection, naming its code. The sessions held stay the
// program's.
func TestFinalRejectionOnReregistration(t *testing.T) {
	for _, code := range []handoff.ErrorCode{handoff.CodeVersion, handoff.CodeToken, handoff.CodePeer, handoff.CodeSlot} {
		t.Run(code.String(), func(t *testing.T) {
			g := newGateway(t)
			l, c := startReady(t, g)
			client, _ := g.handOff(c)
			conn := mustAccept(t, l)
			c.ch.Close() // batond goes away; the worker re-registers
			c2 := g.accept()
			c2.hello()
			c2.send(handoff.AppendError(nil, &handoff.Error{Code: code, Reason: "not yours"}))
			c2.expectEOF()

			_, err := acceptTimeout(t, l)
			var he *handoff.Error
			if !errors.As(err, &he) || he.Code != code {
				t.Fatalf("Accept: %v, want the %s rejection", err, code)
			}
			if !strings.Contains(err.Error(), code.String()) {
				t.Fatalf("Accept error %q does not name %s", err, code)
			}
			if rerr := l.Ready(); !errors.As(rerr, &he) || he.Code != code {
				t.Fatalf("Ready: %v, want the %s rejection", rerr, code)
			}
			// No further attempt: the backoff starts at 100 ms, so a retrying worker would have
			// knocked several times within this window.
			g.ln.SetDeadline(time.Now().Add(600 * time.Millisecond))
			if extra, err := g.ln.Accept(); err == nil {
				extra.Close()
				t.Fatalf("worker registered again after a %s rejection", code)
			}
			// The session from before lives on.
			roundTrip(t, client, conn, "still served\n")
			conn.Close()
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// SHUTDOWN (and any code that is not final) ends only the channel: the worker keeps coming back
// with backoff until a batond welcomes it.
func TestShutdownKeepsReregistering(t *testing.T) {
	g := newGateway(t)
	l, c := startReady(t, g)
	client, _ := g.handOff(c)
	conn := mustAccept(t, l)
	c.ch.Close()
	for i := range 3 {
		ci := g.accept()
		if h := ci.hello(); h.Live != 1 {
			t.Fatalf("attempt %d: HELLO live %d, want 1", i, h.Live)
		}
		ci.send(handoff.AppendError(nil, &handoff.Error{Code: handoff.CodeShutdown, Reason: "batond is stopping"}))
		ci.expectEOF()
	}
	c2 := g.accept()
	c2.hello()
	c2.welcome()
	if err := l.Ready(); err != nil {
		t.Fatalf("Ready after SHUTDOWNs: %v", err)
	}
	roundTrip(t, client, conn, "after SHUTDOWN\n")
	client2, id2 := g.handOff(c2)
	conn2 := mustAccept(t, l)
	roundTrip(t, client2, conn2, "new\n")
	conn2.Close()
	c2.awaitClosed(id2)
}

// A later DRAIN replaces the deadline of an earlier one, later or earlier: the batond that sent
// the latest enforces it (PROTOCOL.md "DRAIN").
func TestSecondDrainReplacesDeadline(t *testing.T) {
	g := newGateway(t)
	l, c := startReady(t, g)
	c.send(handoff.AppendDrain(nil, &handoff.Drain{Deadline: time.Minute}))
	c.barrier()
	first := l.DrainDeadline()
	c.ch.Close() // reload: the old batond hands over; the worker re-registers with the new one
	c2 := g.accept()
	if h := c2.hello(); h.Flags&handoff.HelloDraining == 0 {
		t.Fatalf("HELLO flags %#x lack DRAINING", h.Flags)
	}
	c2.welcome()
	before := time.Now()
	c2.send(handoff.AppendDrain(nil, &handoff.Drain{Deadline: 10 * time.Minute}))
	c2.barrier()
	if d := l.DrainDeadline(); d.Before(before.Add(10*time.Minute)) || !d.After(first) {
		t.Fatalf("DrainDeadline %v after a second DRAIN of 10 min (first %v)", d, first)
	}
	before = time.Now()
	c2.send(handoff.AppendDrain(nil, &handoff.Drain{Deadline: 2 * time.Second}))
	c2.barrier()
	if d := l.DrainDeadline(); d.Before(before.Add(2*time.Second)) || d.After(time.Now().Add(2*time.Second)) {
		t.Fatalf("DrainDeadline %v, want 2 s after the latest DRAIN", d)
	}
}

// A Listener closed while draining stays registered until the deadline of the latest DRAIN,
// not the first one's.
func TestLingerFollowsLatestDrain(t *testing.T) {
	g := newGateway(t)
	l, c := startReady(t, g)
	_, id := g.handOff(c)
	conn := mustAccept(t, l)
	c.send(handoff.AppendDrain(nil, &handoff.Drain{Deadline: 300 * time.Millisecond}))
	c.barrier()
	if err := l.Close(); err != nil { // lingers: a connection is still open
		t.Fatal(err)
	}
	c.send(handoff.AppendDrain(nil, &handoff.Drain{Deadline: time.Minute}))
	c.barrier()
	time.Sleep(600 * time.Millisecond) // past the first deadline
	c.barrier()                        // still registered: it answers PING
	conn.Close()
	c.awaitClosed(id)
	c.expectEOF() // the last close ends the registration
}

// envSIGPIPEChild makes the test binary, re-run by TestListenLeavesSIGPIPE, act as a worker.
const envSIGPIPEChild = "BATON_TEST_SIGPIPE_CHILD"

// Listen leaves SIGPIPE's disposition alone. A worker started as batond starts it (stdout and
// stderr a pipe, the pipe's read end at fd 3) writes a line after "batond" has closed its own
// read end and lives on; the same worker without fd 3 (a program that closed it) is killed by
// SIGPIPE at that write, as every Go program writing to a broken pipe on fd 1 is, which proves
// that Listen did not ignore SIGPIPE for it.
func TestListenLeavesSIGPIPE(t *testing.T) {
	if os.Getenv(envSIGPIPEChild) != "" {
		sigpipeChild()
		return
	}
	for _, keep := range []bool{true, false} {
		t.Run(fmt.Sprintf("fd3=%v", keep), func(t *testing.T) {
			g := newGateway(t)
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^TestListenLeavesSIGPIPE$", "-test.count=1")
			cmd.Env = append(os.Environ(), envSIGPIPEChild+"=1", "BATON_OUTPUT_FD=3")
			cmd.Stdout, cmd.Stderr = w, w
			if keep {
				cmd.ExtraFiles = []*os.File{r}
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			w.Close()
			r.Close() // "batond" is gone: only the child's fd 3 (if kept) still reads
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			wait := func() error {
				select {
				case err := <-exited:
					return err
				case <-time.After(testTimeout):
					cmd.Process.Kill()
					<-exited
					t.Fatal("child did not exit")
					return nil
				}
			}
			c := g.accept()
			c.hello()
			c.welcome()
			// The child registered; now it writes, then says goodbye.
			if typ, _, err := c.recvErr(); err != nil || typ != handoff.TypeReady {
				t.Fatalf("child sent %v (%v), not READY; it ended with %v (2: Listen failed, 4: SIGPIPE is ignored)", typ, err, wait())
			}
			c.expectEOF()
			werr := wait()
			if keep {
				if werr != nil {
					t.Fatalf("worker holding fd 3: %v, want a clean exit after writing", werr)
				}
				return
			}
			var ee *exec.ExitError
			if !errors.As(werr, &ee) {
				t.Fatalf("worker without fd 3: %v, want killed by SIGPIPE", werr)
			}
			ws := ee.Sys().(syscall.WaitStatus)
			if !ws.Signaled() || ws.Signal() != syscall.SIGPIPE {
				t.Fatalf("worker without fd 3 ended with %v, want killed by SIGPIPE (did Listen ignore it?)", werr)
			}
		})
	}
}

// sigpipeChild registers, then writes a line to stdout and exits: 0 if the write succeeded, 3
// with the error otherwise (it cannot print it: its output is the pipe in question).
func sigpipeChild() {
	l, err := Listen()
	if err != nil {
		os.Exit(2)
	}
	if signal.Ignored(syscall.SIGPIPE) {
		os.Exit(4)
	}
	if err := l.Ready(); err != nil {
		os.Exit(2)
	}
	time.Sleep(50 * time.Millisecond) // the parent has closed its read end long before
	_, werr := fmt.Fprintln(os.Stdout, "a log line after batond went away")
	l.Close()
	if werr != nil {
		os.Exit(3)
	}
	os.Exit(0)
}
