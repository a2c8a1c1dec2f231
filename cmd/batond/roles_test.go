package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/baton-gw/baton/cmd/internal/demo"
	"github.com/baton-gw/baton/handoff"
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
