package main

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSmoke runs `bench/run --smoke` end to end: it builds batond, batonctl, the Go echo
// example and baton-bench, starts every configuration (direct, SO_REUSEPORT, HAProxy, baton
// with Go workers, plain and behind PROXY v2, with Python workers, the Python lobby directly,
// and the unpinned scaling ones: the lobby directly and behind batond with 1 and 2 workers),
// runs every scenario tiny, and writes the tables, results.json, plot.svg and scaling.svg. It needs haproxy, python3 and taskset: in CI
// (CI=true) their absence is a failure naming the package to install, elsewhere a skip.
func TestSmoke(t *testing.T) {
	var missing []string
	for cmd, pkg := range map[string]string{"haproxy": "haproxy", "python3": "python3", "taskset": "util-linux", "bash": "bash"} {
		if _, err := exec.LookPath(cmd); err != nil {
			missing = append(missing, cmd+" (Debian package "+pkg+")")
		}
	}
	if len(missing) > 0 {
		msg := "bench/run --smoke needs " + strings.Join(missing, ", ") + ": .ci/run must apt-get install them"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", filepath.Join("..", "..", "bench", "run"), "--smoke", "--no-install", "--out", out)
	var log strings.Builder
	cmd.Stdout, cmd.Stderr = &log, &log
	start := time.Now()
	if err := cmd.Run(); err != nil {
		t.Fatalf("bench/run --smoke: %v\n%s", err, log.String())
	}
	t.Logf("bench/run --smoke took %.1fs", time.Since(start).Seconds())

	b, err := os.ReadFile(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var rep struct {
		Runs []struct {
			Config, Scenario, Error string
			Result                  *struct {
				Ops     int64   `json:"ops"`
				MBps    float64 `json:"mb_per_s"`
				ProxyV2 bool    `json:"proxy_v2"`
				Depth   int     `json:"depth"`
				Client  float64 `json:"client_busy"`
				Idle    []struct {
					Pass, Target, Held int
					Reached            bool
				}
				Reload *struct {
					Reloads      int `json:"reloads"`
					ReloadErrors int `json:"reload_errors"`
					Sessions     int `json:"sessions"`
				}
				Migrate *smokeMigrate
			}
		}
		Goals   []struct{ Workload string }
		Scaling []struct {
			Key, Config string
			Workers     int
			Ratio       float64
			ByRound     []float64 `json:"by_round"`
			Generator   float64   `json:"generator_busy_pct"`
		}
		Machine struct {
			Online string `json:"online_cpus"`
		}
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, r := range rep.Runs {
		name := r.Config + " " + r.Scenario
		seen[name] = true
		if r.Error != "" || r.Result == nil {
			t.Errorf("%s: %s", name, r.Error)
			continue
		}
		res := r.Result
		if r.Config == "DP" && r.Scenario != "scrape" && !res.ProxyV2 {
			t.Errorf("%s: sent without PROXY headers", name)
		}
		switch {
		case r.Scenario == "bulk" && res.MBps <= 0:
			t.Errorf("%s: no bytes echoed", name)
		case r.Scenario == "idle":
			for _, l := range res.Idle {
				if !l.Reached {
					t.Errorf("%s: held %d of %d", name, l.Held, l.Target)
				}
			}
			if len(res.Idle) != 4 || res.Idle[3].Pass != 2 { // two counts, filled twice
				t.Errorf("%s: idle levels %+v, want two counts filled twice", name, res.Idle)
			}
		case r.Scenario == "reload":
			if x := res.Reload; x == nil || x.Reloads != 1 || x.ReloadErrors != 0 || x.Sessions == 0 {
				t.Errorf("%s: reload result %+v", name, x)
			}
		case r.Scenario == "migrate":
			checkMigrate(t, name, res.Migrate)
		case r.Scenario != "idle" && r.Scenario != "bulk" && res.Ops <= 0:
			t.Errorf("%s: nothing completed", name)
		case strings.HasPrefix(r.Scenario, "scale-sessions") && (res.Depth != 4 || res.Ops%4 != 0):
			t.Errorf("%s: depth %d, %d messages: not pipelined 4 at a time", name, res.Depth, res.Ops)
		}
		if strings.HasPrefix(r.Scenario, "scale-") && res.Client <= 0 {
			t.Errorf("%s: the load generator's CPU was not measured", name)
		}
	}
	for _, want := range []string{"A storm-sat", "A idle", "B reload", "C storm-open", "C reload", "D sessions-1", "D reload", "D8 idle", "E sessions-100", "E reload", "DM migrate", "F storm-sat", "D bulk", "A2 bulk", "DP storm-sat", "DP storm-open", "DP sessions-1", "DP scrape",
		"S0 scale-storm", "S0 scale-sessions-100", "S0 scale-sessions-1000", "S1 scale-storm", "S2 scale-storm", "S2 scale-sessions-100", "S2 scale-sessions-1000"} {
		if !seen[want] {
			t.Errorf("no %s measurement", want)
		}
	}
	if len(rep.Goals) != 8 {
		t.Errorf("%d goals evaluated, want 8", len(rep.Goals))
	}
	// Speed-ups of 1 and 2 workers over the direct process, in each scaling scenario.
	ups := map[string]bool{}
	for _, s := range rep.Scaling {
		ups[s.Config+" "+s.Key] = true
		if s.Ratio <= 0 || len(s.ByRound) != 1 || s.ByRound[0] != s.Ratio || s.Generator <= 0 {
			t.Errorf("speed-up %s %s: %+v", s.Config, s.Key, s)
		}
	}
	for _, k := range []string{"scale_storm_rate", "scale_s100_rate", "scale_s1k_rate"} {
		for _, c := range []string{"S1", "S2"} {
			if !ups[c+" "+k] {
				t.Errorf("no speed-up %s %s", c, k)
			}
		}
	}
	if rep.Machine.Online == "" {
		t.Error("the online CPUs the scaling configurations ran on are not recorded")
	}
	md, err := os.ReadFile(filepath.Join(out, "results.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"| metric | unit |", "| issue 5 goal |", "server side pinned to CPU 0", "| PROXY v2: DP against D |", "One Prometheus scrape of batond's /metrics",
		"### Scaling: the Python lobby on every core", "| S1÷S0 | S2÷S0 |", "| speed-up over one direct Python process |"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("results.md lacks %q", want)
		}
	}
	for _, name := range []string{"plot.svg", "scaling.svg"} {
		svg, err := os.ReadFile(filepath.Join(out, name))
		if err != nil {
			t.Fatal(err)
		}
		d := xml.NewDecoder(strings.NewReader(string(svg)))
		for {
			if _, err := d.Token(); err == io.EOF {
				break
			} else if err != nil {
				t.Fatalf("%s is not well-formed: %v", name, err)
			}
		}
	}
	if t.Failed() {
		t.Logf("bench/run output:\n%s", log.String())
	}
}

// smokeMigrate is what the smoke test reads of a migrate result.
type smokeMigrate struct {
	Levels []struct {
		Sessions, Held, Migrated, Lost, Checked, Cut, Paused int
		Migrate                                              bool
		GoneSeconds                                          float64 `json:"old_gone_s"`
		PauseP50                                             float64 `json:"pause_p50_ms"`
		Error                                                string
	}
}

// checkMigrate asserts that the migrate scenario moved every session and that each answered a
// round trip afterwards, and that the plain reload it is compared with kept them until its
// drain deadline cut them.
func checkMigrate(t *testing.T, name string, m *smokeMigrate) {
	t.Helper()
	if m == nil || len(m.Levels) != 2 || !m.Levels[0].Migrate || m.Levels[1].Migrate {
		t.Errorf("%s: want one migrating and one plain reload: %+v", name, m)
		return
	}
	for _, l := range m.Levels {
		switch {
		case l.Error != "":
			t.Errorf("%s: %s", name, l.Error)
		case l.Held != l.Sessions || l.Checked != l.Held:
			t.Errorf("%s: held %d of %d sessions, %d answered after the reload: %+v", name, l.Held, l.Sessions, l.Checked, l)
		case l.GoneSeconds <= 0:
			t.Errorf("%s: the old generation did not exit: %+v", name, l)
		case l.Paused == 0 || l.PauseP50 <= 0:
			t.Errorf("%s: no pause measured: %+v", name, l)
		case l.Migrate && (l.Migrated != l.Held || l.Lost != 0 || l.Cut != 0):
			t.Errorf("%s: moved %d of %d, lost %d, cut %d", name, l.Migrated, l.Held, l.Lost, l.Cut)
		case !l.Migrate && l.Cut != l.Held:
			t.Errorf("%s: the plain reload's drain deadline cut %d of %d sessions", name, l.Cut, l.Held)
		}
	}
}
