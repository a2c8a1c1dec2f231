package suite

import (
	"encoding/json"
	"errors"
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
	for _, c := range configs(2) {
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
	r := buildReport(Machine{}, pl, configs(2)[:1], []run{{Config: "A", Scenario: scStormSat, Round: 1, Error: "boom"}})
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
	for _, c := range configs(2) {
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

func TestReportScaling(t *testing.T) {
	pl, err := plans("full")
	if err != nil {
		t.Fatal(err)
	}
	var cfgs []*config
	for _, c := range configs(2) {
		if c.ID == "F" || c.Scaling {
			cfgs = append(cfgs, c)
		}
	}
	if ids(cfgs) != "F S0 S1 S2" {
		t.Fatalf("configurations %s, want F S0 S1 S2", ids(cfgs))
	}
	var runs []run
	add := func(cfg, sc string, round int, r *load.Result) {
		runs = append(runs, run{Config: cfg, Scenario: sc, Round: round, Result: r})
	}
	for round := 1; round <= 3; round++ {
		k := float64(round)
		add("F", scStormSat, round, &load.Result{PerSec: 6000})
		// S0: 5,000 conn/s, one core, the generator 25 % of one: the machine's 2 CPUs allow 1.6×.
		add("S0", scScaleStorm, round, &load.Result{PerSec: 5000, ServerBusy: 1, ClientBusy: 0.25})
		add("S1", scScaleStorm, round, &load.Result{PerSec: 4000 + 100*k, ServerBusy: 1})
		add("S2", scScaleStorm, round, &load.Result{PerSec: 8000 + 100*k, ServerBusy: 1.6, ClientBusy: 0.4})
		add("S0", scScaleSess100, round, &load.Result{PerSec: 100000, ServerBusy: 1, ClientBusy: 0.1})
		add("S2", scScaleSess100, round, &load.Result{PerSec: 180000 + 1000*k, ServerBusy: 1.8, ClientBusy: 0.15})
	}
	r := buildReport(Machine{CPUs: 2, Online: "0-1"}, pl, cfgs, runs)
	got := map[string]speedup{}
	for _, s := range r.Scaling {
		got[s.Config+" "+s.Key] = s
	}
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
	if s := got["S2 scale_storm_rate"]; !near(s.Ratio, 1.64) || len(s.ByRound) != 3 || !near(s.ByRound[0], 1.62) || s.Goal != 1.7 || s.Met || s.Generator != 40 || !near(s.Ceiling, 1.6) {
		t.Errorf("storm S2÷S0: %+v", s)
	}
	if s := got["S1 scale_storm_rate"]; !near(s.Ratio, 0.84) || s.Goal != 0 || s.Met || s.Ceiling != 1 {
		t.Errorf("storm S1÷S0: %+v", s)
	}
	if s := got["S2 scale_s100_rate"]; !near(s.Ratio, 1.82) || !s.Met || !near(s.Ceiling, 2/1.1) {
		t.Errorf("100 sessions S2÷S0: %+v", s)
	}
	if _, ok := got["S1 scale_s100_rate"]; ok {
		t.Error("a speed-up without a measurement")
	}
	md := r.Markdown(true)
	for _, want := range []string{
		"| metric | unit | F py direct |", // the main table keeps the pinned ones only
		"| metric | unit | S0 py direct | S1 baton-py 1w | S2 baton-py 2w | S1÷S0 | S2÷S0 |",
		"| storm, saturated (64 in flight): conn/s | 2 | 1.64× | 1.62, 1.64, 1.66 | 40 % of a core | 1.60× | ≥ 1.70× | missed |",
		"| 100 sessions × 32 pipelined: msg/s | 2 | 1.82× |",
		"**met**",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	if strings.Contains(md, "| metric | unit | F py direct | S0") {
		t.Error("scaling configurations in the main table")
	}
	svg := r.ScalingSVG()
	for _, want := range []string{"goal, 2 workers: 1.70×", "1.64×", "</svg>"} {
		if !strings.Contains(svg, want) {
			t.Errorf("scaling.svg lacks %q", want)
		}
	}
	if n, err := countCPUs("0-3,6,8-9"); n != 7 || err != nil {
		t.Errorf("countCPUs = %d, %v", n, err)
	}
	for _, bad := range []string{"", "a", "3-1", "0-"} {
		if _, err := countCPUs(bad); !errors.Is(err, errCPUList) {
			t.Errorf("countCPUs(%q) = %v", bad, err)
		}
	}
	if got := expandScenarios([]string{"idle", "scaling"}); strings.Join(got, ",") != "idle,scale-storm,scale-sessions-100,scale-sessions-1000" {
		t.Errorf("expandScenarios = %v", got)
	}
}
