package plot

import (
	"encoding/xml"
	"io"
	"math"
	"strings"
	"testing"
)

func TestSVGIsWellFormed(t *testing.T) {
	c := New(800, 400, "a <title> & more")
	c.Percentiles(Panel{X: 0, Y: 40, W: 400, H: 300, Title: "latency"}, []Line{
		{Name: "a", Color: "red", Q: []float64{0.5, 0.99, 1}, Micros: []float64{20, 200, 900}},
		{Name: "empty", Color: "blue"},
	})
	c.Bars(Panel{X: 400, Y: 40, W: 400, H: 300, Title: "rates"}, "conn/s", []Group{
		{Caption: "g", Bars: []Bar{{Name: "A", Color: "red", Value: 12345, Points: []float64{12000, 13000}}, {Name: "B", Color: "blue", Value: math.NaN()}}},
	})
	c.Bars(Panel{X: 0, Y: 340, W: 400, H: 60, Title: "none"}, "x", nil)
	s := c.String()
	d := xml.NewDecoder(strings.NewReader(s))
	for {
		_, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("not well-formed XML: %v\n%s", err, s)
		}
	}
	for _, want := range []string{"12.3k", "&lt;title&gt;", "polyline", "no data"} {
		if !strings.Contains(s, want) {
			t.Errorf("SVG lacks %q", want)
		}
	}
}

func TestFormat(t *testing.T) {
	for v, want := range map[float64]string{0: "0", 1.5: "1.5", 12.34: "12.3", 123.4: "123", 12345: "12.3k", 2.5e6: "2.5M"} {
		if got := num(v); got != want {
			t.Errorf("num(%v) = %q, want %q", v, got, want)
		}
	}
	if got := dur(1000); got != "1ms" {
		t.Errorf("dur(1000) = %q", got)
	}
	if s := niceStep(3.3); s != 5 {
		t.Errorf("niceStep(3.3) = %v", s)
	}
}
