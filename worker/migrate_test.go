package worker

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/baton-gw/baton/handoff"
)

// startMigrating registers a worker that asks for migration, grants it, and waits for READY.
func startMigrating(t *testing.T, g *fakeGateway) (*Listener, *gwChan) {
	t.Helper()
	type result struct {
		l   *Listener
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := Listen(WithMigration())
		done <- result{l, err}
	}()
	c := g.accept()
	c.buf = make([]byte, handoff.MaxLargeMessage)
	if h := c.hello(); h.Flags&handoff.HelloMigrate == 0 {
		t.Fatalf("HELLO flags %v lack MIGRATE", h.Flags)
	}
	c.send(handoff.AppendWelcome(nil, &handoff.Welcome{Version: 1, PingInterval: time.Second, Generation: 7,
		Flags: handoff.WelcomeMigrate}))
	var r result
	select {
	case r = <-done:
	case <-time.After(testTimeout):
		t.Fatal("Listen did not return after WELCOME")
	}
	if r.err != nil {
		t.Fatalf("Listen: %v", r.err)
	}
	t.Cleanup(func() { r.l.Close() })
	if err := r.l.Ready(); err != nil {
		t.Fatal(err)
	}
	c.expect(handoff.TypeReady)
	return r.l, c
}

// session is one handed-off connection as the test sees it: the client end and the worker's
// Conn.
type testSession struct {
	id     uint64
	client *net.TCPConn
	conn   *Conn
}

func handOffN(t *testing.T, g *fakeGateway, c *gwChan, l *Listener, n int) []testSession {
	t.Helper()
	out := make([]testSession, n)
	for i := range out {
		client, id := g.handOff(c)
		out[i] = testSession{id: id, client: client, conn: mustAccept(t, l)}
	}
	return out
}

func (c *gwChan) migrate(d time.Duration, ids ...uint64) {
	c.t.Helper()
	c.send(handoff.AppendMigrate(nil, &handoff.Migrate{Deadline: d, IDs: ids}))
}

// recvHandback reads until a HANDBACK (CLOSED may come meanwhile) and returns it with its fd,
// closed at cleanup.
func (c *gwChan) recvHandback() (handoff.Handback, *net.TCPConn) {
	c.t.Helper()
	for {
		c.ch.Conn().SetReadDeadline(time.Now().Add(testTimeout))
		msg, fd, err := c.ch.Recv(c.buf)
		if err != nil {
			c.t.Fatalf("waiting for HANDBACK: %v", err)
		}
		t, body, err := handoff.Split(msg)
		if err != nil {
			closeFD(fd)
			c.t.Fatal(err)
		}
		switch t {
		case handoff.TypeClosed:
			c.noteClosed(body)
			continue
		case handoff.TypeHandback:
		default:
			closeFD(fd)
			c.t.Fatalf("worker sent %s, want HANDBACK", t)
		}
		h, err := handoff.ParseHandback(body)
		if err != nil {
			closeFD(fd)
			c.t.Fatal(err)
		}
		f := os.NewFile(uintptr(fd), "handback")
		nc, err := net.FileConn(f)
		f.Close()
		if err != nil {
			c.t.Fatal(err)
		}
		c.t.Cleanup(func() { nc.Close() })
		return h, nc.(*net.TCPConn)
	}
}

func waitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(testTimeout):
		t.Fatalf("%s: MigrateRequested not closed", what)
	}
}

func notClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
		t.Fatalf("%s: MigrateRequested closed, want open", what)
	default:
	}
}

func readExactly(t *testing.T, r net.Conn, n int) string {
	t.Helper()
	r.SetReadDeadline(time.Now().Add(testTimeout))
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// MIGRATE of every session: the program hands one back and declines the other. The socket
// travels with the client's unread bytes; the handed-back conn is closed here without CLOSED,
// Live drops, and a re-registration counts only the conn kept.
func TestMigrateAllHandBackAndDecline(t *testing.T) {
	g := newGateway(t)
	l, c := startMigrating(t, g)
	ss := handOffN(t, g, c, l, 2)
	a, b := ss[0], ss[1]
	a.conn.SetGroup("room-1")
	roundTrip(t, a.client, a.conn, "hello\n")
	if _, err := a.client.Write([]byte("unread by v1\n")); err != nil {
		t.Fatal(err)
	}

	c.migrate(time.Minute)
	waitClosed(t, a.conn.MigrateRequested(), "a")
	waitClosed(t, b.conn.MigrateRequested(), "b")
	if d := time.Until(a.conn.MigrateDeadline()); d < 50*time.Second || d > time.Minute {
		t.Fatalf("MigrateDeadline in %v, want about a minute", d)
	}
	if err := a.conn.HandBack([]byte("lines=1")); err != nil {
		t.Fatal(err)
	}
	h, moved := c.recvHandback()
	want := handoff.ConnInfo{ID: a.id, Client: fakeClient, Local: fakeLocal, Listener: "game"}
	if h.Conn != want || h.Group != "room-1" || h.GroupSize != 1 || string(h.State) != "lines=1" {
		t.Fatalf("HANDBACK %+v, want conn %+v, group room-1 of 1, state lines=1", h, want)
	}
	// The bytes the client sent before the hand-back are still in the socket, for the next
	// owner; and the socket still reaches the client.
	if got := readExactly(t, moved, len("unread by v1\n")); got != "unread by v1\n" {
		t.Fatalf("next owner read %q", got)
	}
	roundTrip(t, a.client, moved, "on v2\n")

	if _, err := a.conn.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Read after HandBack: %v, want net.ErrClosed", err)
	}
	if _, err := a.conn.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Write after HandBack: %v, want net.ErrClosed", err)
	}
	if err := a.conn.Close(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Close after HandBack: %v, want net.ErrClosed", err)
	}
	if l.Live() != 1 {
		t.Fatalf("Live %d after one hand-back of two, want 1", l.Live())
	}
	if err := a.conn.HandBack(nil); !errors.Is(err, ErrNotAsked) {
		t.Fatalf("second HandBack: %v, want ErrNotAsked", err)
	}

	if err := b.conn.Decline(); err != nil {
		t.Fatal(err)
	}
	if ids := c.expectIDs(handoff.TypeDecline); len(ids) != 1 || ids[0] != b.id {
		t.Fatalf("DECLINE %v, want [%d]", ids, b.id)
	}
	notClosed(t, b.conn.MigrateRequested(), "b after Decline")
	if err := b.conn.Decline(); !errors.Is(err, ErrNotAsked) {
		t.Fatalf("second Decline: %v, want ErrNotAsked", err)
	}
	roundTrip(t, b.client, b.conn, "still on v1\n")

	c.barrier()
	if c.closed[a.id] != 0 {
		t.Fatalf("CLOSED sent for the handed-back id %d", a.id)
	}
	c.ch.Close()
	c2 := g.accept()
	if h := c2.hello(); h.Live != 1 {
		t.Fatalf("re-registration HELLO live %d, want 1 (the handed-back session is not ours)", h.Live)
	}
}

// MIGRATE of a list: only the listed sessions are asked; group sizes count the listed sessions
// of each group; an id the worker does not hold is ignored.
func TestMigrateListGroupSizes(t *testing.T) {
	g := newGateway(t)
	l, c := startMigrating(t, g)
	ss := handOffN(t, g, c, l, 5)
	groups := []string{"red", "red", "red", "blue", ""}
	for i, s := range ss {
		s.conn.SetGroup(groups[i])
	}
	// ss[2] (red) is not listed: red counts 2.
	c.migrate(time.Minute, ss[0].id, ss[1].id, ss[3].id, ss[4].id, 999999)
	for _, i := range []int{0, 1, 3, 4} {
		waitClosed(t, ss[i].conn.MigrateRequested(), groups[i])
	}
	notClosed(t, ss[2].conn.MigrateRequested(), "unlisted")
	if err := ss[2].conn.HandBack(nil); !errors.Is(err, ErrNotAsked) {
		t.Fatalf("HandBack of an unlisted conn: %v, want ErrNotAsked", err)
	}
	// A later SetGroup does not change what this MIGRATE computed.
	ss[0].conn.SetGroup("green")
	wantSize := map[uint64]uint32{ss[0].id: 2, ss[1].id: 2, ss[3].id: 1, ss[4].id: 0}
	wantGroup := map[uint64]string{ss[0].id: "red", ss[1].id: "red", ss[3].id: "blue", ss[4].id: ""}
	for _, i := range []int{0, 1, 3, 4} {
		if err := ss[i].conn.HandBack([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		h, _ := c.recvHandback()
		if h.Conn.ID != ss[i].id || h.Group != wantGroup[h.Conn.ID] || h.GroupSize != wantSize[h.Conn.ID] || !bytes.Equal(h.State, []byte{byte(i)}) {
			t.Fatalf("HANDBACK %+v, want id %d group %q size %d", h, ss[i].id, wantGroup[ss[i].id], wantSize[ss[i].id])
		}
	}
	if l.Live() != 1 {
		t.Fatalf("Live %d, want 1", l.Live())
	}
	roundTrip(t, ss[2].client, ss[2].conn, "unlisted stays\n")
}

// Sessions the program does not answer are declined at the deadline, and the program's
// request lapses.
func TestMigrateDeadlineDeclines(t *testing.T) {
	g := newGateway(t)
	l, c := startMigrating(t, g)
	ss := handOffN(t, g, c, l, 2)
	c.migrate(300*time.Millisecond, ss[0].id, ss[1].id)
	waitClosed(t, ss[0].conn.MigrateRequested(), "0")
	ids := c.expectIDs(handoff.TypeDecline)
	if len(ids) != 2 || !(ids[0] == ss[0].id && ids[1] == ss[1].id || ids[0] == ss[1].id && ids[1] == ss[0].id) {
		t.Fatalf("DECLINE %v, want both of %d %d", ids, ss[0].id, ss[1].id)
	}
	notClosed(t, ss[0].conn.MigrateRequested(), "after the deadline")
	if err := ss[0].conn.HandBack(nil); !errors.Is(err, ErrNotAsked) {
		t.Fatalf("HandBack after the deadline: %v, want ErrNotAsked", err)
	}
	// A later MIGRATE may ask again.
	c.migrate(time.Minute, ss[0].id)
	waitClosed(t, ss[0].conn.MigrateRequested(), "asked again")
	if err := ss[0].conn.HandBack([]byte("again")); err != nil {
		t.Fatal(err)
	}
	if h, _ := c.recvHandback(); h.Conn.ID != ss[0].id || string(h.State) != "again" {
		t.Fatalf("HANDBACK %+v", h)
	}
	roundTrip(t, ss[1].client, ss[1].conn, "kept\n")
}

// A state bigger than MaxState cannot travel: the session is declined and stays usable.
func TestHandBackStateTooBig(t *testing.T) {
	g := newGateway(t)
	l, c := startMigrating(t, g)
	s := handOffN(t, g, c, l, 1)[0]
	c.migrate(time.Minute)
	waitClosed(t, s.conn.MigrateRequested(), "asked")
	err := s.conn.HandBack(make([]byte, handoff.MaxState+1))
	if !errors.Is(err, handoff.ErrStateTooBig) {
		t.Fatalf("HandBack of %d bytes: %v, want ErrStateTooBig", handoff.MaxState+1, err)
	}
	if ids := c.expectIDs(handoff.TypeDecline); len(ids) != 1 || ids[0] != s.id {
		t.Fatalf("DECLINE %v, want [%d]", ids, s.id)
	}
	roundTrip(t, s.client, s.conn, "still mine\n")
	if l.Live() != 1 {
		t.Fatalf("Live %d, want 1", l.Live())
	}
	// The largest state that fits does travel.
	c.migrate(time.Minute)
	waitClosed(t, s.conn.MigrateRequested(), "asked again")
	big := bytes.Repeat([]byte{0xab}, handoff.MaxState)
	if err := s.conn.HandBack(big); err != nil {
		t.Fatal(err)
	}
	if h, _ := c.recvHandback(); !bytes.Equal(h.State, big) {
		t.Fatalf("state of %d bytes arrived as %d", len(big), len(h.State))
	}
}

// A failed HANDBACK send leaves the conn with the program, usable, and counted.
func TestHandBackSendFails(t *testing.T) {
	g := newGateway(t)
	l, c := startMigrating(t, g)
	s := handOffN(t, g, c, l, 1)[0]
	c.migrate(time.Minute)
	waitClosed(t, s.conn.MigrateRequested(), "asked")
	// The gateway stops reading: the worker's sends fail with EPIPE, its reader sees no EOF.
	if err := c.ch.Conn().CloseRead(); err != nil {
		t.Fatal(err)
	}
	err := s.conn.HandBack([]byte("state"))
	if err == nil {
		t.Fatal("HandBack succeeded on a channel the gateway no longer reads")
	}
	if errors.Is(err, ErrNotAsked) {
		t.Fatalf("HandBack: %v; want the send's failure", err)
	}
	if l.Live() != 1 {
		t.Fatalf("Live %d after a failed HandBack, want 1", l.Live())
	}
	roundTrip(t, s.client, s.conn, "still served\n")
	c.ch.Close()
	c2 := g.accept()
	if h := c2.hello(); h.Live != 1 {
		t.Fatalf("re-registration HELLO live %d, want 1", h.Live)
	}
	c2.welcome()
	c2.barrier()
	if err := s.conn.Close(); err != nil {
		t.Fatal(err)
	}
	if ids := c2.expectIDs(handoff.TypeClosed); len(ids) != 1 || ids[0] != s.id {
		t.Fatalf("CLOSED %v, want [%d]", ids, s.id)
	}
}

// A RESUME is a CONN with a state: acked before the program can read, delivered by Accept
// with its state and the client's addresses; the bytes the client sent meanwhile are there.
func TestResume(t *testing.T) {
	g := newGateway(t)
	l, c := startMigrating(t, g)
	client, server := g.connect()
	if _, err := client.Write([]byte("sent while moving\n")); err != nil {
		t.Fatal(err)
	}
	state := bytes.Repeat([]byte("s"), 50_000) // past MaxMessage: the large receive buffer
	msg, err := handoff.AppendResume(nil, &handoff.Resume{
		Conn:       handoff.ConnInfo{ID: 77, Client: fakeClient, Local: fakeLocal, Listener: "game"},
		PreviousID: 12, Hops: 2, Group: "room-9", State: state,
	})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := server.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	raw.Control(func(fd uintptr) { serr = c.ch.TrySend(msg, int(fd)) })
	if serr != nil {
		t.Fatal(serr)
	}
	// ACK before Accept: nothing here has read from the socket yet.
	c.awaitAck(77)
	server.Close()
	conn := mustAccept(t, l)
	r, ok := conn.Resumed()
	if !ok || r.PreviousID != 12 || r.Hops != 2 || r.Group != "room-9" || !bytes.Equal(r.State, state) {
		t.Fatalf("Resumed() = %+v (%d bytes of state), %v", r.PreviousID, len(r.State), ok)
	}
	if conn.ID() != 77 || conn.RemoteAddr().String() != fakeClient.String() || conn.LocalAddr().String() != fakeLocal.String() {
		t.Fatalf("conn %d %v %v", conn.ID(), conn.RemoteAddr(), conn.LocalAddr())
	}
	if got := readExactly(t, conn, len("sent while moving\n")); got != "sent while moving\n" {
		t.Fatalf("read %q", got)
	}
	roundTrip(t, client, conn, "resumed\n")

	// It can move on again, under its new id and with its addresses.
	c.migrate(time.Minute)
	waitClosed(t, conn.MigrateRequested(), "resumed conn")
	if err := conn.HandBack([]byte("next")); err != nil {
		t.Fatal(err)
	}
	h, _ := c.recvHandback()
	if h.Conn.ID != 77 || h.Conn.Client != fakeClient || h.Conn.Listener != "game" {
		t.Fatalf("HANDBACK %+v", h.Conn)
	}
}

// Without the grant, MIGRATE is a protocol error, and a plain Conn is not a resumed one.
func TestMigrateNotGranted(t *testing.T) {
	g := newGateway(t)
	l, c := startReady(t, g)
	s := handOffN(t, g, c, l, 1)[0]
	if _, ok := s.conn.Resumed(); ok {
		t.Fatal("a CONN reports Resumed")
	}
	c.migrate(time.Minute)
	if e, err := handoff.ParseError(c.expect(handoff.TypeError)); err != nil || e.Code != handoff.CodeUnexpected {
		t.Fatalf("ERROR %v (%v), want UNEXPECTED", e, err)
	}
	notClosed(t, s.conn.MigrateRequested(), "not granted")
}
