package proxy

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// Latency histograms, kept on the hot path at the price of two atomic adds per observation (no
// lock, no allocation): bucket i counts durations below 2^i µs, from 1 µs to 2^(histBuckets-1)
// µs (about 33 s); a snapshot turns them into cumulative Prometheus buckets at scrape time.
const histBuckets = 26

type histogram struct {
	counts [histBuckets + 1]atomic.Uint64 // the last one: beyond the largest bound
	sumNS  atomic.Uint64
}

func (h *histogram) observe(d time.Duration) {
	if d < 0 {
		d = 0
	}
	us := uint64(d / time.Microsecond)
	i := bits.Len64(us) // us < 2^i
	if i > histBuckets {
		i = histBuckets
	}
	h.counts[i].Add(1)
	h.sumNS.Add(uint64(d))
}

// Histogram is a snapshot of a latency histogram: Counts[i] is the number of observations at
// most Bounds[i] (cumulative), Count all of them, Sum their total.
type Histogram struct {
	Bounds []time.Duration
	Counts []uint64
	Count  uint64
	Sum    time.Duration
}

func (h *histogram) snapshot() Histogram {
	s := Histogram{Bounds: make([]time.Duration, histBuckets), Counts: make([]uint64, histBuckets)}
	var n uint64
	for i := 0; i < histBuckets; i++ {
		n += h.counts[i].Load()
		s.Bounds[i] = time.Duration(uint64(1)<<i) * time.Microsecond
		s.Counts[i] = n
	}
	s.Count = n + h.counts[histBuckets].Load()
	s.Sum = time.Duration(h.sumNS.Load())
	return s
}

// Latencies returns snapshots of the handoff latency (accepted → acked by a worker) and of the
// time connections waited in the queue for a worker (those that were handed off).
func (g *Gateway) Latencies() (handoff, queue Histogram) {
	return g.handoffLat.snapshot(), g.queueWait.snapshot()
}

// Quantile estimates the q-quantile (0 < q < 1) from the buckets: the bound of the first bucket
// holding it (an upper estimate, within a factor of two). Zero without observations.
func (h Histogram) Quantile(q float64) time.Duration {
	if h.Count == 0 {
		return 0
	}
	rank := uint64(q*float64(h.Count) + 0.5)
	for i, n := range h.Counts {
		if n >= rank {
			return h.Bounds[i]
		}
	}
	return h.Bounds[len(h.Bounds)-1] * 2 // beyond the largest bound
}
