package suite

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/load"
	"github.com/baton-gw/baton/cmd/baton-bench/internal/plot"
	"github.com/baton-gw/baton/cmd/baton-bench/internal/stats"
)

// metric is one row of the table: a number taken from one scenario's result.
type metric struct {
	Key    string `json:"key"`
	Label  string `json:"label"`
	Unit   string `json:"unit"`
	sc     string
	get    func(r *load.Result) float64 // NaN: not available
	Higher bool                         `json:"higher_is_better"`
	Ratios bool                         `json:"ratios"`
}

// idleLevel returns the level of the idle result for target in the given pass (0: the last
// pass that has one).
func idleLevel(r *load.Result, target, pass int) *load.IdleLevel {
	var found *load.IdleLevel
	for i := range r.Idle {
		l := &r.Idle[i]
		if l.Target == target && (pass == 0 || l.Pass == pass || (pass == 1 && l.Pass == 0)) {
			found = l
		}
	}
	return found
}

// nearly reports whether an idle level held at least 90 % of its target (HAProxy stops a few
// connections short of 10,000): the per-connection figures of a level are shown then, with the
// count held in the row above them.
func nearly(l *load.IdleLevel) bool { return l != nil && l.Held > 0 && l.Held*10 >= l.Target*9 }

func metrics(pl plan) []metric {
	nan := math.NaN()
	m := []metric{
		{Key: "storm_sat_rate", Label: fmt.Sprintf("storm, saturated (%d in flight): connections/s", pl.StormConc), Unit: "conn/s", sc: scStormSat, Higher: true, Ratios: true,
			get: func(r *load.Result) float64 { return r.PerSec }},
		{Key: "storm_sat_p50", Label: "storm, saturated: connect→reply p50", Unit: "µs", sc: scStormSat, Ratios: true,
			get: func(r *load.Result) float64 { return r.P50 }},
		{Key: "storm_sat_p99", Label: "storm, saturated: connect→reply p99", Unit: "µs", sc: scStormSat, Ratios: true,
			get: func(r *load.Result) float64 { return r.P99 }},
		{Key: "storm_sat_cpu", Label: "storm, saturated: server CPU per connection", Unit: "µs", sc: scStormSat, Ratios: true,
			get: func(r *load.Result) float64 { return r.ServerCPUPer }},
		{Key: "storm_sat_busy", Label: "storm, saturated: server side CPU busy", Unit: "% of a core", sc: scStormSat,
			get: func(r *load.Result) float64 { return 100 * r.ServerBusy }},
		{Key: "storm_sat_client", Label: "storm, saturated: load generator CPU busy", Unit: "% of a core", sc: scStormSat,
			get: func(r *load.Result) float64 { return 100 * r.ClientBusy }},
		{Key: "storm_open_rate", Label: fmt.Sprintf("storm, open loop at %.0f/s (Python %.0f/s): connections/s", pl.Rate, pl.PyRate), Unit: "conn/s", sc: scStormOpen, Higher: true,
			get: func(r *load.Result) float64 { return r.PerSec }},
		{Key: "storm_open_p50", Label: "storm, open loop: connect→reply p50", Unit: "µs", sc: scStormOpen, Ratios: true,
			get: func(r *load.Result) float64 { return r.P50 }},
		{Key: "storm_open_p99", Label: "storm, open loop: connect→reply p99", Unit: "µs", sc: scStormOpen, Ratios: true,
			get: func(r *load.Result) float64 { return r.P99 }},
		{Key: "storm_open_cpu", Label: "storm, open loop: server CPU per connection", Unit: "µs", sc: scStormOpen, Ratios: true,
			get: func(r *load.Result) float64 { return r.ServerCPUPer }},
		{Key: "sess1_p50", Label: "1 session: round trip p50 (64 B)", Unit: "µs", sc: scSess1, Ratios: true,
			get: func(r *load.Result) float64 { return r.P50 }},
		{Key: "sess1_p99", Label: "1 session: round trip p99", Unit: "µs", sc: scSess1, Ratios: true,
			get: func(r *load.Result) float64 { return r.P99 }},
		{Key: "sess_rate", Label: fmt.Sprintf("%d sessions: messages/s", pl.SessN), Unit: "msg/s", sc: scSess100, Higher: true, Ratios: true,
			get: func(r *load.Result) float64 { return r.PerSec }},
		{Key: "sess_p50", Label: fmt.Sprintf("%d sessions: round trip p50", pl.SessN), Unit: "µs", sc: scSess100, Ratios: true,
			get: func(r *load.Result) float64 { return r.P50 }},
		{Key: "sess_p99", Label: fmt.Sprintf("%d sessions: round trip p99", pl.SessN), Unit: "µs", sc: scSess100, Ratios: true,
			get: func(r *load.Result) float64 { return r.P99 }},
		{Key: "bulk", Label: "bulk, 1 connection through echo", Unit: "MB/s", sc: scBulk, Higher: true, Ratios: true,
			get: func(r *load.Result) float64 { return r.MBps }},
	}
	for _, n := range pl.IdleCounts {
		c := count(n)
		m = append(m,
			metric{Key: fmt.Sprintf("idle_%d_held", n), Label: fmt.Sprintf("idle %s: connections held", c), Unit: "conns", sc: scIdle, Higher: true,
				get: func(r *load.Result) float64 {
					if l := idleLevel(r, n, 1); l != nil {
						return float64(l.Held)
					}
					return nan
				}},
			metric{Key: fmt.Sprintf("idle_%d_mid_rss_first", n), Label: fmt.Sprintf("idle %s: middle box RSS growth per held connection (first fill after start)", c), Unit: "B", sc: scIdle,
				get: func(r *load.Result) float64 {
					if l := idleLevel(r, n, 1); nearly(l) && (l.MiddleRSS != 0 || l.MiddleFDs != 0) {
						return l.MiddleRSSPerConn
					}
					return nan
				}},
			metric{Key: fmt.Sprintf("idle_%d_mid_rss", n), Label: fmt.Sprintf("idle %s: the same when refilled (growth past the first fill's peak)", c), Unit: "B", sc: scIdle,
				get: func(r *load.Result) float64 {
					if l := idleLevel(r, n, 2); nearly(l) && (l.MiddleRSS != 0 || l.MiddleFDs != 0) {
						return l.MiddleRSSPerConn
					}
					return nan
				}},
			metric{Key: fmt.Sprintf("idle_%d_mid_fd", n), Label: fmt.Sprintf("idle %s: middle box fds per held connection", c), Unit: "fds", sc: scIdle,
				get: func(r *load.Result) float64 {
					if l := idleLevel(r, n, 0); nearly(l) && (l.MiddleRSS != 0 || l.MiddleFDs != 0) {
						return l.MiddleFDPerConn
					}
					return nan
				}},
			metric{Key: fmt.Sprintf("idle_%d_srv_rss", n), Label: fmt.Sprintf("idle %s: whole server side RSS growth per held connection (first fill)", c), Unit: "B", sc: scIdle,
				get: func(r *load.Result) float64 {
					if l := idleLevel(r, n, 1); nearly(l) {
						return l.ServerRSSPerConn
					}
					return nan
				}},
		)
	}
	if len(pl.IdleCounts) >= 2 {
		lo, hi := pl.IdleCounts[0], pl.IdleCounts[len(pl.IdleCounts)-1]
		m = append(m, metric{Key: "idle_mid_slope", Label: fmt.Sprintf("idle: middle box RSS growth per connection from %s to %s, first fill", count(lo), count(hi)), Unit: "B", sc: scIdle,
			get: func(r *load.Result) float64 {
				a, b := idleLevel(r, lo, 1), idleLevel(r, hi, 1)
				if !nearly(a) || !nearly(b) || b.Held <= a.Held || (b.MiddleRSS == 0 && b.MiddleFDs == 0) {
					return nan
				}
				return float64(b.MiddleRSS-a.MiddleRSS) / float64(b.Held-a.Held)
			}})
	}
	m = append(m,
		metric{Key: "idle_max", Label: "idle: most connections held (where it stops)", Unit: "conns", sc: scIdle, Higher: true,
			get: func(r *load.Result) float64 {
				best := 0
				for _, l := range r.Idle {
					best = max(best, l.Held)
				}
				return float64(best)
			}},
		metric{Key: "reload_failed", Label: fmt.Sprintf("reload ×%d (Python ×%d) under storm (%.0f/s, Python %.0f/s): failed connects per reload", pl.Reloads, pl.ReloadsPy, pl.ReloadRate, pl.ReloadPyRate), Unit: "conns", sc: scReload,
			get: func(r *load.Result) float64 {
				if r.Reload == nil {
					return nan
				}
				return r.Reload.FailedPer
			}},
		metric{Key: "reload_broken", Label: fmt.Sprintf("reload, %d paced sessions: broken sessions per reload", pl.ReloadSess), Unit: "sessions", sc: scReload,
			get: func(r *load.Result) float64 {
				if r.Reload == nil {
					return nan
				}
				return r.Reload.BrokenPer
			}},
		metric{Key: "reload_errors", Label: "reload: reload commands that failed", Unit: "of all", sc: scReload,
			get: func(r *load.Result) float64 {
				if r.Reload == nil {
					return nan
				}
				return float64(r.Reload.ReloadErrors)
			}},
		metric{Key: "scrape_cpu", Label: fmt.Sprintf("one /metrics scrape (%d in a row): server CPU", pl.Scrapes), Unit: "µs", sc: scScrape,
			get: func(r *load.Result) float64 { return r.ServerCPUPer }},
		metric{Key: "scrape_p50", Label: "one /metrics scrape: time to the last byte p50", Unit: "µs", sc: scScrape,
			get: func(r *load.Result) float64 { return r.P50 }},
		metric{Key: "scrape_bytes", Label: "one /metrics scrape: body", Unit: "B", sc: scScrape,
			get: func(r *load.Result) float64 { return float64(r.Bytes) }},
	)
	m = append(m, migrateMetrics(pl)...)
	return append(m, scaleMetrics(pl)...)
}

func count(n int) string {
	if n%1000 == 0 {
		return fmt.Sprintf("%dk", n/1000)
	}
	return fmt.Sprint(n)
}

// cell is one configuration's figures for one metric.
type cell struct {
	Median float64   `json:"median"`
	Rounds []float64 `json:"rounds"`
}

// goal is one line of issue 5's goals table.
type goal struct {
	Workload string `json:"workload"`
	Goal     string `json:"goal"`
	Measured string `json:"measured"`
	Met      bool   `json:"met"`
	Known    bool   `json:"known"` // false: not measured in this run
}

type cfgInfo struct {
	ID, Name, Desc string
	// Scaling configurations (not pinned) go to the scaling table; Workers is their number of
	// batond workers (0: the Python process accepting directly).
	Scaling bool `json:",omitempty"`
	Workers int  `json:",omitempty"`
}

type report struct {
	Machine Machine                         `json:"machine"`
	Plan    plan                            `json:"plan"`
	Configs []cfgInfo                       `json:"configs"`
	Metrics []metric                        `json:"metrics"`
	Table   map[string]map[string]cell      `json:"table"` // metric key → config id → cell
	CDFs    map[string]map[string][]float64 `json:"cdfs"`  // scenario → config → median CDF (µs at stats.CDFPoints)
	Goals   []goal                          `json:"goals"`
	Proxy   []versus                        `json:"proxy,omitempty"`   // DP against D: what PROXY v2 costs
	Scaling []speedup                       `json:"scaling,omitempty"` // Sk against S0: the Python lobby on every core
	Runs    []run                           `json:"runs"`
	order   []string
}

func buildReport(m Machine, pl plan, cfgs []*config, runs []run) *report {
	r := &report{Machine: m, Plan: pl, Metrics: metrics(pl), Runs: runs,
		Table: map[string]map[string]cell{}, CDFs: map[string]map[string][]float64{}}
	for _, c := range cfgs {
		r.Configs = append(r.Configs, cfgInfo{ID: c.ID, Name: c.Name, Desc: c.Desc, Scaling: c.Scaling, Workers: c.Workers})
		r.order = append(r.order, c.ID)
	}
	for _, mt := range r.Metrics {
		row := map[string]cell{}
		for _, id := range r.order {
			var vals []float64
			for _, x := range runs {
				if x.Config == id && x.Scenario == mt.sc && x.Result != nil {
					if v := mt.get(x.Result); !math.IsNaN(v) && !math.IsInf(v, 0) {
						vals = append(vals, v)
					}
				}
			}
			if len(vals) > 0 {
				row[id] = cell{Median: stats.Median(vals), Rounds: vals}
			}
		}
		r.Table[mt.Key] = row
	}
	for _, sc := range []string{scStormSat, scStormOpen, scSess1, scSess100} {
		byCfg := map[string][]float64{}
		for _, id := range r.order {
			var cdfs [][]float64
			for _, x := range runs {
				if x.Config == id && x.Scenario == sc && x.Result != nil {
					cdfs = append(cdfs, x.Result.CDF)
				}
			}
			if c := stats.MedianCDF(cdfs); c != nil {
				byCfg[id] = c
			}
		}
		r.CDFs[sc] = byCfg
	}
	r.Goals = r.goals()
	r.Scaling = r.speedups()
	if slices.Contains(r.order, "D") && slices.Contains(r.order, "DP") {
		r.Proxy = r.versus("DP", "D", []string{"storm_sat_rate", "storm_sat_cpu", "storm_sat_p50", "storm_open_cpu", "storm_open_p50", "storm_open_p99", "sess1_p50"})
	}
	return r
}

// versus is one metric of one configuration against another: the medians, their ratio and
// difference, and the ratio round by round (the spread a reader judges the ratio by).
type versus struct {
	Key     string    `json:"key"`
	Label   string    `json:"label"`
	Unit    string    `json:"unit"`
	Num     float64   `json:"num"` // median of the configuration measured
	Den     float64   `json:"den"` // median of the one it is measured against
	Ratio   float64   `json:"ratio"`
	Diff    float64   `json:"diff"`
	ByRound []float64 `json:"by_round"` // num ÷ den within each round
}

func (r *report) versus(num, den string, keys []string) []versus {
	var out []versus
	for _, key := range keys {
		mt := r.metric(key)
		if mt == nil {
			continue
		}
		n, d := r.med(key, num), r.med(key, den)
		if math.IsNaN(n) || math.IsNaN(d) {
			continue
		}
		out = append(out, versus{Key: key, Label: mt.Label, Unit: mt.Unit, Num: n, Den: d, Ratio: n / d, Diff: n - d, ByRound: r.pairedRatios(key, num, den)})
	}
	return out
}

func (r *report) metric(key string) *metric {
	for i := range r.Metrics {
		if r.Metrics[i].Key == key {
			return &r.Metrics[i]
		}
	}
	return nil
}

// med returns the median of metric key for config id (NaN if absent).
func (r *report) med(key, id string) float64 {
	if c, ok := r.Table[key][id]; ok {
		return c.Median
	}
	return math.NaN()
}

func (r *report) failures() int {
	n := 0
	for _, x := range r.Runs {
		if x.Error != "" {
			n++
		}
	}
	return n
}

func (r *report) goals() []goal {
	var g []goal
	ok := func(v ...float64) bool {
		for _, x := range v {
			if math.IsNaN(x) {
				return false
			}
		}
		return true
	}
	a, c, d := "A", "C", "D"
	// rw names baton's ratio to the direct echo that copies with read/write (A2), the data path
	// the echo worker takes under batond, when it was measured.
	rw := func(key string) string {
		x := r.med(key, d) / r.med(key, "A2")
		if math.IsNaN(x) {
			return ""
		}
		return fmt.Sprintf("; %s× direct read/write (A2)", ratio(x))
	}
	{
		da := r.med("storm_sat_rate", d) / r.med("storm_sat_rate", a)
		dc := r.med("storm_sat_rate", d) / r.med("storm_sat_rate", c)
		g = append(g, goal{Workload: "storm conn/s (saturated)", Goal: "≥ 0.95× direct and ≥ 2.0× HAProxy",
			Measured: fmt.Sprintf("%s× direct%s, %s× HAProxy (HAProxy %s× direct)%s", ratio(da), r.paired("storm_sat_rate", d, a), ratio(dc), ratio(r.med("storm_sat_rate", c)/r.med("storm_sat_rate", a)), rw("storm_sat_rate")),
			Met:      da >= 0.95 && dc >= 2.0, Known: ok(da, dc)})
	}
	{
		sa, sd := r.med("storm_sat_cpu", a), r.med("storm_sat_cpu", d)
		oa, od := r.med("storm_open_cpu", a), r.med("storm_open_cpu", d)
		g = append(g, goal{Workload: "server CPU per new connection, saturated", Goal: "≤ direct + 10 µs",
			Measured: fmt.Sprintf("baton %s µs, direct %s µs (%s µs; %s×%s), HAProxy %s µs", f1(sd), f1(sa), signed(sd-sa), ratio(sd/sa), r.paired("storm_sat_cpu", d, a), f1(r.med("storm_sat_cpu", c))),
			Met:      sd <= sa+10, Known: ok(sa, sd)})
		g = append(g, goal{Workload: fmt.Sprintf("server CPU per new connection at %s/s", commas(r.Plan.Rate)), Goal: "≤ 1.5× direct",
			Measured: fmt.Sprintf("baton %s µs, direct %s µs (%s×%s), HAProxy %s µs", f1(od), f1(oa), ratio(od/oa), r.paired("storm_open_cpu", d, a), f1(r.med("storm_open_cpu", c))),
			Met:      od <= 1.5*oa, Known: ok(oa, od)})
	}
	{
		x := r.med("sess1_p50", d) / r.med("sess1_p50", a)
		g = append(g, goal{Workload: "1-session RTT p50", Goal: "≤ 1.05× direct",
			Measured: fmt.Sprintf("%s× direct (%s vs %s µs; HAProxy %s×)%s", ratio(x), f1(r.med("sess1_p50", d)), f1(r.med("sess1_p50", a)), ratio(r.med("sess1_p50", c)/r.med("sess1_p50", a)), rw("sess1_p50")),
			Met:      x <= 1.05, Known: ok(x)})
	}
	{
		x := r.med("sess_rate", d) / r.med("sess_rate", a)
		g = append(g, goal{Workload: fmt.Sprintf("%d sessions msgs/s", r.Plan.SessN), Goal: "≥ 0.95× direct",
			Measured: fmt.Sprintf("%s× direct (HAProxy %s×)%s", ratio(x), ratio(r.med("sess_rate", c)/r.med("sess_rate", a)), rw("sess_rate")),
			Met:      x >= 0.95, Known: ok(x)})
	}
	{
		x := r.med("bulk", d) / r.med("bulk", a)
		g = append(g, goal{Workload: "bulk MB/s", Goal: "= direct (≥ 0.95×)",
			Measured: fmt.Sprintf("%s× direct%s (HAProxy %s×)%s", ratio(x), r.paired("bulk", d, a), ratio(r.med("bulk", c)/r.med("bulk", a)), rw("bulk")),
			Met:      x >= 0.95, Known: ok(x)})
	}
	{
		big, small := r.Plan.IdleCounts[len(r.Plan.IdleCounts)-1], r.Plan.IdleCounts[0]
		v := r.med(fmt.Sprintf("idle_%d_mid_rss_first", big), "D8")
		refill := r.med(fmt.Sprintf("idle_%d_mid_rss", big), "D8")
		slope := r.med("idle_mid_slope", "D8")
		fdv := r.med(fmt.Sprintf("idle_%d_mid_fd", big), "D8")
		g = append(g, goal{Workload: "batond memory per held session", Goal: fmt.Sprintf("≤ 32 B at %s sessions", count(big)),
			Measured: fmt.Sprintf("%s B and %s fds per session at %s, RSS growth over batond's idle RSS (8 workers; %s B per session between %s and %s%s); HAProxy %s B + %s fds per session at %s, stops at %s",
				f1(v), f2(fdv), count(big), f1(slope), count(small), count(big), refillText(refill),
				f1(r.med(fmt.Sprintf("idle_%d_mid_rss_first", small), c)), f2(r.med(fmt.Sprintf("idle_%d_mid_fd", small), c)), count(small), f0(r.med("idle_max", c))),
			Met: v <= 32, Known: ok(v)})
	}
	{
		fd, bd := r.med("reload_failed", d), r.med("reload_broken", d)
		g = append(g, goal{Workload: "reload under storm + sessions", Goal: "0 failed, 0 broken",
			Measured: fmt.Sprintf("baton %s failed + %s broken per reload (Python workers: %s + %s); HAProxy -x -sf %s + %s; SO_REUSEPORT restart %s + %s",
				f2(fd), f2(bd), f2(r.med("reload_failed", "E")), f2(r.med("reload_broken", "E")),
				f2(r.med("reload_failed", c)), f2(r.med("reload_broken", c)), f2(r.med("reload_failed", "B")), f2(r.med("reload_broken", "B"))),
			Met: fd == 0 && bd == 0, Known: ok(fd, bd)})
	}
	return g
}

// paired is num's metric divided by den's round by round, as text: the machine's speed drifts
// between rounds (the same configuration measured 1.7x apart in one run), and a configuration
// is compared most fairly with the other measured minutes apart in the same round.
func (r *report) paired(key, num, den string) string {
	var parts []string
	for _, x := range r.pairedRatios(key, num, den) {
		parts = append(parts, ratio(x))
	}
	if len(parts) < 2 {
		return ""
	}
	return " (round by round: " + strings.Join(parts, ", ") + ")"
}

// pairedRatios is num's metric divided by den's, for each round that has both.
func (r *report) pairedRatios(key, num, den string) []float64 {
	mt := r.metric(key)
	if mt == nil {
		return nil
	}
	byRound := func(id string) map[int]float64 {
		m := map[int]float64{}
		for _, x := range r.Runs {
			if x.Config == id && x.Scenario == mt.sc && x.Result != nil {
				if v := mt.get(x.Result); !math.IsNaN(v) && !math.IsInf(v, 0) && v != 0 {
					m[x.Round] = v // a re-measured round keeps its last measurement
				}
			}
		}
		return m
	}
	n, d := byRound(num), byRound(den)
	var out []float64
	for round := 1; round <= r.Plan.Rounds; round++ {
		if a, ok := n[round]; ok {
			if b, ok := d[round]; ok {
				out = append(out, a/b)
			}
		}
	}
	return out
}

func refillText(v float64) string {
	if math.IsNaN(v) {
		return ""
	}
	return fmt.Sprintf("; %s B when refilled", f1(v))
}

// signedIn is v in mt's unit, with its sign.
func signedIn(mt metric, v float64) string {
	switch {
	case math.IsNaN(v):
		return "–"
	case v < 0:
		return "−" + format(mt, -v)
	}
	return "+" + format(mt, v)
}

func signed(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return fmt.Sprintf("%+.1f", v)
}

// noise summarises the CPU used by other processes during the measurements.
func (r *report) noise() (median, worst float64, where string) {
	var v []float64
	for _, x := range r.Runs {
		if x.Result != nil && x.Result.ServerProcs > 0 {
			v = append(v, x.Result.OthersBusy)
			if x.Result.OthersBusy > worst {
				worst, where = x.Result.OthersBusy, fmt.Sprintf("%s %s round %d", x.Config, x.Scenario, x.Round)
			}
		}
	}
	return stats.Median(v), worst, where
}

func ratio(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	return fmt.Sprintf("%.2f", v)
}

func f0(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return commas(v)
}

func f1(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return fmt.Sprintf("%.1f", v)
}

func f2(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return fmt.Sprintf("%.2f", v)
}

// commas formats v rounded, with thousands separators.
func commas(v float64) string {
	s := fmt.Sprintf("%.0f", math.Abs(v))
	var b strings.Builder
	if v < 0 && s != "0" {
		b.WriteByte('-')
	}
	for i, ch := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(ch)
	}
	return b.String()
}

// format shows a metric's value in its unit.
func format(mt metric, v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	switch mt.Unit {
	case "µs":
		if v >= 100 {
			return commas(v)
		}
		return f1(v)
	case "MB/s":
		if v >= 100 {
			return commas(v)
		}
		return f1(v)
	case "fds", "sessions":
		if mt.Unit == "sessions" && v == math.Trunc(v) {
			return commas(v)
		}
		return f2(v)
	case "s":
		return f2(v)
	case "ms":
		if v >= 100 {
			return commas(v)
		}
		return f1(v)
	case "conns":
		if v != math.Trunc(v) {
			return f2(v)
		}
		return commas(v)
	case "% of a core":
		return fmt.Sprintf("%.0f %%", v)
	}
	return commas(v)
}

// Markdown renders the report. With full, it also lists the configurations, the machine and
// every round.
func (r *report) Markdown(full bool) string {
	var b strings.Builder
	has := func(id string) bool { return slices.Contains(r.order, id) }
	if full {
		fmt.Fprintf(&b, "# baton-bench results (%s)\n\n", r.Plan.Mode)
		if r.Machine.Revision != "" {
			fmt.Fprintf(&b, "baton %s · ", r.Machine.Revision)
		}
		fmt.Fprintf(&b, "%s · %s · %d CPUs · %.0f GiB · Linux %s · %s · HAProxy %s · Python %s · RLIMIT_NOFILE %d\n\n",
			r.Machine.Date, r.Machine.CPU, r.Machine.CPUs, r.Machine.MemGiB, r.Machine.Kernel, r.Machine.Go, r.Machine.HAProxy, r.Machine.Python, r.Machine.NoFile)
		fmt.Fprintf(&b, "%s. %d rounds, configurations interleaved (%s, then again); every figure is the median over the rounds. Load average %s at the start, %s at the end; %.0f s in all.\n\n",
			r.Machine.Pinning, r.Plan.Rounds, strings.Join(r.order, " "), r.Machine.LoadAvg, r.Machine.LoadAvgEnd, r.Machine.Seconds)
		if med, worst, where := r.noise(); !math.IsNaN(med) {
			fmt.Fprintf(&b, "CPU used by everything else on the machine while measuring (other processes, interrupts): median %.0f %% of a core, worst %.0f %% (%s). "+
				"The suite waited %.0f s in all for quiet moments and measured %d times again because of outside load (more than %.0f %% of a core).\n\n",
				100*med, 100*worst, where, r.Machine.QuietWait, r.Machine.Retries, 100*maxOthers)
		}
		b.WriteString("| id | configuration |\n|---|---|\n")
		for _, c := range r.Configs {
			fmt.Fprintf(&b, "| %s | **%s**: %s |\n", c.ID, c.Name, c.Desc)
		}
		b.WriteString("\n")
	}
	// The table of the pinned configurations (the scaling ones have theirs).
	// DM runs only the migration scenario, which has its own section.
	pinned := slices.DeleteFunc(slices.Clone(r.Configs), func(c cfgInfo) bool { return c.Scaling || c.ID == "DM" })
	r.mainTable(&b, pinned)
	// Goals.
	if has("A") && has("D") {
		b.WriteString("| issue 5 goal | target | measured | |\n|---|---|---|---|\n")
		for _, g := range r.Goals {
			verdict := "missed"
			switch {
			case !g.Known:
				verdict = "not measured"
			case g.Met:
				verdict = "**met**"
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", g.Workload, g.Goal, g.Measured, verdict)
		}
		b.WriteString("\n")
	}
	r.proxyMarkdown(&b)
	r.migrateMarkdown(&b)
	r.scalingMarkdown(&b)
	if fails := r.failures(); fails > 0 {
		fmt.Fprintf(&b, "**%d measurements failed:**\n\n", fails)
		for _, x := range r.Runs {
			if x.Error != "" {
				fmt.Fprintf(&b, "- %s %s round %d: %s\n", x.Config, x.Scenario, x.Round, oneLine(x.Error))
			}
		}
		b.WriteString("\n")
	}
	if full {
		b.WriteString("### Every round\n\nThe result line of every measurement, in the order they ran (a reader can judge the noise from the spread).\n\n```\n")
		for _, x := range r.Runs {
			if x.Error != "" {
				fmt.Fprintf(&b, "%-3s %-12s round %d: FAILED: %s\n", x.Config, x.Scenario, x.Round, oneLine(x.Error))
			} else {
				again := ""
				if x.Retried {
					again = "   (measured twice: outside load; the quieter kept)"
				}
				fmt.Fprintf(&b, "round %d  %s%s\n", x.Round, oneLine(x.Line), again)
			}
		}
		b.WriteString("```\n")
		var notes []string
		for _, x := range r.Runs {
			if x.Result != nil && x.Result.Reload != nil && x.Result.Reload.ReloadOutput != "" {
				notes = append(notes, fmt.Sprintf("%s round %d: %s", x.Config, x.Round, oneLine(x.Result.Reload.ReloadOutput)))
			}
			if x.Result != nil {
				for _, l := range x.Result.Idle {
					if l.Stop != "" {
						notes = append(notes, fmt.Sprintf("%s round %d idle %s: stopped: %s", x.Config, x.Round, count(l.Target), l.Stop))
					}
				}
			}
		}
		if len(notes) > 0 {
			b.WriteString("\nWhere configurations stopped or reloads failed:\n\n")
			for _, n := range notes {
				fmt.Fprintf(&b, "- %s\n", n)
			}
		}
	}
	return b.String()
}

// mainTable writes the table of the pinned configurations, with the ratios of those compared.
func (r *report) mainTable(b *strings.Builder, pinned []cfgInfo) {
	if len(pinned) == 0 {
		return
	}
	has := func(id string) bool { return slices.Contains(r.order, id) }
	b.WriteString("| metric | unit |")
	for _, c := range pinned {
		fmt.Fprintf(b, " %s %s |", c.ID, c.Name)
	}
	type rc struct{ name, num, den string }
	var ratios []rc
	for _, x := range []rc{{"D÷A", "D", "A"}, {"D÷A2", "D", "A2"}, {"D÷C", "D", "C"}, {"DP÷D", "DP", "D"}, {"E÷F", "E", "F"}} {
		if has(x.num) && has(x.den) {
			ratios = append(ratios, x)
		}
	}
	for _, x := range ratios {
		fmt.Fprintf(b, " %s |", x.name)
	}
	b.WriteString("\n|---|---|")
	for range pinned {
		b.WriteString("---:|")
	}
	for range ratios {
		b.WriteString("---:|")
	}
	b.WriteString("\n")
	for _, mt := range r.Metrics {
		row := r.Table[mt.Key]
		if len(row) == 0 || isScaleScenario(mt.sc) || mt.sc == scMigrate {
			continue
		}
		fmt.Fprintf(b, "| %s | %s |", mt.Label, mt.Unit)
		for _, c := range pinned {
			v := math.NaN()
			if x, ok := row[c.ID]; ok {
				v = x.Median
			}
			fmt.Fprintf(b, " %s |", format(mt, v))
		}
		for _, x := range ratios {
			if !mt.Ratios {
				b.WriteString(" |")
				continue
			}
			fmt.Fprintf(b, " %s |", ratio(r.med(mt.Key, x.num)/r.med(mt.Key, x.den)))
		}
		b.WriteString("\n")
	}
	b.WriteString("\n")
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 600 {
		s = s[:600] + "…"
	}
	return s
}

var (
	numberArrays = regexp.MustCompile(`\[[-0-9.e+,\s]+\]`)
	whitespace   = regexp.MustCompile(`\s+`)
)

func (r *report) write(dir string) error {
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	js = numberArrays.ReplaceAllFunc(js, func(m []byte) []byte { // one line per array of numbers
		return whitespace.ReplaceAll(m, nil)
	})
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(js, '\n'), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.md"), []byte(r.Markdown(true)), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "plot.svg"), []byte(r.SVG()), 0o644); err != nil {
		return err
	}
	if len(r.Scaling) == 0 && !slices.ContainsFunc(r.Configs, func(c cfgInfo) bool { return c.Scaling }) {
		return nil
	}
	return os.WriteFile(filepath.Join(dir, "scaling.svg"), []byte(r.ScalingSVG()), 0o644)
}

var colors = map[string]string{"A": "#1f77b4", "A2": "#7fb2dc", "B": "#17becf", "C": "#d62728", "D": "#2ca02c", "DP": "#1b6e1b", "D8": "#8fd175", "E": "#9467bd", "F": "#ff7f0e"}

// SVG draws the plot: rates and CPU as bars, latencies by percentile.
func (r *report) SVG() string {
	const w, pw, ph = 1000.0, 500.0, 310.0
	c := plot.New(w, 40+5*ph+20, fmt.Sprintf("baton-bench (%s run, %s): medians of %d interleaved rounds; dots are rounds", r.Plan.Mode, r.Machine.Date, r.Plan.Rounds))
	name := map[string]string{}
	for _, cf := range r.Configs {
		name[cf.ID] = cf.ID + " " + cf.Name
	}
	bars := func(key string, ids []string) []plot.Bar {
		var out []plot.Bar
		for _, id := range ids {
			cl, ok := r.Table[key][id]
			if !ok {
				continue
			}
			out = append(out, plot.Bar{Name: id, Color: colors[id], Value: cl.Median, Points: cl.Rounds})
		}
		return out
	}
	lines := func(sc string) []plot.Line {
		var out []plot.Line
		for _, id := range r.order {
			if cdf, ok := r.CDFs[sc][id]; ok {
				out = append(out, plot.Line{Name: name[id], Color: colors[id], Q: stats.CDFPoints, Micros: cdf})
			}
		}
		return out
	}
	goIDs := []string{"A", "A2", "B", "C", "D", "DP"}
	pyIDs := []string{"E", "F"}
	at := func(col, row int) (float64, float64) { return float64(col) * pw, 40 + float64(row)*ph }
	x, y := at(0, 0)
	c.Bars(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "storm, saturated: connections/s", Note: "higher is better"}, "conn/s",
		[]plot.Group{{Caption: "Go echo", Bars: bars("storm_sat_rate", goIDs)}, {Caption: "Python lobby", Bars: bars("storm_sat_rate", pyIDs)}})
	x, y = at(1, 0)
	c.Bars(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "server CPU per connection", Note: "lower is better · saturated | open loop"}, "µs",
		[]plot.Group{{Caption: "saturated", Bars: bars("storm_sat_cpu", append(goIDs, pyIDs...))}, {Caption: fmt.Sprintf("%.0f/s (Py %.0f/s)", r.Plan.Rate, r.Plan.PyRate), Bars: bars("storm_open_cpu", append(goIDs, pyIDs...))}})
	x, y = at(0, 1)
	c.Percentiles(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "storm, saturated: connect→reply latency", Note: "further left is better"}, lines(scStormSat))
	x, y = at(1, 1)
	c.Percentiles(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: fmt.Sprintf("storm at %.0f/s (Python %.0f/s): connect→reply latency", r.Plan.Rate, r.Plan.PyRate), Note: "further left is better"}, lines(scStormOpen))
	x, y = at(0, 2)
	c.Percentiles(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "1 session: round-trip time (64 B)", Note: "further left is better"}, lines(scSess1))
	x, y = at(1, 2)
	c.Percentiles(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: fmt.Sprintf("%d sessions: round-trip time", r.Plan.SessN), Note: "further left is better"}, lines(scSess100))
	x, y = at(0, 3)
	c.Bars(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: fmt.Sprintf("%d sessions: messages/s", r.Plan.SessN), Note: "higher is better · 64-byte ping-pong"}, "msg/s",
		[]plot.Group{{Caption: "Go echo", Bars: bars("sess_rate", goIDs)}, {Caption: "Python lobby", Bars: bars("sess_rate", pyIDs)}})
	x, y = at(1, 3)
	c.Bars(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "bulk: one connection through the echo", Note: "higher is better"}, "MB/s",
		[]plot.Group{{Caption: "Go echo", Bars: bars("bulk", goIDs)}})
	x, y = at(0, 4)
	big := r.Plan.IdleCounts[len(r.Plan.IdleCounts)-1]
	small := r.Plan.IdleCounts[0]
	var idleGroups []plot.Group
	for _, n := range []int{small, big} {
		idleGroups = append(idleGroups,
			plot.Group{Caption: count(n) + " first", Bars: bars(fmt.Sprintf("idle_%d_mid_rss_first", n), []string{"C", "D", "D8"})},
			plot.Group{Caption: count(n) + " refill", Bars: bars(fmt.Sprintf("idle_%d_mid_rss", n), []string{"C", "D", "D8"})})
	}
	c.Bars(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "idle: middle box RSS per held connection", Note: fmt.Sprintf("lower is better · C HAProxy, D/D8 batond · most held: %s", idleNote(r))}, "bytes", idleGroups)
	x, y = at(1, 4)
	c.Bars(plot.Panel{X: x, Y: y, W: pw, H: ph, Title: "reload under storm + sessions", Note: fmt.Sprintf("lower is better · per reload, %d reloads a round (Python %d)", r.Plan.Reloads, r.Plan.ReloadsPy)}, "per reload",
		[]plot.Group{{Caption: "failed connects", Bars: bars("reload_failed", []string{"B", "C", "D", "E"})}, {Caption: "broken sessions", Bars: bars("reload_broken", []string{"B", "C", "D", "E"})}})
	return c.String()
}

func idleNote(r *report) string {
	var parts []string
	for _, id := range []string{"A", "B", "C", "D", "D8"} {
		if cl, ok := r.Table["idle_max"][id]; ok {
			parts = append(parts, fmt.Sprintf("%s %s", id, plotCount(cl.Median)))
		}
	}
	return strings.Join(parts, ", ")
}

func plotCount(v float64) string {
	if v >= 1000 {
		return fmt.Sprintf("%.1fk", v/1000)
	}
	return fmt.Sprintf("%.0f", v)
}

// proxyMarkdown writes what PROXY v2 costs (DP against D) and what a /metrics scrape costs.
func (r *report) proxyMarkdown(b *strings.Builder) {
	if len(r.Proxy) > 0 {
		b.WriteString("| PROXY v2: DP against D | unit | D baton | DP baton+PROXY | DP÷D | DP−D | DP÷D round by round |\n|---|---|---:|---:|---:|---:|---|\n")
		for _, v := range r.Proxy {
			mt := r.metric(v.Key)
			var rounds []string
			for _, x := range v.ByRound {
				rounds = append(rounds, ratio(x))
			}
			fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | %s |\n", v.Label, v.Unit, format(*mt, v.Den), format(*mt, v.Num), ratio(v.Ratio), signedIn(*mt, v.Diff), strings.Join(rounds, ", "))
		}
		b.WriteString("\n")
	}
	if c, ok := r.Table["scrape_cpu"]["DP"]; ok {
		var rounds []string
		for _, x := range c.Rounds {
			rounds = append(rounds, f0(x))
		}
		fmt.Fprintf(b, "One Prometheus scrape of batond's /metrics (2 workers, after the storms; %d scrapes in a row over one connection): %s µs of CPU (batond and its idle workers; rounds: %s), %s µs to the last byte (p50), %s bytes.\n\n",
			r.Plan.Scrapes, f0(c.Median), strings.Join(rounds, ", "), f0(r.med("scrape_p50", "DP")), f0(r.med("scrape_bytes", "DP")))
	}
}
