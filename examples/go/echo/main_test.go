package main

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/baton-gw/baton/handoff"
)

// TestMain lets the test binary stand in for the echo program: the tests start it again as a
// child, as batond would, with ECHO_RUN_MAIN set.
func TestMain(m *testing.M) {
	if os.Getenv("ECHO_RUN_MAIN") == "1" {
		os.Args = append(os.Args[:1], strings.Fields(os.Getenv("ECHO_ARGS"))...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

const timeout = 10 * time.Second

func start(t *testing.T, env ...string) (*exec.Cmd, *bytes.Buffer, chan error) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "ECHO_RUN_MAIN=1", "BATON_SOCKET=", "BATON_FALLBACK_LISTEN=")
	cmd.Env = append(cmd.Env, env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	return cmd, &stderr, done
}

func exitCode(t *testing.T, done chan error) int {
	t.Helper()
	select {
	case err := <-done:
		done <- err // for the cleanup
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(timeout):
		t.Fatal("echo did not exit")
		return -1
	}
}

func TestNotUnderBaton(t *testing.T) {
	_, stderr, done := start(t)
	if code := exitCode(t, done); code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	if !strings.Contains(stderr.String(), "BATON_SOCKET is not set") {
		t.Fatalf("stderr %q does not say why", stderr)
	}
}

type gw struct {
	t   *testing.T
	ch  *handoff.Channel
	buf []byte
}

func (g *gw) recv() (handoff.Type, []byte) {
	g.t.Helper()
	g.ch.Conn().SetReadDeadline(time.Now().Add(timeout))
	msg, _, err := g.ch.Recv(g.buf)
	if err != nil {
		g.t.Fatal(err)
	}
	typ, body, err := handoff.Split(msg)
	if err != nil {
		g.t.Fatal(err)
	}
	return typ, body
}

func (g *gw) expect(want handoff.Type) []byte {
	g.t.Helper()
	typ, body := g.recv()
	if typ != want {
		g.t.Fatalf("echo sent %s, want %s", typ, want)
	}
	return body
}

func register(t *testing.T, reply func(*gw), env ...string) (*gw, *bytes.Buffer, chan error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "workers.sock")
	ln, err := handoff.Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, stderr, done := start(t, append([]string{"BATON_SOCKET=" + path, "BATON_WORKER=0", "BATON_GENERATION=1",
		"BATON_TOKEN=" + strings.Repeat("0", 64)}, env...)...)
	ln.SetDeadline(time.Now().Add(timeout))
	uc, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	ch, err := handoff.NewChannel(uc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ch.Close() })
	g := &gw{t: t, ch: ch, buf: make([]byte, handoff.MaxMessage)}
	g.expect(handoff.TypeHello)
	reply(g)
	return g, stderr, done
}

func TestRejected(t *testing.T) {
	_, stderr, done := register(t, func(g *gw) {
		g.ch.Send(handoff.AppendError(nil, &handoff.Error{Code: handoff.CodeToken, Reason: "bad token"}))
	})
	if code := exitCode(t, done); code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	if !strings.Contains(stderr.String(), "bad token") {
		t.Fatalf("stderr %q does not say why", stderr)
	}
}

func TestEchoAndDrain(t *testing.T) {
	g, stderr, done := register(t, func(g *gw) {
		g.ch.Send(handoff.AppendWelcome(nil, &handoff.Welcome{Version: 1, PingInterval: time.Second, Generation: 1}))
	})
	g.expect(handoff.TypeReady)

	tl, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	client, err := net.Dial("tcp", tl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := tl.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := server.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	raw.Control(func(fd uintptr) {
		serr = g.ch.TrySend(handoff.AppendConn(nil, &handoff.ConnInfo{ID: 1, Listener: "tcp"}), int(fd))
	})
	if serr != nil {
		t.Fatal(serr)
	}
	if ids, err := handoff.ParseIDs(nil, handoff.TypeAck, g.expect(handoff.TypeAck)); err != nil || len(ids) != 1 || ids[0] != 1 {
		t.Fatalf("ACK %v %v", ids, err)
	}
	server.Close()

	// Every byte comes back verbatim, binary included.
	payload := []byte("line one\nline two\n\x00\xff no newline")
	client.SetDeadline(time.Now().Add(timeout))
	if _, err := client.Write(payload); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(client, got); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("echoed %q (%v), want %q", got, err, payload)
	}

	g.ch.Send(handoff.AppendDrain(nil, &handoff.Drain{Deadline: time.Minute}))
	select {
	case err := <-done:
		done <- err
		t.Fatalf("echo exited (%v) with a client still connected; stderr %q", err, stderr)
	case <-time.After(100 * time.Millisecond):
	}
	client.Close()
	if ids, err := handoff.ParseIDs(nil, handoff.TypeClosed, g.expect(handoff.TypeClosed)); err != nil || len(ids) != 1 || ids[0] != 1 {
		t.Fatalf("CLOSED %v %v", ids, err)
	}
	if code := exitCode(t, done); code != 0 {
		t.Fatalf("exit %d after drain, want 0; stderr %q", code, stderr)
	}
}

// With -migrate, echo hands a session back when asked: the socket, with the bytes the client
// sent meanwhile, and the count of bytes echoed; then, holding nothing, it exits at DRAIN.
func TestMigrateHandsBack(t *testing.T) {
	g, stderr, done := register(t, func(g *gw) {
		g.ch.Send(handoff.AppendWelcome(nil, &handoff.Welcome{Version: 1, PingInterval: time.Minute, Generation: 1,
			Flags: handoff.WelcomeMigrate}))
	}, "ECHO_ARGS=-migrate")
	g.buf = make([]byte, handoff.MaxLargeMessage)
	g.expect(handoff.TypeReady)

	tl, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer tl.Close()
	client, err := net.Dial("tcp", tl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := tl.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := server.SyscallConn()
	var serr error
	raw.Control(func(fd uintptr) {
		serr = g.ch.TrySend(handoff.AppendConn(nil, &handoff.ConnInfo{ID: 1, Listener: "tcp"}), int(fd))
	})
	if serr != nil {
		t.Fatal(serr)
	}
	g.expect(handoff.TypeAck)
	server.Close()
	client.SetDeadline(time.Now().Add(timeout))
	client.Write([]byte("abcd"))
	got := make([]byte, 4)
	if _, err := io.ReadFull(client, got); err != nil || string(got) != "abcd" {
		t.Fatalf("echoed %q (%v)", got, err)
	}

	g.ch.Send(handoff.AppendMigrate(nil, &handoff.Migrate{Deadline: timeout}))
	g.ch.Conn().SetReadDeadline(time.Now().Add(timeout))
	msg, fd, err := g.ch.Recv(g.buf)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "handback")
	moved, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer moved.Close()
	typ, body, err := handoff.Split(msg)
	if err != nil || typ != handoff.TypeHandback {
		t.Fatalf("got %s (%v), want HANDBACK", typ, err)
	}
	h, err := handoff.ParseHandback(body)
	if err != nil || h.Conn.ID != 1 || !bytes.Equal(h.State, []byte{4, 0, 0, 0, 0, 0, 0, 0}) {
		t.Fatalf("HANDBACK %+v (%v), want id 1, 4 bytes echoed", h, err)
	}
	// The socket reaches the client, and what it sends now is for the next owner.
	client.Write([]byte("after"))
	moved.SetDeadline(time.Now().Add(timeout))
	got = make([]byte, 5)
	if _, err := io.ReadFull(moved, got); err != nil || string(got) != "after" {
		t.Fatalf("next owner read %q (%v)", got, err)
	}

	g.ch.Send(handoff.AppendDrain(nil, &handoff.Drain{Deadline: time.Minute}))
	if code := exitCode(t, done); code != 0 {
		t.Fatalf("exit %d after drain with its only session handed back, want 0; stderr %q", code, stderr)
	}
}
