package stats

import (
	"math"
	"testing"
	"time"
)

func TestQuantile(t *testing.T) {
	var s Samples
	if s.Quantile(0.5) != 0 || s.CDF() != nil {
		t.Fatal("empty samples must give 0 and no CDF")
	}
	for i := 100; i >= 1; i-- {
		s.Add(time.Duration(i) * time.Microsecond)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 50 * time.Microsecond}, {0.99, 99 * time.Microsecond}, {1, 100 * time.Microsecond}, {0, time.Microsecond}} {
		if got := s.Quantile(c.q); got != c.want {
			t.Errorf("Quantile(%v) = %v, want %v", c.q, got, c.want)
		}
	}
	cdf := s.CDF()
	if len(cdf) != len(CDFPoints) || cdf[len(cdf)-1] != 100 {
		t.Errorf("CDF = %v", cdf)
	}
}

func TestMedian(t *testing.T) {
	if m := Median([]float64{3, 1, 2}); m != 2 {
		t.Errorf("odd: %v", m)
	}
	if m := Median([]float64{4, 1, 2, 3}); m != 2.5 {
		t.Errorf("even: %v", m)
	}
	if m := Median([]float64{math.NaN(), 5}); m != 5 {
		t.Errorf("NaN ignored: %v", m)
	}
	if m := Median(nil); !math.IsNaN(m) {
		t.Errorf("empty: %v", m)
	}
	got := MedianCDF([][]float64{{1, 10}, {3, 30}, {2, 20}, nil})
	if len(got) != 2 || got[0] != 2 || got[1] != 20 {
		t.Errorf("MedianCDF = %v", got)
	}
}
