package proxy

import (
	"sync/atomic"
	"testing"
	"time"
)

// What the latency histograms add to a handoff: the gateway observes the handoff latency once
// per acked connection and the queue wait once per connection that waited (latency.go). These
// benchmarks time one observation; bench/run and BENCHMARKS.md report the figures.

// latencies spreads the observations over the buckets a handoff lands in (a few µs to a few
// ms), so that the benchmark does not time one bucket's cache line only.
var latencies = func() [64]time.Duration {
	var d [64]time.Duration
	for i := range d {
		d[i] = time.Duration(1+i*i*37) * time.Microsecond / 4
	}
	return d
}()

// BenchmarkHistogramObserve: one goroutine, as when one gateway goroutine records its handoffs.
func BenchmarkHistogramObserve(b *testing.B) {
	var h histogram
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		h.observe(latencies[i&63])
	}
	if s := h.snapshot(); s.Count != uint64(b.N) {
		b.Fatalf("%d observations counted, %d made", s.Count, b.N)
	}
}

// BenchmarkHistogramObserveParallel: every P observing into one histogram at once, the worst
// case for its shared counters (they bounce between cores' caches).
func BenchmarkHistogramObserveParallel(b *testing.B) {
	var h histogram
	var made atomic.Uint64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		n := uint64(0)
		for i := 0; pb.Next(); i++ {
			h.observe(latencies[i&63])
			n++
		}
		made.Add(n)
	})
	if s := h.snapshot(); s.Count != made.Load() {
		b.Fatalf("%d observations counted, %d made", s.Count, made.Load())
	}
}

// BenchmarkHistogramHandoff: what one handed-off connection that waited in the queue costs,
// both observations (handoff latency and queue wait).
func BenchmarkHistogramHandoff(b *testing.B) {
	var lat, wait histogram
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		wait.observe(latencies[i&63] / 8)
		lat.observe(latencies[i&63])
	}
}

// The hot path must not allocate: an observation that did would show in every handoff.
func TestHistogramObserveAllocatesNothing(t *testing.T) {
	var h histogram
	i := 0
	if a := testing.AllocsPerRun(1000, func() { h.observe(latencies[i&63]); i++ }); a != 0 {
		t.Errorf("observe allocates %v times", a)
	}
}
