package proxy

import (
	"errors"
	"net"
	"syscall"
	"testing"
	"time"
)

// A drained host is drained for the balancer (HostDrained); a client that reaches it anyway is
// still handed over, not failed.
func TestHostDrain(t *testing.T) {
	g, l, _ := serve(t, Config{})
	w := attach(t, g, 0, false)
	g.SetHostDrain(true)
	if !g.HostDrained() {
		t.Fatal("HostDrained false after SetHostDrain(true)")
	}
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	stop := make(chan struct{})
	time.AfterFunc(2*time.Second, func() { close(stop) })
	if got, _, err := w.answer(stop); got != 1 || err != nil {
		t.Fatalf("the worker of a drained host got %d clients (%v), want the straggler", got, err)
	}
	g.SetHostDrain(false)
	if g.HostDrained() {
		t.Fatal("still drained")
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
