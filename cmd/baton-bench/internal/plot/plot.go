// Package plot owns the SVG drawing of the benchmark results: bar charts (a median per
// configuration with every round as a dot) and latency-by-percentile charts (log latency
// against a percentile axis stretched towards the tail), laid out in panels on one canvas.
// Standard library only; the output is a self-contained SVG document.
package plot

import (
	"fmt"
	"html"
	"math"
	"strings"
)

// Canvas is an SVG document being drawn.
type Canvas struct {
	b    strings.Builder
	w, h float64
}

// New starts a w×h canvas with a title.
func New(w, h float64, title string) *Canvas {
	c := &Canvas{w: w, h: h}
	fmt.Fprintf(&c.b, `<svg xmlns="http://www.w3.org/2000/svg" width="%g" height="%g" viewBox="0 0 %g %g" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">`+"\n", w, h, w, h)
	fmt.Fprintf(&c.b, `<rect width="%g" height="%g" fill="white"/>`+"\n", w, h)
	c.Text(w/2, 24, 16, "middle", title, `font-weight="bold"`)
	return c
}

// String finishes the document.
func (c *Canvas) String() string { return c.b.String() + "</svg>\n" }

// Text draws text at (x, y) with an anchor of start, middle or end.
func (c *Canvas) Text(x, y, size float64, anchor, s, attrs string) {
	fmt.Fprintf(&c.b, `<text x="%.1f" y="%.1f" font-size="%g" text-anchor="%s" %s>%s</text>`+"\n", x, y, size, anchor, attrs, html.EscapeString(s))
}

func (c *Canvas) line(x1, y1, x2, y2 float64, style string) {
	fmt.Fprintf(&c.b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" %s/>`+"\n", x1, y1, x2, y2, style)
}

// Panel is a rectangle of the canvas holding one chart.
type Panel struct {
	X, Y, W, H float64
	Title      string
	Note       string // small text under the title
	// Refs are horizontal reference lines (a goal, a baseline) drawn over a bar chart.
	Refs []Ref
}

// Ref is a dashed horizontal line at Value, labelled at its right end.
type Ref struct {
	Value float64
	Label string
}

// plot area inside a panel
func (p Panel) area() (x0, y0, x1, y1 float64) {
	return p.X + 62, p.Y + 44, p.X + p.W - 14, p.Y + p.H - 44
}

func (c *Canvas) frame(p Panel) {
	c.Text(p.X+p.W/2, p.Y+16, 13, "middle", p.Title, `font-weight="bold"`)
	if p.Note != "" {
		c.Text(p.X+p.W/2, p.Y+31, 10, "middle", p.Note, `fill="#555"`)
	}
	x0, y0, x1, y1 := p.area()
	fmt.Fprintf(&c.b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="#999"/>`+"\n", x0, y0, x1-x0, y1-y0)
}

// Line is one curve of a percentile chart: latencies (µs) at the quantiles Q (0 < q < 1).
type Line struct {
	Name, Color string
	Q, Micros   []float64
}

// tail maps a quantile to the stretched axis: 0 at q=0, 1 at 90 %, 2 at 99 %, 3 at 99.9 %.
func tail(q float64) float64 { return -math.Log10(1 - math.Min(q, 0.999)) }

// Percentiles draws latency (log scale, x) against percentile (stretched towards the tail, y).
func (c *Canvas) Percentiles(p Panel, lines []Line) {
	c.frame(p)
	x0, y0, x1, y1 := p.area()
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, l := range lines {
		for i, v := range l.Micros {
			if v > 0 && l.Q[i] <= 0.999 {
				lo, hi = math.Min(lo, v), math.Max(hi, v)
			}
		}
	}
	if math.IsInf(lo, 0) {
		c.Text((x0+x1)/2, (y0+y1)/2, 12, "middle", "no data", `fill="#999"`)
		return
	}
	dlo, dhi := math.Floor(math.Log10(lo)), math.Ceil(math.Log10(hi))
	if dhi == dlo {
		dhi++
	}
	px := func(v float64) float64 { return x0 + (math.Log10(v)-dlo)/(dhi-dlo)*(x1-x0) }
	py := func(q float64) float64 { return y1 - tail(q)/3*(y1-y0) }
	for d := dlo; d <= dhi; d++ {
		for _, m := range []float64{1, 2, 5} {
			v := m * math.Pow(10, d)
			if math.Log10(v) > dhi+1e-9 {
				break
			}
			x := px(v)
			if m == 1 {
				c.line(x, y0, x, y1, `stroke="#ddd"`)
				c.Text(x, y1+14, 10, "middle", dur(v), "")
			} else {
				c.line(x, y1-4, x, y1, `stroke="#999"`)
			}
		}
	}
	for _, t := range []struct {
		q float64
		s string
	}{{0, "0"}, {0.5, "50"}, {0.9, "90"}, {0.99, "99"}, {0.999, "99.9"}} {
		y := py(t.q)
		c.line(x0, y, x1, y, `stroke="#eee"`)
		c.Text(x0-5, y+3, 10, "end", t.s, "")
	}
	c.Text(x0-40, (y0+y1)/2, 11, "middle", "percentile", fmt.Sprintf(`transform="rotate(-90 %.1f %.1f)"`, x0-40, (y0+y1)/2))
	c.Text((x0+x1)/2, y1+30, 11, "middle", "latency (log scale)", "")
	for _, l := range lines {
		var pts []string
		for i, v := range l.Micros {
			if v > 0 && l.Q[i] <= 0.999 {
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(v), py(l.Q[i])))
			}
		}
		if len(pts) > 0 {
			fmt.Fprintf(&c.b, `<polyline fill="none" stroke="%s" stroke-width="1.8" points="%s"><title>%s</title></polyline>`+"\n",
				l.Color, strings.Join(pts, " "), html.EscapeString(l.Name))
		}
	}
	c.legend(x0+6, y0+6, lines)
}

func (c *Canvas) legend(x, y float64, lines []Line) {
	for i, l := range lines {
		yy := y + float64(i)*13 + 6
		c.line(x, yy, x+16, yy, fmt.Sprintf(`stroke="%s" stroke-width="2.5"`, l.Color))
		c.Text(x+20, yy+3.5, 10, "start", l.Name, "")
	}
}

// Bar is one configuration's value in a bar chart: the median, and every round as a dot.
type Bar struct {
	Name, Color string
	Value       float64   // NaN: no bar
	Points      []float64 // per round
	Label       string    // printed above the bar (default: the value)
}

// Group is a set of bars side by side, under a caption.
type Group struct {
	Caption string
	Bars    []Bar
}

// Bars draws groups of bars on a linear axis from zero. Groups without bars are left out.
func (c *Canvas) Bars(p Panel, unit string, groups []Group) {
	c.frame(p)
	var kept []Group
	for _, g := range groups {
		if len(g.Bars) > 0 {
			kept = append(kept, g)
		}
	}
	groups = kept
	x0, y0, x1, y1 := p.area()
	top := 0.0
	n := 0
	for _, g := range groups {
		for _, b := range g.Bars {
			n++
			if !math.IsNaN(b.Value) {
				top = math.Max(top, b.Value)
			}
			for _, v := range b.Points {
				if !math.IsNaN(v) {
					top = math.Max(top, v)
				}
			}
		}
	}
	for _, r := range p.Refs {
		top = math.Max(top, r.Value)
	}
	if top <= 0 || n == 0 {
		c.Text((x0+x1)/2, (y0+y1)/2, 12, "middle", "no data", `fill="#999"`)
		return
	}
	step := niceStep(top / 5)
	top = math.Ceil(top*1.12/step) * step
	py := func(v float64) float64 { return y1 - v/top*(y1-y0) }
	for v := 0.0; v <= top+step/2; v += step {
		y := py(v)
		c.line(x0, y, x1, y, `stroke="#eee"`)
		c.Text(x0-5, y+3, 10, "end", num(v), "")
	}
	c.Text(x0-46, (y0+y1)/2, 11, "middle", unit, fmt.Sprintf(`transform="rotate(-90 %.1f %.1f)"`, x0-46, (y0+y1)/2))
	gap := 10.0
	slot := (x1 - x0 - gap*float64(len(groups)+1)) / float64(n)
	x := x0 + gap
	for _, g := range groups {
		gx := x
		for _, b := range g.Bars {
			if !math.IsNaN(b.Value) {
				y := py(b.Value)
				fmt.Fprintf(&c.b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" opacity="0.85"><title>%s: %s</title></rect>`+"\n",
					x+1, y, slot-2, y1-y, b.Color, html.EscapeString(b.Name), num(b.Value))
				label := b.Label
				if label == "" {
					label = num(b.Value)
				}
				c.Text(x+slot/2, y-4, 9, "middle", label, "")
			}
			for _, v := range b.Points {
				if !math.IsNaN(v) {
					fmt.Fprintf(&c.b, `<circle cx="%.1f" cy="%.1f" r="2.2" fill="black" opacity="0.6"/>`+"\n", x+slot/2, py(v))
				}
			}
			c.Text(x+slot/2, y1+12, 9, "middle", b.Name, "")
			x += slot
		}
		if g.Caption != "" {
			c.Text((gx+x)/2, y1+27, 10, "middle", g.Caption, `font-style="italic"`)
		}
		x += gap
	}
	for _, r := range p.Refs {
		y := py(r.Value)
		c.line(x0, y, x1, y, `stroke="#d62728" stroke-dasharray="5,4" stroke-width="1.2"`)
		c.Text(x1-4, y-4, 9, "end", r.Label, `fill="#d62728"`)
	}
}

func niceStep(raw float64) float64 {
	if raw <= 0 {
		return 1
	}
	e := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*e >= raw {
			return m * e
		}
	}
	return 10 * e
}

// num formats a value compactly: 12,345 · 12.3 · 0.123 · 12.3k.
func num(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 1e6:
		return trim(fmt.Sprintf("%.2f", v/1e6)) + "M"
	case a >= 1e4:
		return trim(fmt.Sprintf("%.1f", v/1e3)) + "k"
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return trim(fmt.Sprintf("%.1f", v))
	case a == 0:
		return "0"
	}
	return trim(fmt.Sprintf("%.2f", v))
}

func trim(s string) string {
	if strings.Contains(s, ".") {
		s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	}
	return s
}

// dur formats microseconds: 20µs, 1ms, 10ms, 1s.
func dur(us float64) string {
	switch {
	case us >= 1e6:
		return num(us/1e6) + "s"
	case us >= 1e3:
		return num(us/1e3) + "ms"
	}
	return num(us) + "µs"
}
