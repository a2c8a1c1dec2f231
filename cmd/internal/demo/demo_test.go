package demo

import (
	"bufio"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-gw/baton/handoff"
)

const timeout = 10 * time.Second

// gw is the gateway's end of the demo worker's channel.
type gw struct {
	t   *testing.T
	ch  *handoff.Channel
	buf []byte
}

func (g *gw) recv() (handoff.Type, []byte, int) {
	g.t.Helper()
	g.ch.Conn().SetReadDeadline(time.Now().Add(timeout))
	msg, fd, err := g.ch.Recv(g.buf)
	if err != nil {
		g.t.Fatal(err)
	}
	typ, body, err := handoff.Split(msg)
	if err != nil {
		g.t.Fatal(err)
	}
	return typ, body, fd
}

func (g *gw) expect(want handoff.Type) ([]byte, int) {
	g.t.Helper()
	typ, body, fd := g.recv()
	if typ != want {
		g.t.Fatalf("demo sent %s, want %s", typ, want)
	}
	return body, fd
}

func (g *gw) sendFD(msg []byte, sc syscall.Conn) {
	g.t.Helper()
	raw, err := sc.SyscallConn()
	if err != nil {
		g.t.Fatal(err)
	}
	var serr error
	raw.Control(func(fd uintptr) { serr = g.ch.TrySend(msg, int(fd)) })
	if serr != nil {
		g.t.Fatal(serr)
	}
}

func (g *gw) expectAck(id uint64) {
	g.t.Helper()
	body, _ := g.expect(handoff.TypeAck)
	if ids, err := handoff.ParseIDs(nil, handoff.TypeAck, body); err != nil || len(ids) != 1 || ids[0] != id {
		g.t.Fatalf("ACK %v (%v), want [%d]", ids, err, id)
	}
}

func readLine(t *testing.T, r *bufio.Reader, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(timeout))
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("reading from the demo: %v (got %q)", err, line)
	}
	return line
}

// startDemo runs Main("v2") as slot 3 against a fake gateway that grants migration, hands it
// one TCP connection (id 1) and returns the gateway, the client and Main's exit code.
func startDemo(t *testing.T) (*gw, *net.TCPConn, chan int) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "workers.sock")
	ln, err := handoff.Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	t.Setenv("BATON_SOCKET", path)
	t.Setenv("BATON_WORKER", "3")
	t.Setenv("BATON_GENERATION", "2")
	t.Setenv("BATON_TOKEN", strings.Repeat("0", 64))
	exit := make(chan int, 1)
	go func() { exit <- Main("v2") }()

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
	g := &gw{t: t, ch: ch, buf: make([]byte, handoff.MaxLargeMessage)}
	body, _ := g.expect(handoff.TypeHello)
	if h, err := handoff.ParseHello(body); err != nil || h.Flags&handoff.HelloMigrate == 0 {
		t.Fatalf("HELLO %+v (%v) does not ask for MIGRATE", h, err)
	}
	g.ch.Send(handoff.AppendWelcome(nil, &handoff.Welcome{Version: 1, PingInterval: time.Minute, Generation: 2, Flags: handoff.WelcomeMigrate}))
	g.expect(handoff.TypeReady)

	tl, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tl.Close() })
	client, err := net.DialTCP("tcp", nil, tl.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err := tl.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	g.sendFD(handoff.AppendConn(nil, &handoff.ConnInfo{ID: 1, Listener: "tcp"}), server)
	g.expectAck(1)
	server.Close()

	return g, client, exit
}

// A session the demo hands back carries its echo count and any partial line; resumed, it is
// greeted with the upgrade line and the count goes on.
func TestMigrateKeepsEchoState(t *testing.T) {
	g, client, exit := startDemo(t)
	cr := bufio.NewReader(client)
	if line := readLine(t, cr, client); !strings.HasPrefix(line, "baton demo v2 · worker 3 · pid ") {
		t.Fatalf("greeting %q", line)
	}
	client.Write([]byte("one\ntwo\n"))
	for _, want := range []string{"one\n", "two\n"} {
		if line := readLine(t, cr, client); line != want {
			t.Fatalf("echo %q, want %q", line, want)
		}
	}
	// A partial line: the demo may have read it (then it travels in the state) or not (then
	// it stays in the socket); either way the next worker completes it.
	client.Write([]byte("par"))
	time.Sleep(50 * time.Millisecond)

	g.ch.Send(handoff.AppendMigrate(nil, &handoff.Migrate{Deadline: timeout}))
	body, fd := g.expect(handoff.TypeHandback)
	hb, err := handoff.ParseHandback(body)
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
	st, err := decodeState(hb.State)
	if err != nil || st.lines != 2 || (string(st.pending) != "par" && len(st.pending) != 0) {
		t.Fatalf("handed-back state %+v (%v), want 2 lines and at most %q pending", st, err, "par")
	}
	t.Logf("partial line travelled in the state: %v", len(st.pending) > 0)

	// Back to a worker (this one, for the test) as a RESUME.
	msg, err := handoff.AppendResume(nil, &handoff.Resume{Conn: handoff.ConnInfo{ID: 2, Listener: "tcp"},
		PreviousID: 1, Hops: 1, State: hb.State})
	if err != nil {
		t.Fatal(err)
	}
	g.sendFD(msg, moved.(syscall.Conn))
	g.expectAck(2)
	moved.Close()
	want := "* the server was upgraded to v2; you are now on worker 3 (2 lines echoed so far)\n"
	if line := readLine(t, cr, client); line != want {
		t.Fatalf("resumed greeting %q, want %q", line, want)
	}
	client.Write([]byte("tial\nthree\n"))
	for _, want := range []string{"partial\n", "three\n"} {
		if line := readLine(t, cr, client); line != want {
			t.Fatalf("echo after resume %q, want %q", line, want)
		}
	}

	// The count went on: hand it back once more.
	g.ch.Send(handoff.AppendMigrate(nil, &handoff.Migrate{Deadline: timeout}))
	body, fd = g.expect(handoff.TypeHandback)
	syscall.Close(fd)
	if hb, err = handoff.ParseHandback(body); err != nil {
		t.Fatal(err)
	}
	if st, err = decodeState(hb.State); err != nil || st.lines != 4 || hb.Conn.ID != 2 {
		t.Fatalf("second hand-back: conn %d, state %+v (%v), want conn 2 with 4 lines", hb.Conn.ID, st, err)
	}

	g.ch.Send(handoff.AppendDrain(nil, &handoff.Drain{Deadline: time.Minute}))
	select {
	case code := <-exit:
		if code != 0 {
			t.Fatalf("demo exited %d after drain, want 0", code)
		}
	case <-time.After(timeout):
		t.Fatal("demo did not exit after DRAIN with every session handed back")
	}
}

func TestDecodeStateRejectsGarbage(t *testing.T) {
	for _, b := range [][]byte{nil, {1, 2, 3}, append([]byte{9}, make([]byte, 8)...)} {
		if _, err := decodeState(b); err == nil {
			t.Errorf("decodeState(%x) accepted it", b)
		}
	}
	s := echoState{lines: 7, pending: []byte("ab")}
	if got, err := decodeState(s.encode()); err != nil || got.lines != 7 || string(got.pending) != "ab" {
		t.Fatalf("round trip %+v %v", got, err)
	}
}

// A request that lapses before the demo answers it (here at once: deadline 0) is declined by
// the library, and the session goes on here, partial line included.
func TestLapsedRequestKeepsSession(t *testing.T) {
	g, client, _ := startDemo(t)
	cr := bufio.NewReader(client)
	readLine(t, cr, client)
	client.Write([]byte("one\npar"))
	if line := readLine(t, cr, client); line != "one\n" {
		t.Fatalf("echo %q", line)
	}
	g.ch.Send(handoff.AppendMigrate(nil, &handoff.Migrate{Deadline: 0}))
	body, _ := g.expect(handoff.TypeDecline)
	if ids, err := handoff.ParseIDs(nil, handoff.TypeDecline, body); err != nil || len(ids) != 1 || ids[0] != 1 {
		t.Fatalf("DECLINE %v (%v), want [1]", ids, err)
	}
	client.Write([]byte("tial\n"))
	if line := readLine(t, cr, client); line != "partial\n" {
		t.Fatalf("echo after a lapsed request %q, want %q", line, "partial\n")
	}
}
