// Package stats owns the arithmetic of the benchmark: latency samples and their quantiles, and
// medians over repeated runs. It has no I/O.
package stats

import (
	"math"
	"slices"
	"time"
)

// Samples collects durations. The zero value is ready to use; it is not safe for concurrent use.
type Samples struct {
	d      []time.Duration
	sorted bool
}

// Add records one duration.
func (s *Samples) Add(d time.Duration) {
	s.d = append(s.d, d)
	s.sorted = false
}

// Len is the number of samples.
func (s *Samples) Len() int { return len(s.d) }

// Merge adds every sample of o.
func (s *Samples) Merge(o *Samples) {
	s.d = append(s.d, o.d...)
	s.sorted = false
}

func (s *Samples) sort() {
	if !s.sorted {
		slices.Sort(s.d)
		s.sorted = true
	}
}

// Quantile returns the q-quantile (0 ≤ q ≤ 1) by the nearest-rank method, or 0 with no samples.
func (s *Samples) Quantile(q float64) time.Duration {
	if len(s.d) == 0 {
		return 0
	}
	s.sort()
	i := int(math.Ceil(q*float64(len(s.d)))) - 1
	i = max(0, min(i, len(s.d)-1))
	return s.d[i]
}

// CDFPoints are the quantiles a result keeps of its latency distribution (for the plot): every
// percent from 1 to 99, then 99.5, 99.9 and the maximum.
var CDFPoints = func() []float64 {
	var q []float64
	for i := 1; i <= 99; i++ {
		q = append(q, float64(i)/100)
	}
	return append(q, 0.995, 0.999, 1)
}()

// CDF returns the quantiles at CDFPoints, in microseconds; nil with no samples.
func (s *Samples) CDF() []float64 {
	if len(s.d) == 0 {
		return nil
	}
	out := make([]float64, len(CDFPoints))
	for i, q := range CDFPoints {
		out[i] = math.Round(Micros(s.Quantile(q))*10) / 10 // 0.1 µs is plenty
	}
	return out
}

// Micros converts d to microseconds.
func Micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// Median returns the median of v (the mean of the middle two for an even count), ignoring NaNs;
// NaN if nothing is left.
func Median(v []float64) float64 {
	w := make([]float64, 0, len(v))
	for _, x := range v {
		if !math.IsNaN(x) {
			w = append(w, x)
		}
	}
	if len(w) == 0 {
		return math.NaN()
	}
	slices.Sort(w)
	n := len(w)
	if n%2 == 1 {
		return w[n/2]
	}
	return (w[n/2-1] + w[n/2]) / 2
}

// MedianCDF returns the point-wise median of several CDFs of equal length (rounds of one
// measurement); CDFs of another length than the first non-empty one are ignored.
func MedianCDF(cdfs [][]float64) []float64 {
	var n int
	for _, c := range cdfs {
		if len(c) > 0 {
			n = len(c)
			break
		}
	}
	if n == 0 {
		return nil
	}
	out := make([]float64, n)
	col := make([]float64, 0, len(cdfs))
	for i := range n {
		col = col[:0]
		for _, c := range cdfs {
			if len(c) == n {
				col = append(col, c[i])
			}
		}
		out[i] = Median(col)
	}
	return out
}
