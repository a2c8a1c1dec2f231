package suite

import (
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/load"
	"github.com/baton-gw/baton/cmd/baton-bench/internal/plot"
)

// The scaling comparison (issue 12, item 2: the seed's promise of N cores, N Python processes,
// about N times the throughput of one). The Python lobby behind batond with 1…N workers runs
// against one Python lobby process accepting directly, none of them pinned: every server-side
// process and the load generator may run on every CPU, as they would in production, and the
// load generator's own CPU is reported next to each figure (on a 2-core machine it shares the
// cores with what it measures).

// Scaling scenario keys.
const (
	scScaleStorm   = "scale-storm"
	scScaleSess100 = "scale-sessions-100"
	scScaleSess1k  = "scale-sessions-1000"
	// scScaling selects the three (-scenarios scaling).
	scScaling = "scaling"
)

var scaleScenarios = []string{scScaleStorm, scScaleSess100, scScaleSess1k}

// scaleGoal is the speed-up over one direct process that k workers should reach: the issue's
// 1.7× for 2 workers on a 2-core machine, that is 0.85× per worker; none for one worker.
func scaleGoal(k int) float64 {
	if k < 2 {
		return 0
	}
	return 0.85 * float64(k)
}

// scalingConfigs returns S0 (one lobby process accepting directly) and S1…Smax (batond with k
// lobby workers).
func scalingConfigs(max int) []*config {
	cs := []*config{{ID: "S0", Name: "py direct", Proto: "lobby", Scenarios: scaleScenarios, Scaling: true, start: startPyDirect,
		Desc: "examples/python/lobby.py --direct (plain asyncio.start_server), one process, not pinned"}}
	for k := 1; k <= max; k++ {
		cs = append(cs, &config{ID: "S" + strconv.Itoa(k), Name: fmt.Sprintf("baton-py %dw", k), Proto: "lobby", Scenarios: scaleScenarios,
			Scaling: true, Workers: k, start: batonStarter(batonOpts{workers: k, python: true}),
			Desc: fmt.Sprintf("batond with %d examples/python/lobby.py workers, not pinned", k)})
	}
	return cs
}

// expandScenarios replaces "scaling" in a -scenarios list by the scaling scenarios.
func expandScenarios(want []string) []string {
	var out []string
	for _, sc := range want {
		if sc == scScaling {
			out = append(out, scaleScenarios...)
		} else {
			out = append(out, sc)
		}
	}
	return out
}

// onlineCPUs returns the machine's online CPUs as a taskset list ("0-1") and how many they are:
// the suite runs pinned (bench/run), so its own affinity says nothing about the machine.
func onlineCPUs() (string, int, error) {
	b, err := os.ReadFile("/sys/devices/system/cpu/online")
	if err != nil {
		return "", 0, err
	}
	list := strings.TrimSpace(string(b))
	n, err := countCPUs(list)
	if err != nil {
		return "", 0, fmt.Errorf("/sys/devices/system/cpu/online: %w", err)
	}
	return list, n, nil
}

var errCPUList = errors.New("not a CPU list")

// countCPUs counts the CPUs of a list such as "0-3,6,8-9".
func countCPUs(list string) (int, error) {
	n := 0
	for part := range strings.SplitSeq(list, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil || a < 0 {
			return 0, fmt.Errorf("%w: %q", errCPUList, list)
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a {
				return 0, fmt.Errorf("%w: %q", errCPUList, list)
			}
		}
		n += b - a + 1
	}
	return n, nil
}

// scaleArgs is the load generator's command line for a scaling scenario (after the common
// flags).
func scaleArgs(pl plan, sc string) []string {
	if sc == scScaleStorm {
		return []string{"storm", "-duration", pl.Storm.String(), "-c", strconv.Itoa(pl.ScaleConc)}
	}
	n := pl.SessN
	if sc == scScaleSess1k {
		n = pl.ScaleSessBig
	}
	return []string{"sessions", "-duration", pl.Sessions.String(), "-n", strconv.Itoa(n), "-depth", strconv.Itoa(pl.ScaleDepth)}
}

// scaleMetrics are the rows of the scaling table.
func scaleMetrics(pl plan) []metric {
	var m []metric
	for _, s := range []struct{ sc, key, what, unit string }{
		{scScaleStorm, "scale_storm", fmt.Sprintf("storm, saturated (%d in flight)", pl.ScaleConc), "conn/s"},
		{scScaleSess100, "scale_s100", fmt.Sprintf("%d sessions × %d pipelined", pl.SessN, pl.ScaleDepth), "msg/s"},
		{scScaleSess1k, "scale_s1k", fmt.Sprintf("%s sessions × %d pipelined", commas(float64(pl.ScaleSessBig)), pl.ScaleDepth), "msg/s"},
	} {
		per := strings.TrimSuffix(strings.TrimPrefix(s.unit, "conn/s"), "/s")
		if per == "" {
			per = "conn"
		}
		lat := "connect→reply p50"
		if s.sc != scScaleStorm {
			lat = "batch round trip p50"
		}
		m = append(m,
			metric{Key: s.key + "_rate", Label: s.what + ": " + s.unit, Unit: s.unit, sc: s.sc, Higher: true, Ratios: true,
				get: func(r *load.Result) float64 { return r.PerSec }},
			metric{Key: s.key + "_p50", Label: s.what + ": " + lat, Unit: "µs", sc: s.sc, Ratios: true,
				get: func(r *load.Result) float64 { return r.P50 }},
			metric{Key: s.key + "_cpu", Label: s.what + ": server CPU per " + per, Unit: "µs", sc: s.sc, Ratios: true,
				get: func(r *load.Result) float64 { return r.ServerCPUPer }},
			metric{Key: s.key + "_busy", Label: s.what + ": server side CPU busy", Unit: "% of a core", sc: s.sc,
				get: func(r *load.Result) float64 { return 100 * r.ServerBusy }},
			metric{Key: s.key + "_client", Label: s.what + ": load generator CPU busy", Unit: "% of a core", sc: s.sc,
				get: func(r *load.Result) float64 { return 100 * r.ClientBusy }},
			metric{Key: s.key + "_others", Label: s.what + ": everything else on the machine", Unit: "% of a core", sc: s.sc,
				get: func(r *load.Result) float64 { return 100 * r.OthersBusy }},
		)
	}
	return m
}

// scaleRates are the metrics the speed-ups are taken of.
var scaleRates = []string{"scale_storm_rate", "scale_s100_rate", "scale_s1k_rate"}

func isScaleScenario(sc string) bool {
	return sc == scScaleStorm || sc == scScaleSess100 || sc == scScaleSess1k
}

// speedup is Sk's rate over S0's in one scaling scenario.
type speedup struct {
	Key     string    `json:"key"`
	Label   string    `json:"label"`
	Config  string    `json:"config"`
	Workers int       `json:"workers"`
	Ratio   float64   `json:"ratio"`          // Sk's median ÷ S0's median
	ByRound []float64 `json:"by_round"`       // Sk ÷ S0 within each round
	Goal    float64   `json:"goal,omitempty"` // scaleGoal(k); 0: none
	Met     bool      `json:"met"`
	// Generator is the load generator's CPU in Sk's runs (median, % of one core).
	Generator float64 `json:"generator_busy_pct"`
	// Ceiling is the best speed-up this machine allows k workers even with a gateway that costs
	// nothing: k, or the CPUs divided by what one direct process and its load generator took
	// (server side plus generator busy, in cores), whichever is lower. 0: unknown.
	Ceiling float64 `json:"ceiling,omitempty"`
}

// scaleIDs returns the scaling configurations measured, S0 first.
func (r *report) scaleIDs() (direct string, workers []cfgInfo) {
	for _, c := range r.Configs {
		switch {
		case !c.Scaling:
		case c.Workers == 0:
			direct = c.ID
		default:
			workers = append(workers, c)
		}
	}
	return direct, workers
}

func (r *report) speedups() []speedup {
	direct, workers := r.scaleIDs()
	if direct == "" {
		return nil
	}
	var out []speedup
	for _, key := range scaleRates {
		mt := r.metric(key)
		for _, c := range workers {
			x := r.med(key, c.ID) / r.med(key, direct)
			if math.IsNaN(x) || math.IsInf(x, 0) {
				continue
			}
			g := scaleGoal(c.Workers)
			base := strings.TrimSuffix(key, "_rate")
			ceiling := float64(c.Workers)
			if used := (r.med(base+"_busy", direct) + r.med(base+"_client", direct)) / 100; used > 0 && r.Machine.CPUs > 0 {
				ceiling = min(ceiling, float64(r.Machine.CPUs)/used)
			}
			out = append(out, speedup{Key: key, Label: mt.Label, Config: c.ID, Workers: c.Workers, Ratio: x,
				ByRound: r.pairedRatios(key, c.ID, direct), Goal: g, Met: g > 0 && x >= g,
				Generator: r.med(base+"_client", c.ID), Ceiling: ceiling})
		}
	}
	return out
}

// scalingMarkdown writes the scaling table and the speed-ups.
func (r *report) scalingMarkdown(b *strings.Builder) {
	direct, workers := r.scaleIDs()
	if direct == "" && len(workers) == 0 {
		return
	}
	fmt.Fprintf(b, "### Scaling: the Python lobby on every core\n\n"+
		"Not pinned: the server side (one lobby process accepting directly, or batond and its k lobby workers) and the load generator may run on every CPU (%s); "+
		"the load generator's CPU is in the table. Sessions send %d requests in one write and wait for their %d replies (every reply byte checked).\n\n",
		r.Machine.Online, r.Plan.ScaleDepth, r.Plan.ScaleDepth)
	ids := append([]cfgInfo{}, workers...)
	for _, c := range r.Configs {
		if c.ID == direct {
			ids = append([]cfgInfo{c}, ids...)
		}
	}
	b.WriteString("| metric | unit |")
	for _, c := range ids {
		fmt.Fprintf(b, " %s %s |", c.ID, c.Name)
	}
	for _, c := range workers {
		fmt.Fprintf(b, " %s÷%s |", c.ID, direct)
	}
	b.WriteString("\n|---|---|" + strings.Repeat("---:|", len(ids)+len(workers)) + "\n")
	for _, mt := range r.Metrics {
		row := r.Table[mt.Key]
		if !isScaleScenario(mt.sc) || len(row) == 0 {
			continue
		}
		fmt.Fprintf(b, "| %s | %s |", mt.Label, mt.Unit)
		for _, c := range ids {
			v := math.NaN()
			if x, ok := row[c.ID]; ok {
				v = x.Median
			}
			fmt.Fprintf(b, " %s |", format(mt, v))
		}
		for _, c := range workers {
			if !mt.Ratios {
				b.WriteString(" |")
				continue
			}
			fmt.Fprintf(b, " %s |", ratio(r.med(mt.Key, c.ID)/r.med(mt.Key, direct)))
		}
		b.WriteString("\n")
	}
	b.WriteString("\n")
	if len(r.Scaling) == 0 {
		return
	}
	fmt.Fprintf(b, "The ceiling is what a gateway costing nothing could reach here: k workers, or %d CPUs ÷ the cores one direct process and its load generator used (server side + generator busy), whichever is lower.\n\n", r.Machine.CPUs)
	b.WriteString("| speed-up over one direct Python process | workers | median | round by round | load generator CPU | ceiling here | goal | |\n|---|---:|---:|---|---:|---:|---|---|\n")
	for _, s := range r.Scaling {
		var rounds []string
		for _, x := range s.ByRound {
			rounds = append(rounds, ratio(x))
		}
		goal, verdict := "–", ""
		if s.Goal > 0 {
			goal, verdict = fmt.Sprintf("≥ %s×", ratio(s.Goal)), "missed"
			if s.Met {
				verdict = "**met**"
			}
		}
		fmt.Fprintf(b, "| %s | %d | %s× | %s | %.0f %% of a core | %s× | %s | %s |\n", s.Label, s.Workers, ratio(s.Ratio), strings.Join(rounds, ", "), s.Generator, ratio(s.Ceiling), goal, verdict)
	}
	b.WriteString("\n")
}

// scaleColor is Sk's color: S0 as F (the Python process accepting directly), workers in
// greens getting darker with k.
func scaleColor(c cfgInfo) string {
	if c.Workers == 0 {
		return colors["F"]
	}
	greens := []string{"#98df8a", "#2ca02c", "#1b6e1b", "#0b3d0b"}
	return greens[min(c.Workers-1, len(greens)-1)]
}

// ScalingSVG draws the scaling plot: the speed-ups with their goal, the rates, and where the
// CPU went (server side and load generator).
func (r *report) ScalingSVG() string {
	const w, pw, ph = 1000.0, 500.0, 310.0
	c := plot.New(w, 40+3*ph+20, fmt.Sprintf("Python lobby on every core (%s run, %s): medians of %d interleaved rounds; dots are rounds", r.Plan.Mode, r.Machine.Date, r.Plan.Rounds))
	direct, workers := r.scaleIDs()
	var all []cfgInfo
	for _, cf := range r.Configs {
		if cf.Scaling {
			all = append(all, cf)
		}
	}
	bars := func(key string, cfgs []cfgInfo) []plot.Bar {
		var out []plot.Bar
		for _, cf := range cfgs {
			if cl, ok := r.Table[key][cf.ID]; ok {
				out = append(out, plot.Bar{Name: cf.ID, Color: scaleColor(cf), Value: cl.Median, Points: cl.Rounds})
			}
		}
		return out
	}
	small, big := fmt.Sprintf("%d sessions", r.Plan.SessN), commas(float64(r.Plan.ScaleSessBig))+" sessions"
	var ups []plot.Group
	var refs []plot.Ref
	for i, key := range scaleRates {
		g := plot.Group{Caption: []string{"storm", small, big}[i]}
		for _, x := range r.Scaling {
			if x.Key == key {
				g.Bars = append(g.Bars, plot.Bar{Name: fmt.Sprintf("%d w", x.Workers), Color: scaleColor(cfgInfo{Workers: x.Workers}), Value: x.Ratio, Points: x.ByRound, Label: ratio(x.Ratio) + "×"})
			}
		}
		ups = append(ups, g)
	}
	refs = append(refs, plot.Ref{Value: 1, Label: "one direct process"})
	for _, cf := range workers {
		if g := scaleGoal(cf.Workers); g > 0 {
			refs = append(refs, plot.Ref{Value: g, Label: fmt.Sprintf("goal, %d workers: %s×", cf.Workers, ratio(g))})
		}
	}
	at := func(col, row int) (float64, float64) { return float64(col) * pw, 40 + float64(row)*ph }
	x, y := at(0, 0)
	c.Bars(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "speed-up over one Python process accepting directly (" + direct + ")", Note: "higher is better · batond with k lobby workers ÷ one direct lobby", Refs: refs},
		"×", ups)
	x, y = at(1, 0)
	c.Bars(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "storm, saturated: connections/s", Note: fmt.Sprintf("higher is better · %d in flight", r.Plan.ScaleConc)}, "conn/s",
		[]plot.Group{{Caption: "storm", Bars: bars("scale_storm_rate", all)}})
	x, y = at(0, 1)
	c.Bars(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "sessions: messages/s", Note: fmt.Sprintf("higher is better · %d requests per write", r.Plan.ScaleDepth)}, "msg/s",
		[]plot.Group{{Caption: small, Bars: bars("scale_s100_rate", all)}, {Caption: big, Bars: bars("scale_s1k_rate", all)}})
	x, y = at(1, 1)
	c.Bars(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "server side CPU busy", Note: fmt.Sprintf("%% of one core · %d CPUs in all", r.Machine.CPUs)}, "% of a core",
		[]plot.Group{{Caption: "storm", Bars: bars("scale_storm_busy", all)}, {Caption: small, Bars: bars("scale_s100_busy", all)}, {Caption: big, Bars: bars("scale_s1k_busy", all)}})
	x, y = at(0, 2)
	c.Bars(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "load generator CPU busy", Note: "% of one core · it shares the CPUs with the servers"}, "% of a core",
		[]plot.Group{{Caption: "storm", Bars: bars("scale_storm_client", all)}, {Caption: small, Bars: bars("scale_s100_client", all)}, {Caption: big, Bars: bars("scale_s1k_client", all)}})
	x, y = at(1, 2)
	c.Bars(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "storm: server CPU per connection", Note: "lower is better · batond and its workers, or the one direct process"}, "µs",
		[]plot.Group{{Caption: "storm", Bars: bars("scale_storm_cpu", all)}})
	return c.String()
}
