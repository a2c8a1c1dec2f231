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
	// (The count follows the close the client saw.)
	waitStats(t, g, func(s Stats) bool { return s.Closed[ReasonDrained.String()] == 5 && s.Accepted == 5 && s.InFlight == 0 })
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

func TestHistogram(t *testing.T) {
	var h histogram
	for _, d := range []time.Duration{0, 500 * time.Nanosecond, 3 * time.Microsecond, 100 * time.Millisecond, time.Hour} {
		h.observe(d)
	}
	s := h.snapshot()
	if s.Count != 5 || s.Sum != time.Hour+100*time.Millisecond+3*time.Microsecond+500*time.Nanosecond {
		t.Fatalf("count %d sum %v", s.Count, s.Sum)
	}
	at := func(d time.Duration) uint64 {
		for i, b := range s.Bounds {
			if b == d {
				return s.Counts[i]
			}
		}
		t.Fatalf("no bound %v", d)
		return 0
	}
	// ≤1µs: 0 and 0.5µs; ≤4µs: +3µs; ≤131072µs: +100ms; the hour is beyond every bound.
	if at(time.Microsecond) != 2 || at(4*time.Microsecond) != 3 || at(131072*time.Microsecond) != 4 || s.Counts[len(s.Counts)-1] != 4 {
		t.Fatalf("buckets %v %v", s.Bounds, s.Counts)
	}
}

func TestQuantile(t *testing.T) {
	var h histogram
	for i := 0; i < 90; i++ {
		h.observe(10 * time.Microsecond) // bucket < 16 µs
	}
	for i := 0; i < 10; i++ {
		h.observe(3 * time.Millisecond) // bucket < 4096 µs
	}
	s := h.snapshot()
	if p50, p99 := s.Quantile(0.5), s.Quantile(0.99); p50 != 16*time.Microsecond || p99 != 4096*time.Microsecond {
		t.Fatalf("p50 %v p99 %v", p50, p99)
	}
	if (Histogram{}).Quantile(0.5) != 0 {
		t.Fatal("empty histogram")
	}
}
