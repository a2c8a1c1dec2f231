package suite

import (
	"encoding/json"
	"math"
	"strings"
	"testing"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/load"
)

func fakeRuns(pl plan) []run {
	var runs []run
	add := func(cfg, sc string, round int, r *load.Result) {
		runs = append(runs, run{Config: cfg, Scenario: sc, Round: round, Result: r})
	}
	for round := 1; round <= 3; round++ {
		k := float64(round) // rounds differ; the medians are round 2's
		for _, c := range []struct {
			id          string
			rate, cpu   float64
			rtt, msgs   float64
			mb, midRSS  float64
			failed      float64
			idleReached bool
		}{
			{"A", 10000 + k, 66, 20, 50000, 1000, 0, math.NaN(), false},
			{"C", 4800 + k, 151, 44, 21500, 210, 3400, 0.5, false},
			{"D", 9800 + k, 70, 20.5, 49000, 1000, 40, 0, true},
			{"D8", 0, 0, 0, 0, 0, 20, math.NaN(), true},
		} {
			if c.id != "D8" {
				add(c.id, scStormSat, round, &load.Result{PerSec: c.rate, P50: 100, P99: 900, ServerCPUPer: c.cpu + k, CDF: []float64{1, 2, 3}})
				add(c.id, scStormOpen, round, &load.Result{PerSec: 4000, ServerCPUPer: 2 * c.cpu})
				add(c.id, scSess1, round, &load.Result{P50: c.rtt, P99: 2 * c.rtt})
				add(c.id, scSess100, round, &load.Result{PerSec: c.msgs})
				add(c.id, scBulk, round, &load.Result{MBps: c.mb})
			}
			held := 100000
			if !c.idleReached {
				held = 9987
			}
			var levels []load.IdleLevel
			for pass := 1; pass <= 2; pass++ {
				rss := c.midRSS * float64(3-pass) // the first fill costs more
				levels = append(levels,
					load.IdleLevel{Pass: pass, Target: 10000, Held: min(held, 10000), Reached: held >= 10000, MiddleRSSPerConn: rss, MiddleRSS: int64(rss * 1e4), MiddleFDPerConn: 2},
					load.IdleLevel{Pass: pass, Target: 100000, Held: held, Reached: held >= 100000, MiddleRSSPerConn: rss / 2, MiddleRSS: int64(rss * 5e4)})
			}
			add(c.id, scIdle, round, &load.Result{Idle: levels})
			if !math.IsNaN(c.failed) {
				add(c.id, scReload, round, &load.Result{Reload: &load.ReloadResult{Reloads: 5, FailedPer: c.failed}})
			}
		}
	}
	return runs
}

func TestReport(t *testing.T) {
	pl, err := plans("full")
	if err != nil {
		t.Fatal(err)
	}
	var cfgs []*config
	for _, c := range configs() {
		if c.ID == "A" || c.ID == "C" || c.ID == "D" || c.ID == "D8" {
			cfgs = append(cfgs, c)
		}
	}
	r := buildReport(Machine{Pinning: "server side pinned to CPU 0"}, pl, cfgs, fakeRuns(pl))
	if got := r.med("storm_sat_rate", "D"); got != 9802 {
		t.Errorf("median storm rate of D = %v, want round 2's 9802", got)
	}
	if _, ok := r.Table["idle_10000_mid_rss"]["A"]; ok {
		t.Error("a configuration that did not reach a count has a per-connection figure for it")
	}
	if first, refill := r.med("idle_100000_mid_rss_first", "D8"), r.med("idle_100000_mid_rss", "D8"); first != 20 || refill != 10 {
		t.Errorf("D8 at 100k: first fill %v, refill %v; want 20 and 10", first, refill)
	}
	if got := r.med("idle_10000_mid_rss_first", "C"); got != 6800 {
		t.Errorf("HAProxy at 9,987 of 10k: %v B per connection, want 3400 (nearly reached counts are shown)", got)
	}
	goals := map[string]goal{}
	for _, g := range r.Goals {
		goals[g.Workload] = g
	}
	for w, want := range map[string]bool{
		"storm conn/s (saturated)":                 true, // 0.98× direct, 2.04× HAProxy
		"server CPU per new connection, saturated": true, // 72 ≤ 68 + 10
		"1-session RTT p50":                        true, // 1.025×
		"100 sessions msgs/s":                      true, // 0.98×
		"bulk MB/s":                                true, // 1.0×
		"batond memory per held session":           true, // 20/2 = 10 B
		"reload under storm + sessions":            true, // 0 and 0
		"server CPU per new connection at 4,000/s": true, // 2×70 vs 2×66
	} {
		g, ok := goals[w]
		if !ok {
			t.Errorf("no goal %q (have %v)", w, r.Goals)
			continue
		}
		if !g.Known || g.Met != want {
			t.Errorf("goal %q: %+v", w, g)
		}
	}
	// Round by round: D's rates 9801..9803 over A's 10001..10003.
	if m := goals["storm conn/s (saturated)"].Measured; !strings.Contains(m, "(round by round: 0.98, 0.98, 0.98)") {
		t.Errorf("storm goal lacks the per-round ratios: %s", m)
	}
	md := r.Markdown(true)
	for _, want := range []string{"| metric | unit | A direct | C haproxy | D baton | D8 baton 8w | D÷A | D÷C |", "**met**", "9,802", "| 0.98 |", "server side pinned to CPU 0"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	if _, err := json.Marshal(r); err != nil {
		t.Errorf("results.json: %v", err)
	}
	if svg := r.SVG(); !strings.Contains(svg, "</svg>") {
		t.Error("no SVG")
	}
}

func TestReportMissingConfigs(t *testing.T) {
	pl, _ := plans("smoke")
	r := buildReport(Machine{}, pl, configs()[:1], []run{{Config: "A", Scenario: scStormSat, Round: 1, Error: "boom"}})
	if r.failures() != 1 {
		t.Errorf("failures = %d", r.failures())
	}
	md := r.Markdown(true)
	if !strings.Contains(md, "boom") || strings.Contains(md, "issue 5 goal") {
		t.Errorf("markdown:\n%s", md)
	}
	for _, g := range r.Goals {
		if g.Known {
			t.Errorf("goal %q known without measurements", g.Workload)
		}
	}
	if _, err := json.Marshal(r); err != nil {
		t.Error(err)
	}
}

func TestShq(t *testing.T) {
	for in, want := range map[string]string{"/tmp/a-b.sock": "/tmp/a-b.sock", "a b": "'a b'", "it's": `'it'\''s'`, "": "''"} {
		if got := shq(in); got != want {
			t.Errorf("shq(%q) = %s, want %s", in, got, want)
		}
	}
	if _, err := plans("bogus"); err == nil {
		t.Error("unknown mode accepted")
	}
}

func TestReportProxy(t *testing.T) {
	pl, err := plans("full")
	if err != nil {
		t.Fatal(err)
	}
	var cfgs []*config
	for _, c := range configs() {
		if c.ID == "D" || c.ID == "DP" {
			cfgs = append(cfgs, c)
		}
	}
	var runs []run
	add := func(cfg, sc string, round int, r *load.Result) {
		runs = append(runs, run{Config: cfg, Scenario: sc, Round: round, Result: r})
	}
	for round := 1; round <= 3; round++ {
		k := float64(round)
		// D: 10,000 conn/s and 60 µs a connection; DP: 9,000 + 100k conn/s and 66 µs + k.
		add("D", scStormSat, round, &load.Result{PerSec: 10000, P50: 100, ServerCPUPer: 60})
		add("DP", scStormSat, round, &load.Result{PerSec: 9000 + 100*k, P50: 110, ServerCPUPer: 66 + k, ProxyV2: true})
		add("D", scStormOpen, round, &load.Result{PerSec: 4000, P50: 50, P99: 200, ServerCPUPer: 80})
		add("DP", scStormOpen, round, &load.Result{PerSec: 4000, P50: 60, P99: 210, ServerCPUPer: 88, ProxyV2: true})
		add("D", scSess1, round, &load.Result{P50: 20})
		add("DP", scSess1, round, &load.Result{P50: 20, ProxyV2: true})
		add("DP", scScrape, round, &load.Result{Ops: 300, ServerCPUPer: 700 + 100*k, P50: 900, Bytes: 12345})
	}
	r := buildReport(Machine{}, pl, cfgs, runs)
	got := map[string]versus{}
	for _, v := range r.Proxy {
		got[v.Key] = v
	}
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
	if v := got["storm_sat_rate"]; !near(v.Ratio, 0.92) || len(v.ByRound) != 3 || !near(v.ByRound[0], 0.91) || !near(v.ByRound[2], 0.93) {
		t.Errorf("storm rate DP÷D: %+v", v)
	}
	if v := got["storm_sat_cpu"]; v.Diff != 8 || v.Num != 68 {
		t.Errorf("storm CPU DP−D: %+v", v)
	}
	if v := got["storm_open_p50"]; !near(v.Ratio, 1.2) {
		t.Errorf("open-loop p50 DP÷D: %+v", v)
	}
	if _, ok := got["sess_rate"]; ok {
		t.Error("a metric neither measured compared")
	}
	md := r.Markdown(true)
	for _, want := range []string{"| DP÷D |", "| PROXY v2: DP against D |", "| 0.92 | −800 | 0.91, 0.92, 0.93 |", "| 60.0 | 68.0 | 1.13 | +8.0 |", "900 µs of CPU (batond and its idle workers; rounds: 800, 900, 1,000)", "12,345 bytes"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	// Without DP, nothing of it.
	r = buildReport(Machine{}, pl, cfgs[:1], runs)
	if len(r.Proxy) != 0 || strings.Contains(r.Markdown(true), "PROXY v2: DP") {
		t.Error("a PROXY comparison without DP")
	}
}
