package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/cmd/internal/demo"
	"github.com/baton-gw/baton/handoff"
	"github.com/baton-gw/baton/worker"
)

// roleEnv makes this test binary play a worker (see TestMain). Its value is ROLE or ROLE@SLOT:
// the slot misbehaves as ROLE the first time it starts (a marker in roleDirEnv remembers) and
// behaves as the demo game otherwise, and every other slot is the demo game.
const (
	roleEnv    = "BATON_TEST_ROLE"
	roleDirEnv = "BATON_TEST_DIR"
)

func runRole(spec string) int {
	role, slot, scoped := strings.Cut(spec, "@")
	switch role {
	case "intruder":
		return intruder()
	case "printer":
		return printer()
	case "peer":
		return peerWorker()
	case "gated", "decliner", "noack", "dieonresume":
		return migrationRole(role, slot)
	}
	if scoped {
		if slot != os.Getenv("BATON_WORKER") {
			return demo.Main("")
		}
		marker := filepath.Join(os.Getenv(roleDirEnv), "misbehaved-"+slot)
		if _, err := os.Stat(marker); err == nil {
			return demo.Main("")
		}
		os.WriteFile(marker, []byte(strconv.Itoa(os.Getpid())), 0o600)
	}
	switch role {
	case "demo":
		return demo.Main("")
	case "garbage": // garbage instead of HELLO
		ch := mustDial()
		ch.Send([]byte("GET / HTTP/1.1\r\n\r\n"))
		return waitEnd(ch, false)
	case "garbage-after": // a good handshake, then garbage
		ch := handshake(1, 1, os.Getenv("BATON_TOKEN"))
		ch.Send(handoff.AppendEmpty(nil, handoff.TypeReady))
		time.Sleep(100 * time.Millisecond)
		ch.Send([]byte{0x42, 0, 3, 0, 'b', 'a', 'd'})
		return waitEnd(ch, true)
	case "oversize":
		ch := handshake(1, 1, os.Getenv("BATON_TOKEN"))
		big := make([]byte, 3*handoff.MaxMessage)
		big[0] = byte(handoff.TypeReady)
		ch.Conn().Write(big) // around Channel.Send, which refuses to send it
		return waitEnd(ch, false)
	case "badversion":
		ch := handshake(9, 9, os.Getenv("BATON_TOKEN"))
		return waitEnd(ch, false)
	case "badtoken":
		ch := handshake(1, 1, strings.Repeat("0", 64))
		return waitEnd(ch, false)
	case "forgetful":
		return forgetful()
	}
	fmt.Fprintln(os.Stderr, "unknown role", role)
	return 3
}

func mustDial() *handoff.Channel {
	ch, err := handoff.Dial(os.Getenv("BATON_SOCKET"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	return ch
}

// handshake sends a HELLO and returns the channel whatever the answer (roles test rejection).
func handshake(lo, hi uint16, token string) *handoff.Channel {
	ch := mustDial()
	slot, _ := strconv.Atoi(os.Getenv("BATON_WORKER"))
	gen, _ := strconv.ParseUint(os.Getenv("BATON_GENERATION"), 10, 64)
	ch.Send(handoff.AppendHello(nil, &handoff.Hello{MinVersion: lo, MaxVersion: hi, PID: uint32(os.Getpid()),
		Slot: uint32(slot), Generation: gen, Token: token}))
	return ch
}

// waitEnd reads until batond closes the channel, printing what it said; exit 1 (a misbehaving
// worker "crashes"). A CONN reaching a worker that never completed a good handshake
// (registered false) is reported loudly; one that did register (garbage-after) may get
// connections before it misbehaves, and batond must re-dispatch them (it never acks).
func waitEnd(ch *handoff.Channel, registered bool) int {
	buf := make([]byte, handoff.MaxMessage)
	for {
		msg, fd, err := ch.Recv(buf)
		if err != nil {
			fmt.Fprintln(os.Stderr, "channel ended:", err)
			return 1
		}
		typ, body, _ := handoff.Split(msg)
		switch typ {
		case handoff.TypeConn:
			if !registered {
				fmt.Fprintln(os.Stderr, "MISBEHAVING WORKER GOT A CLIENT")
				os.Exit(9)
			}
		case handoff.TypeError:
			e, _ := handoff.ParseError(body)
			fmt.Fprintf(os.Stderr, "rejected: %v\n", e)
		}
		if fd >= 0 {
			os.NewFile(uintptr(fd), "").Close()
		}
	}
}

// intruder registers from outside batond (possibly as another uid) with the slot token it was
// given and reports on stdout what happened: "rejected CODE" or "got-conn" or "welcomed".
func intruder() int {
	ch, err := handoff.Dial(os.Getenv("BATON_SOCKET"))
	if err != nil {
		fmt.Println("dial-failed", errors.Unwrap(err))
		return 0
	}
	slot, _ := strconv.Atoi(os.Getenv("BATON_WORKER"))
	gen, _ := strconv.ParseUint(os.Getenv("BATON_GENERATION"), 10, 64)
	ch.Send(handoff.AppendHello(nil, &handoff.Hello{MinVersion: 1, MaxVersion: 1, PID: uint32(os.Getpid()),
		Slot: uint32(slot), Generation: gen, Token: os.Getenv("BATON_TOKEN"), Flags: handoff.HelloReady}))
	buf := make([]byte, handoff.MaxMessage)
	ch.Conn().SetReadDeadline(time.Now().Add(3 * time.Second))
	result := "nothing"
	for {
		msg, fd, err := ch.Recv(buf)
		if err != nil {
			break
		}
		typ, body, _ := handoff.Split(msg)
		switch typ {
		case handoff.TypeConn:
			os.NewFile(uintptr(fd), "").Close()
			fmt.Println("got-conn")
			return 0
		case handoff.TypeError:
			e, _ := handoff.ParseError(body)
			result = "rejected " + e.Code.String()
		case handoff.TypeWelcome:
			result = "welcomed"
			ch.Send(handoff.AppendEmpty(nil, handoff.TypeReady))
		}
	}
	fmt.Println(result)
	return 0
}

// forgetful is a worker that forgets it was drained: at its first DRAIN it drops its channel
// and registers again without the DRAINING flag. It leaves markers in roleDirEnv: "redrained"
// when batond drains it again, "got-conn" (and exit 9) if batond hands it a client after all.
func forgetful() int {
	dir := os.Getenv(roleDirEnv)
	register := func() *handoff.Channel {
		ch := mustDial()
		slot, _ := strconv.Atoi(os.Getenv("BATON_WORKER"))
		gen, _ := strconv.ParseUint(os.Getenv("BATON_GENERATION"), 10, 64)
		ch.Send(handoff.AppendHello(nil, &handoff.Hello{MinVersion: 1, MaxVersion: 1, PID: uint32(os.Getpid()),
			Slot: uint32(slot), Generation: gen, Token: os.Getenv("BATON_TOKEN"), Flags: handoff.HelloReady}))
		ch.Send(handoff.AppendEmpty(nil, handoff.TypeReady))
		return ch
	}
	ch := register()
	drains := 0
	buf := make([]byte, handoff.MaxMessage)
	for {
		msg, fd, err := ch.Recv(buf)
		if fd >= 0 {
			os.NewFile(uintptr(fd), "").Close()
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "channel ended:", err)
			return 1
		}
		typ, body, _ := handoff.Split(msg)
		switch typ {
		case handoff.TypePing:
			n, _ := handoff.ParseNonce(typ, body)
			ch.Send(handoff.AppendNonce(nil, handoff.TypePong, n))
		case handoff.TypeConn: // HELLO asked for neither batches nor REFUSE
			if drains > 0 {
				os.WriteFile(filepath.Join(dir, "got-conn"), nil, 0o600)
				fmt.Fprintln(os.Stderr, "DRAINED WORKER GOT A CLIENT")
				os.Exit(9)
			}
			// Before its drain (the self-check, early clients): taken and hung up at once.
			var info handoff.ConnInfo
			handoff.ParseConn(body, &info)
			ch.Send(handoff.AppendIDs(nil, handoff.TypeAck, []uint64{info.ID}))
			ch.Send(handoff.AppendIDs(nil, handoff.TypeClosed, []uint64{info.ID}))
		case handoff.TypeDrain:
			if drains++; drains == 1 {
				ch.Close()
				ch = register()
			} else {
				os.WriteFile(filepath.Join(dir, "redrained"), nil, 0o600)
			}
		}
	}
}

// migrationRole plays one of the roles of the migration fault tests (migrate_fault_test.go).
// Its spec is ROLE@SLOT/GEN: the worker of that slot in that generation plays ROLE the first
// time it starts there (a marker in roleDirEnv remembers); every other worker, that slot's
// replacement included, is the demo game, whose sessions the roles' resume and vice versa.
func migrationRole(role, where string) int {
	slot, gen, _ := strings.Cut(where, "/")
	if slot != os.Getenv("BATON_WORKER") || gen != os.Getenv("BATON_GENERATION") {
		return demo.Main("")
	}
	marker := filepath.Join(os.Getenv(roleDirEnv), "played-"+role+"-"+gen+"-"+slot)
	if _, err := os.Stat(marker); err == nil {
		return demo.Main("")
	}
	os.WriteFile(marker, []byte(strconv.Itoa(os.Getpid())), 0o600)
	switch role {
	case "gated", "decliner":
		return steeredEcho(role == "decliner")
	default:
		return unacking(role == "dieonresume")
	}
}

// steeredEcho is the demo game as far as a client can tell (the same greeting and echo, and
// the same migration state, so that the demo of the next generation resumes its sessions with
// their counts), but the test steers its answers to MIGRATE:
//   - gated: a session batond asked for is handed back only once the test allows it. The file
//     "release" in roleDirEnv holds how many sessions may have been handed back in all (none
//     while it is missing); the others keep playing here, unanswered, until the request
//     lapses. The client port of each session handed back is appended to the file "handed".
//     So the test knows, to the session, what this worker still owns when it strikes.
//   - decliner: every session batond asks for is declined at once.
func steeredEcho(decline bool) int {
	l, err := worker.Listen(worker.WithMigration())
	if err != nil {
		fmt.Fprintln(os.Stderr, "steered worker:", err)
		return 1
	}
	e := &steered{dir: os.Getenv(roleDirEnv), decline: decline,
		greeting: fmt.Sprintf("baton demo · worker %d · pid %d · generation %d\n", l.Slot(), os.Getpid(), l.Generation())}
	done := make(chan struct{})
	gated := make(chan struct{})
	if decline {
		close(gated)
	} else {
		go func() { defer close(gated); e.gate(done) }()
	}
	for {
		c, err := l.AcceptConn()
		if err != nil {
			break // drained: serve who is here, then leave
		}
		go e.serve(c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	_ = l.Wait(ctx)
	close(done)
	<-gated
	return 0
}

type steered struct {
	dir      string
	decline  bool
	greeting string

	mu       sync.Mutex
	sessions []*steeredConn // in the order accepted
	released int
}

type steeredConn struct {
	c        *worker.Conn
	release  chan struct{} // closed when the test allows this session to be handed back
	released bool
	ended    bool
}

// gate releases asked-for sessions, in the order accepted, up to the number in "release".
func (e *steered) gate(done <-chan struct{}) {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
		}
		b, err := os.ReadFile(filepath.Join(e.dir, "release"))
		if err != nil {
			continue
		}
		allow, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		e.mu.Lock()
		for _, s := range e.sessions {
			if e.released >= allow {
				break
			}
			if s.released || s.ended || !connAsked(s.c) {
				continue
			}
			s.released = true
			e.released++
			close(s.release)
			s.c.SetReadDeadline(time.Now()) // wakes its reader, which hands it back
		}
		e.mu.Unlock()
	}
}

func connAsked(c *worker.Conn) bool {
	select {
	case <-c.MigrateRequested():
		return true
	default:
		return false
	}
}

func (e *steered) serve(c *worker.Conn) {
	s := &steeredConn{c: c, release: make(chan struct{})}
	e.mu.Lock()
	e.sessions = append(e.sessions, s)
	e.mu.Unlock()
	stop := make(chan struct{})
	defer func() {
		close(stop)
		e.mu.Lock()
		s.ended = true
		e.mu.Unlock()
	}()
	if e.decline {
		go declineAll(c, stop)
	}
	if _, err := c.Write([]byte(e.greeting)); err != nil {
		c.Close()
		return
	}
	_, port, _ := net.SplitHostPort(c.RemoteAddr().String())
	r := bufio.NewReader(c)
	var lines uint64
	var partial []byte
	for {
		b, err := r.ReadBytes('\n')
		partial = append(partial, b...)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			select {
			case <-s.release:
				// The demo's state (cmd/internal/demo): version 1, the lines echoed as a
				// little-endian uint64, then what was read and not echoed.
				rest, _ := r.Peek(r.Buffered())
				state := append(binary.LittleEndian.AppendUint64([]byte{1}, lines), partial...)
				if herr := c.HandBack(append(state, rest...)); herr == nil {
					e.record(port)
					return
				} else {
					fmt.Fprintf(os.Stderr, "steered worker: session %d stays: %v\n", c.ID(), herr)
				}
			default:
			}
			c.SetReadDeadline(time.Time{})
			continue
		}
		if err != nil {
			c.Close()
			return
		}
		if _, err := c.Write(partial); err != nil {
			c.Close()
			return
		}
		lines++
		partial = partial[:0]
	}
}

// declineAll declines every request for c until stop.
func declineAll(c *worker.Conn, stop <-chan struct{}) {
	for {
		select {
		case <-c.MigrateRequested():
			if err := c.Decline(); err != nil {
				fmt.Fprintf(os.Stderr, "decliner: session %d: %v\n", c.ID(), err)
			}
		case <-stop:
			return
		}
	}
}

// record appends a handed-back session's client port to "handed".
func (e *steered) record(port string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	f, err := os.OpenFile(filepath.Join(e.dir, "handed"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		fmt.Fprintln(os.Stderr, "steered worker:", err)
		return
	}
	defer f.Close()
	fmt.Fprintln(f, port)
}

// unacking is a worker of the serving generation, speaking the protocol itself, that takes
// part in migration but never ACKs a RESUME: it keeps the socket until batond gives up on it
// (the handoff timeout: batond SIGKILLs it), or, with die, SIGKILLs itself at the first. Each
// RESUME is recorded as a line of the file "resumes" in roleDirEnv. CONNs (the reload's probe)
// are acked and hung up at once.
func unacking(die bool) int {
	dir := os.Getenv(roleDirEnv)
	ch := mustDial()
	slot, _ := strconv.Atoi(os.Getenv("BATON_WORKER"))
	gen, _ := strconv.ParseUint(os.Getenv("BATON_GENERATION"), 10, 64)
	ch.Send(handoff.AppendHello(nil, &handoff.Hello{MinVersion: 1, MaxVersion: 1, PID: uint32(os.Getpid()),
		Slot: uint32(slot), Generation: gen, Token: os.Getenv("BATON_TOKEN"), Flags: handoff.HelloReady | handoff.HelloMigrate}))
	ch.Send(handoff.AppendEmpty(nil, handoff.TypeReady))
	var held []*os.File // the sockets of the RESUMEs, never acked
	buf := make([]byte, handoff.MaxLargeMessage)
	for {
		msg, fd, err := ch.Recv(buf)
		if err != nil {
			fmt.Fprintln(os.Stderr, "channel ended:", err)
			return 1
		}
		typ, body, _ := handoff.Split(msg)
		switch typ {
		case handoff.TypePing:
			n, _ := handoff.ParseNonce(typ, body)
			ch.Send(handoff.AppendNonce(nil, handoff.TypePong, n))
		case handoff.TypeConn:
			var info handoff.ConnInfo
			handoff.ParseConn(body, &info)
			os.NewFile(uintptr(fd), "").Close()
			ch.Send(handoff.AppendIDs(nil, handoff.TypeAck, []uint64{info.ID}))
			ch.Send(handoff.AppendIDs(nil, handoff.TypeClosed, []uint64{info.ID}))
			continue
		case handoff.TypeResume:
			r, _ := handoff.ParseResume(body)
			f, _ := os.OpenFile(filepath.Join(dir, "resumes"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
			fmt.Fprintf(f, "%d %d\n", r.Conn.ID, r.PreviousID)
			f.Close()
			if die {
				fmt.Fprintln(os.Stderr, "dieonresume: got a RESUME; SIGKILL to myself before the ACK")
				unix.Kill(os.Getpid(), unix.SIGKILL)
			}
			held = append(held, os.NewFile(uintptr(fd), "resumed"))
			fmt.Fprintf(os.Stderr, "noack: holding %d resumed sessions, acking none\n", len(held))
			continue
		}
		if fd >= 0 {
			os.NewFile(uintptr(fd), "").Close()
		}
	}
}
