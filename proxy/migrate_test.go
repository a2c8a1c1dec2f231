package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/handoff"
)

func migrating(t *testing.T, g *Gateway, slot, live int) *fakeWorker {
	t.Helper()
	w := attachProc(t, g, BackendInfo{Slot: slot, Ready: true, Capacity: 100, Migrate: true, Live: live}, deadProc{})
	w.buf = make([]byte, handoff.MaxLargeMessage)
	return w
}

// handBack sends one HANDBACK for a fresh loopback client, whose first bytes ("hi") are sent
// before the handback and left unread; it returns the client end.
func (w *fakeWorker) handBack(id uint64, group string, size uint32, state string) io.ReadWriteCloser {
	w.t.Helper()
	client, fd := acceptedFD(w.t)
	defer unix.Close(fd)
	if _, err := client.Write([]byte("hi")); err != nil {
		w.t.Fatal(err)
	}
	msg, err := handoff.AppendHandback(nil, &handoff.Handback{
		Conn:  handoff.ConnInfo{ID: id, Client: netip.MustParseAddrPort("192.0.2.7:4000"), Local: netip.MustParseAddrPort("10.0.0.1:7000"), Listener: "game"},
		Group: group, GroupSize: size, State: []byte(state)})
	if err != nil {
		w.t.Fatal(err)
	}
	if err := w.ch.TrySend(msg, fd); err != nil {
		w.t.Fatal(err)
	}
	return client
}

// resume reads the next RESUME (skipping PINGs), and its fd.
func (w *fakeWorker) resume() (handoff.Resume, int) {
	w.t.Helper()
	for {
		msg, fd, err := w.ch.Recv(w.buf)
		if err != nil {
			w.t.Fatalf("slot %d: %v", w.b.info.Slot, err)
		}
		typ, body, _ := handoff.Split(msg)
		if typ == handoff.TypePing {
			continue
		}
		if typ != handoff.TypeResume {
			w.t.Fatalf("slot %d got %v, want RESUME", w.b.info.Slot, typ)
		}
		r, err := handoff.ParseResume(body)
		if err != nil {
			w.t.Fatal(err)
		}
		return r, fd
	}
}

func (w *fakeWorker) ack(ids ...uint64) {
	if err := w.ch.Send(handoff.AppendIDs(nil, handoff.TypeAck, ids)); err != nil {
		w.t.Fatal(err)
	}
}

// A handed-back session reaches another worker as a RESUME with its state, its addresses and
// the client's unread bytes; the source is never chosen, and its load drops as for a CLOSED.
func TestHandbackResumes(t *testing.T) {
	g := New(Config{})
	t.Cleanup(g.Close)
	old := migrating(t, g, 0, 1)
	attach(t, g, 1, false) // takes no RESUME: never chosen for one
	fresh := migrating(t, g, 2, 0)
	client := old.handBack(41, "", 0, "name=ann")
	r, fd := fresh.resume()
	defer unix.Close(fd)
	if r.PreviousID != 41 || r.Hops != 1 || string(r.State) != "name=ann" || r.Conn.Client.String() != "192.0.2.7:4000" || r.Conn.Listener != "game" {
		t.Fatalf("RESUME %+v", r)
	}
	if r.Conn.ID == 41 {
		t.Fatal("RESUME reuses the old id")
	}
	fresh.ack(r.Conn.ID)
	buf := make([]byte, 2)
	if _, err := io.ReadFull(fdReader(fd), buf); err != nil || string(buf) != "hi" {
		t.Fatalf("the client's unread bytes: %q %v", buf, err)
	}
	if _, err := unix.Write(fd, []byte("ok")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "ok" {
		t.Fatalf("client reads %q %v", buf, err)
	}
	waitFor(t, 5*time.Second, func() bool { m := g.MigrationStats(); return m.Resumed == 1 && m.Migrating == 0 })
	if old.b.Live() != 0 || fresh.b.Live() != 1 {
		t.Fatalf("live: old %d, fresh %d", old.b.Live(), fresh.b.Live())
	}
	if m := g.MigrationStats(); m.HandedBack != 1 {
		t.Fatalf("stats %+v", m)
	}
}

// A group lands on one worker, chosen for room for the whole group, even when another is less
// loaded per session.
func TestHandbackGroupStaysTogether(t *testing.T) {
	g := New(Config{})
	t.Cleanup(g.Close)
	old := migrating(t, g, 0, 6)
	small := attachInfo(t, g, BackendInfo{Slot: 1, Ready: true, Capacity: 2, Migrate: true})
	small.buf = make([]byte, handoff.MaxLargeMessage)
	big := migrating(t, g, 2, 0)
	for i := range 3 {
		old.handBack(uint64(10+i), "room 3", 3, fmt.Sprint(i))
	}
	for range 3 {
		r, fd := big.resume()
		unix.Close(fd)
		if r.Group != "room 3" {
			t.Fatalf("group %q", r.Group)
		}
		big.ack(r.Conn.ID)
	}
	// A session without a group goes to the least loaded: the small worker, now.
	old.handBack(20, "", 0, "")
	r, fd := small.resume()
	unix.Close(fd)
	small.ack(r.Conn.ID)
}

// A new worker that dies before its ACK: once it is confirmed gone, the session goes to
// another worker, with its state.
func TestResumeRedeliveredAfterKill(t *testing.T) {
	g := New(Config{})
	t.Cleanup(g.Close)
	old := migrating(t, g, 0, 1)
	first := migrating(t, g, 1, 0)
	old.handBack(7, "g", 1, "state-7")
	_, fd := first.resume()
	unix.Close(fd)
	second := migrating(t, g, 2, 0)
	first.ch.Close()
	r, fd := second.resume()
	defer unix.Close(fd)
	if string(r.State) != "state-7" || r.PreviousID != 7 {
		t.Fatalf("re-delivered %+v", r)
	}
	second.ack(r.Conn.ID)
	waitFor(t, 5*time.Second, func() bool { return g.MigrationStats().Resumed == 1 })
}

// A HANDBACK from a worker that holds nothing, or that did not ask for migration, is a
// protocol error, and its fd is not kept.
func TestHandbackUnexpected(t *testing.T) {
	g := New(Config{})
	t.Cleanup(g.Close)
	w := migrating(t, g, 0, 0)
	w.handBack(1, "", 0, "")
	<-w.b.Done()
	if !errors.Is(w.b.Err(), ErrProtocol) {
		t.Fatalf("err %v", w.b.Err())
	}
}

type deadProc struct{}

// deadProc is a worker process that is confirmed gone at once.
func (deadProc) KillAndWait(context.Context) error { return nil }

type fdReader int

func (f fdReader) Read(p []byte) (int, error) {
	for {
		n, err := unix.Read(int(f), p)
		if err == unix.EAGAIN {
			time.Sleep(time.Millisecond)
			continue
		}
		if n == 0 && err == nil {
			return 0, io.EOF
		}
		return n, err
	}
}
