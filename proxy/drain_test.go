package proxy

import (
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// A drained host closes each new client at once and counts it; undrained, it hands clients
// to workers again. The worker's sessions are not touched either way.
func TestHostDrain(t *testing.T) {
	g, l, _ := serve(t, Config{})
	w := attach(t, g, 0, false)
	addr := l.Addr().String()
	g.SetHostDrain(true)
	if !g.HostDrained() {
		t.Fatal("HostDrained false after SetHostDrain(true)")
	}
	for i := 0; i < 5; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
		if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !isReset(err) {
			t.Fatalf("client %d of a drained host: %v, want closed at once", i, err)
		}
	}
	st := g.Stats()
	if st.Closed[ReasonDrained.String()] != 5 || st.Accepted != 5 {
		t.Fatalf("stats %+v: want 5 accepted, 5 closed as %s", st, ReasonDrained)
	}
	g.SetHostDrain(false)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	stop := make(chan struct{})
	time.AfterFunc(2*time.Second, func() { close(stop) })
	if got, _, err := w.answer(stop); got != 1 || err != nil {
		t.Fatalf("after undrain the worker got %d clients (%v), want 1", got, err)
	}
	if st := g.Stats(); st.Acked != 1 || st.Closed[ReasonDrained.String()] != 5 {
		t.Fatalf("after undrain: %+v, want 1 acked", st)
	}
}

func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }
