// Package suite owns the comparison that bench/run runs: it starts each configuration (direct
// accept, SO_REUSEPORT, HAProxy, baton with Go workers, baton with Python workers and the
// Python server accepting directly) with its server side pinned to one CPU, runs the scenarios
// against it as child processes of baton-bench (which inherit this process's CPU, the other
// one), stops it, and goes on to the next, round after round (A B C D … A B C D …). Then it
// writes the medians, the ratios and the goals of issue 5 as results.md and results.json, and
// the plot as plot.svg.
package suite

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/load"
	"github.com/baton-gw/baton/cmd/baton-bench/internal/procstat"
)

// plan is how long and how hard each scenario runs.
type plan struct {
	Mode         string        `json:"mode"`
	Rounds       int           `json:"rounds"`
	Warmup       time.Duration `json:"warmup"`
	Storm        time.Duration `json:"storm"`
	StormConc    int           `json:"storm_conc"`
	Rate         float64       `json:"rate"`    // open-loop storm, Go configurations
	PyRate       float64       `json:"py_rate"` // open-loop storm, Python configurations
	Sessions     time.Duration `json:"sessions"`
	SessN        int           `json:"sessions_n"`
	Bulk         time.Duration `json:"bulk"`
	IdleCounts   []int         `json:"idle_counts"`
	IdleProcs    int           `json:"idle_procs"`
	IdleSrc      int           `json:"idle_sources"`
	IdleSettle   time.Duration `json:"idle_settle"`
	IdlePasses   int           `json:"idle_passes"`
	Reloads      int           `json:"reloads"`
	ReloadEvery  time.Duration `json:"reload_every"`
	ReloadLead   time.Duration `json:"reload_lead"`
	ReloadTail   time.Duration `json:"reload_tail"`
	ReloadsPy    int           `json:"reloads_py"` // Python workers take seconds to start: fewer reloads
	ReloadRate   float64       `json:"reload_rate"`
	ReloadPyRate float64       `json:"reload_py_rate"`
	ReloadSess   int           `json:"reload_sessions"`
	Scrapes      int           `json:"scrapes"` // /metrics scrapes measured (CPU is read in clock ticks: enough to fill many)
	// The scaling comparison: storm concurrency, the larger session count, requests per write
	// in its sessions, and the most batond workers (S1…S<ScaleMax>).
	ScaleConc    int `json:"scale_conc"`
	ScaleSessBig int `json:"scale_sessions_big"`
	ScaleDepth   int `json:"scale_depth"`
	ScaleMax     int `json:"scale_workers"`
	// Live session migration (configuration DM): idle sessions held during one reload, in
	// turn; how many of them keep probing, and how often; batond's drain deadline there (the
	// plain reload it is compared with waits for it).
	MigCounts   []int         `json:"migrate_counts"`
	MigSample   int           `json:"migrate_sample"`
	MigInterval time.Duration `json:"migrate_interval"`
	MigDrain    time.Duration `json:"migrate_drain_timeout"`
	// QuietBudget bounds the time the whole run may spend waiting for the machine to be quiet
	// before a measurement (and on repeating measurements made under outside load).
	QuietBudget time.Duration `json:"quiet_budget"`
}

func plans(mode string) (plan, error) {
	switch mode {
	case "full":
		return plan{Mode: mode, Rounds: 3, Warmup: 500 * time.Millisecond, Storm: 2500 * time.Millisecond, StormConc: 32,
			Rate: 4000, PyRate: 1000, Sessions: 2500 * time.Millisecond, SessN: 100, Bulk: 2 * time.Second,
			IdleCounts: []int{10000, 100000}, IdleProcs: 8, IdleSrc: 16, IdleSettle: time.Second, IdlePasses: 1,
			Reloads: 5, ReloadsPy: 3, ReloadEvery: 2 * time.Second, ReloadLead: time.Second, ReloadTail: time.Second,
			ReloadRate: 2000, ReloadPyRate: 500, ReloadSess: 50, Scrapes: 300, QuietBudget: 4 * time.Minute,
			ScaleConc: 64, ScaleSessBig: 1000, ScaleDepth: 32,
			MigCounts: []int{1000, 10000}, MigSample: 100, MigInterval: 20 * time.Millisecond, MigDrain: 10 * time.Second}, nil
	case "smoke":
		return plan{Mode: mode, Rounds: 1, Warmup: 100 * time.Millisecond, Storm: 300 * time.Millisecond, StormConc: 8,
			Rate: 1000, PyRate: 300, Sessions: 300 * time.Millisecond, SessN: 10, Bulk: 300 * time.Millisecond,
			IdleCounts: []int{200, 1000}, IdleProcs: 2, IdleSrc: 2, IdleSettle: 100 * time.Millisecond, IdlePasses: 2,
			Reloads: 1, ReloadsPy: 1, ReloadEvery: 500 * time.Millisecond, ReloadLead: 300 * time.Millisecond, ReloadTail: 300 * time.Millisecond,
			ReloadRate: 300, ReloadPyRate: 100, ReloadSess: 5, Scrapes: 10, QuietBudget: 5 * time.Second,
			ScaleConc: 8, ScaleSessBig: 20, ScaleDepth: 4,
			MigCounts: []int{40}, MigSample: 10, MigInterval: 20 * time.Millisecond, MigDrain: 2 * time.Second}, nil
	}
	return plan{}, fmt.Errorf("unknown mode %q (full, smoke)", mode)
}

// run is one measurement: a configuration's scenario in one round.
type run struct {
	Config   string       `json:"config"`
	Scenario string       `json:"scenario"`
	Round    int          `json:"round"`
	Result   *load.Result `json:"result,omitempty"`
	Error    string       `json:"error,omitempty"`
	Line     string       `json:"line,omitempty"`
	Seconds  float64      `json:"seconds"`
	Retried  bool         `json:"retried,omitempty"` // measured twice because of outside load
}

// Main runs the suite with args (without "suite").
func Main(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("suite", flag.ContinueOnError)
	fs.SetOutput(stderr)
	mode := fs.String("mode", "full", "full or smoke")
	bin := fs.String("bin", "", "`dir` with batond, batonctl, echo (examples/go/echo) and baton-bench (default: this program's directory)")
	repo := fs.String("repo", ".", "the repository `dir` (for examples/python/lobby.py)")
	out := fs.String("out", "bench/out", "output `dir`: results.md, results.json, plot.svg")
	rounds := fs.Int("rounds", 0, "rounds (0: the mode's)")
	only := fs.String("configs", "", "comma-separated configuration ids to run (default all: A,A2,B,C,D,DP,D8,E,F,S0,S1…)")
	onlySc := fs.String("scenarios", "", "comma-separated scenarios to run (default all: storm-sat, storm-open, sessions-1, sessions-100, bulk, idle, reload, scrape, migrate, scale-storm, scale-sessions-100, scale-sessions-1000; scaling: the last three)")
	scaleMax := fs.Int("scale-workers", 0, "scaling: batond with 1…`N` Python workers against one direct Python process (0: one per online CPU; 2 in the smoke run)")
	rev := fs.String("rev", "", "the baton revision measured (shown in the results)")
	from := fs.String("from", "", "measure nothing: read this results.json and write the table and plot again (to -out)")
	serverCPU := fs.Int("server-cpu", 0, "CPU the server side is pinned to (taskset); -1: no pinning")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *from != "" {
		return rerender(*from, *out, stdout)
	}
	pl, err := plans(*mode)
	if err != nil {
		return err
	}
	if *rounds > 0 {
		pl.Rounds = *rounds
	}
	if *bin == "" {
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		*bin = filepath.Dir(exe)
	}
	e := &env{bin: *bin, cpu: *serverCPU, migDrain: pl.MigDrain}
	if e.repo, err = filepath.Abs(*repo); err != nil {
		return err
	}
	for _, b := range []string{"batond", "batonctl", "echo", "baton-bench"} {
		if _, err := os.Stat(e.path(b)); err != nil {
			return fmt.Errorf("%s: %w (bench/run builds it)", e.path(b), err)
		}
	}
	var ncpu int
	if e.online, ncpu, err = onlineCPUs(); err != nil {
		return err
	}
	pl.ScaleMax = ncpu
	if pl.Mode == "smoke" {
		pl.ScaleMax = 2 // quick, and the same comparison on every machine
	}
	if *scaleMax > 0 {
		pl.ScaleMax = *scaleMax
	}
	e.haproxy, _ = exec.LookPath("haproxy")
	if e.python, err = exec.LookPath("python3"); err != nil {
		return errors.New("python3 not found")
	}
	cfgs := configs(pl.ScaleMax)
	if *only != "" {
		want := strings.Split(*only, ",")
		cfgs = slices.DeleteFunc(cfgs, func(c *config) bool { return !slices.Contains(want, c.ID) })
		if len(cfgs) == 0 {
			return fmt.Errorf("-configs %q selects nothing", *only)
		}
	}
	if *onlySc != "" {
		want := expandScenarios(strings.Split(*onlySc, ","))
		for _, c := range cfgs {
			c.Scenarios = slices.DeleteFunc(slices.Clone(c.Scenarios), func(sc string) bool { return !slices.Contains(want, sc) })
		}
		cfgs = slices.DeleteFunc(cfgs, func(c *config) bool { return len(c.Scenarios) == 0 })
		if len(cfgs) == 0 {
			return fmt.Errorf("-scenarios %q selects nothing", *onlySc)
		}
	}
	if e.haproxy == "" && slices.ContainsFunc(cfgs, func(c *config) bool { return c.ID == "C" }) {
		return errors.New("haproxy is not installed: apt-get install haproxy (bench/run does it)")
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return err
	}
	if e.work, err = os.MkdirTemp("", "baton-bench-"); err != nil {
		return err
	}
	defer os.RemoveAll(e.work)
	if err := becomeSubreaper(); err != nil {
		return fmt.Errorf("prctl(PR_SET_CHILD_SUBREAPER): %w", err)
	}
	// Interrupted: stop every server (they have process groups of their own, so the terminal's
	// SIGINT does not reach them), then exit.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	go func() {
		s, ok := <-sigs
		if !ok {
			return
		}
		fmt.Fprintf(stderr, "baton-bench suite: %v: stopping every server\n", s)
		killDescendants(3*time.Second, func() {})
		os.RemoveAll(e.work)
		os.Exit(130)
	}()

	m := machine(e)
	m.Revision = *rev
	pin := pinning(e)
	switch n := len(slices.DeleteFunc(slices.Clone(cfgs), func(c *config) bool { return !c.Scaling })); {
	case n == len(cfgs):
		pin = fmt.Sprintf("not pinned: the server side and the load generator may run on every online CPU (%s)", e.online)
	case n > 0:
		pin += fmt.Sprintf("; the scaling configurations (S…) are not pinned: server side and load generator on every online CPU (%s)", e.online)
	}
	m.Pinning, m.Online = pin, e.online
	fmt.Fprintf(stdout, "baton-bench suite (%s): %d rounds of %s\n%s\n", pl.Mode, pl.Rounds, ids(cfgs), pin)
	if m.LoadAvg != "" {
		fmt.Fprintf(stdout, "load average at start: %s\n", m.LoadAvg)
	}
	started := time.Now()
	var runs []run
	p := &procs{}
	defer p.stopAll(3 * time.Second)
	q := &quiet{budget: pl.QuietBudget}
	for round := 1; round <= pl.Rounds; round++ {
		for _, c := range cfgs {
			runs = append(runs, runConfig(e, p, pl, c, round, q, stdout)...)
		}
	}
	m.Seconds = time.Since(started).Seconds()
	m.QuietWait, m.Retries = q.waited.Seconds(), q.retries
	m.LoadAvgEnd = loadavg()
	rep := buildReport(m, pl, cfgs, runs)
	if err := rep.write(*out); err != nil {
		return err
	}
	fmt.Fprintln(stdout)
	fmt.Fprint(stdout, rep.Markdown(false))
	fmt.Fprintf(stdout, "\nwrote results.md, results.json, plot.svg (and scaling.svg when measured) to %s in %.0fs\n", *out, m.Seconds)
	if n := rep.failures(); n > 0 {
		return fmt.Errorf("%d measurements failed (see results.md)", n)
	}
	return nil
}

func ids(cfgs []*config) string {
	var s []string
	for _, c := range cfgs {
		s = append(s, c.ID)
	}
	return strings.Join(s, " ")
}

// rerender rebuilds results.md, results.json and plot.svg from an earlier results.json.
func rerender(from, out string, stdout io.Writer) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	var old report
	if err := json.Unmarshal(b, &old); err != nil {
		return fmt.Errorf("%s: %w", from, err)
	}
	var cfgs []*config
	for _, c := range old.Configs {
		cfgs = append(cfgs, &config{ID: c.ID, Name: c.Name, Desc: c.Desc, Scaling: c.Scaling, Workers: c.Workers})
	}
	rep := buildReport(old.Machine, old.Plan, cfgs, old.Runs)
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	if err := rep.write(out); err != nil {
		return err
	}
	fmt.Fprint(stdout, rep.Markdown(false))
	return nil
}

// runConfig starts c, runs its scenarios, and stops it.
func runConfig(e *env, p *procs, pl plan, c *config, round int, q *quiet, stdout io.Writer) []run {
	dir := filepath.Join(e.work, fmt.Sprintf("%s-%d", c.ID, round))
	var runs []run
	fail := func(sc string, err error) {
		runs = append(runs, run{Config: c.ID, Scenario: sc, Round: round, Error: err.Error()})
		fmt.Fprintf(stdout, "%-3s %-12s round %d: FAILED: %v\n", c.ID, sc, round, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fail("start", err)
		return runs
	}
	p.dir, p.cpus = dir, e.serverCPUs(c)
	t0 := time.Now()
	defer func() {
		p.stopAll(3 * time.Second)
		fmt.Fprintf(stdout, "%-3s %s round %d: %.1fs\n", c.ID, c.Name, round, time.Since(t0).Seconds())
	}()
	srv, err := c.start(e, p, dir)
	if err == nil {
		fmt.Fprintf(stdout, "%-3s %s round %d: serving on %s after %.1fs\n", c.ID, c.Name, round, srv.addr, time.Since(t0).Seconds())
	}
	if err != nil {
		for _, sc := range c.Scenarios {
			fail(sc, fmt.Errorf("start %s: %w", c.Name, err))
		}
		return runs
	}
	for _, sc := range c.Scenarios {
		ts := time.Now()
		r := measure(e, pl, c, srv, sc, dir, q, stdout)
		r.Round = round
		r.Seconds = time.Since(ts).Seconds()
		if r.Error != "" {
			fmt.Fprintf(stdout, "%-3s %-12s round %d: FAILED: %s\n", c.ID, sc, round, r.Error)
		} else {
			fmt.Fprintf(stdout, "%-3s %-12s round %d: %s\n", c.ID, sc, round, strings.TrimSpace(r.Line))
		}
		runs = append(runs, r)
	}
	return runs
}

// measure runs one scenario; before, it waits (within the run's budget) for the machine to be
// quiet, and a measurement during which something else used more than a quarter of a core is
// made once more, keeping the quieter of the two.
func measure(e *env, pl plan, c *config, srv *server, sc, dir string, q *quiet, stdout io.Writer) run {
	q.wait()
	r := runScenario(e, pl, c, srv, sc, dir)
	if r.Result == nil || r.Result.OthersBusy <= maxOthers || sc == scIdle || sc == scReload || sc == scMigrate || !q.left() {
		return r
	}
	fmt.Fprintf(stdout, "%-3s %-12s: others used %.0f%% of a core meanwhile; measuring again\n", c.ID, sc, 100*r.Result.OthersBusy)
	q.retries++
	q.wait()
	again := runScenario(e, pl, c, srv, sc, dir)
	if again.Result != nil && again.Result.OthersBusy < r.Result.OthersBusy {
		again.Retried = true
		return again
	}
	r.Retried = true
	return r
}

// maxOthers is the outside load (fraction of a core) above which a measurement is repeated.
const maxOthers = 0.25

// quiet waits for the machine to be quiet, within a budget for the whole run.
type quiet struct {
	budget  time.Duration
	waited  time.Duration
	retries int
}

func (q *quiet) left() bool { return q.waited < q.budget }

// wait returns once everything but this process tree used less than a tenth of a core over
// 300 ms, or when the budget is spent (at most 30 s per call).
func (q *quiet) wait() {
	start := time.Now()
	defer func() { q.waited += time.Since(start) }()
	for q.left() && time.Since(start) < 30*time.Second {
		self := procstat.Tree([]int{os.Getpid()})
		b0, s0, t0 := procstat.Busy(), procstat.CPU(self), time.Now()
		time.Sleep(300 * time.Millisecond)
		others := procstat.Busy() - b0 - (procstat.CPU(self) - s0)
		if others.Seconds()/time.Since(t0).Seconds() < 0.1 {
			return
		}
	}
}

// runScenario runs one scenario as a child process (it inherits this process's CPU) and reads
// its JSON result.
func runScenario(e *env, pl plan, c *config, srv *server, sc, dir string) run {
	r := run{Config: c.ID, Scenario: sc}
	jsonPath := filepath.Join(dir, sc+".json")
	py := srv.proto == "lobby"
	args := []string{"-addr", srv.addr, "-proto", srv.proto, "-label", c.ID, "-json", jsonPath}
	pids := func() []string {
		var s []string
		for _, p := range srv.roots {
			s = append(s, strconv.Itoa(p))
		}
		return []string{"-server-pids", strings.Join(s, ",")}
	}
	warm := []string{"-warmup", pl.Warmup.String()}
	if srv.proxy {
		switch sc {
		case scStormSat, scStormOpen, scSess1, scSess100:
			warm = append(warm, "-proxy-v2") // every connection begins with a header, as from a balancer
		case scScrape: // the metrics listener does not expect PROXY
		default:
			r.Error = sc + " does not send PROXY headers"
			return r
		}
	}
	bound := time.Minute
	switch sc {
	case scStormSat:
		args = slices.Concat([]string{"storm"}, args, pids(), warm, []string{"-duration", pl.Storm.String(), "-c", strconv.Itoa(pl.StormConc)})
	case scStormOpen:
		rate := pl.Rate
		if py {
			rate = pl.PyRate
		}
		args = slices.Concat([]string{"storm"}, args, pids(), warm, []string{"-duration", pl.Storm.String(), "-rate", fmt.Sprint(rate)})
	case scSess1, scSess100:
		n := 1
		if sc == scSess100 {
			n = pl.SessN
		}
		args = slices.Concat([]string{"sessions"}, args, pids(), warm, []string{"-duration", pl.Sessions.String(), "-n", strconv.Itoa(n)})
	case scBulk:
		args = slices.Concat([]string{"bulk"}, args, pids(), warm, []string{"-duration", pl.Bulk.String()})
	case scIdle:
		var counts []string
		for _, n := range pl.IdleCounts {
			counts = append(counts, strconv.Itoa(n))
		}
		var mid []string
		for _, p := range srv.middle {
			mid = append(mid, "-middle", strconv.Itoa(p))
		}
		args = slices.Concat([]string{"idle"}, args, pids(), mid, []string{"-counts", strings.Join(counts, ","),
			"-procs", strconv.Itoa(pl.IdleProcs), "-src", strconv.Itoa(pl.IdleSrc), "-timeout", "3s", "-settle", pl.IdleSettle.String(), "-passes", strconv.Itoa(pl.IdlePasses)})
		bound = time.Duration(pl.IdlePasses) * 5 * time.Minute
	case scScrape:
		if srv.metrics == "" {
			r.Error = "no metrics listener in this configuration"
			return r
		}
		// Only batond's CPU: it answers the scrape from the state it keeps, the workers idle.
		var mid []string
		for _, p := range srv.middle {
			mid = append(mid, strconv.Itoa(p))
		}
		args = slices.Concat([]string{"scrape"}, args, []string{"-server-pids", strings.Join(mid, ","), "-url", srv.metrics, "-n", strconv.Itoa(pl.Scrapes)})
	case scReload:
		if srv.reload == "" {
			r.Error = "no reload command for this configuration"
			return r
		}
		rate, reloads := pl.ReloadRate, pl.Reloads
		if py {
			rate, reloads = pl.ReloadPyRate, pl.ReloadsPy
		}
		args = slices.Concat([]string{"reload"}, args, []string{"-cmd", srv.reload, "-reloads", strconv.Itoa(reloads),
			"-every", pl.ReloadEvery.String(), "-lead", pl.ReloadLead.String(), "-tail", pl.ReloadTail.String(),
			"-rate", fmt.Sprint(rate), "-n", strconv.Itoa(pl.ReloadSess)})
		bound = time.Duration(pl.Reloads)*(pl.ReloadEvery+time.Minute) + time.Minute
	case scMigrate:
		if srv.admin == "" {
			r.Error = "not batond: no admin socket"
			return r
		}
		var counts []string
		for _, n := range pl.MigCounts {
			counts = append(counts, strconv.Itoa(n))
		}
		args = slices.Concat([]string{"migrate"}, args, []string{"-batonctl", e.path("batonctl"), "-admin", srv.admin,
			"-counts", strings.Join(counts, ","), "-sample", strconv.Itoa(pl.MigSample), "-interval", pl.MigInterval.String(),
			"-src", "4", "-plain", "-drain-wait", (pl.MigDrain + 30*time.Second).String(), "-cmd-timeout", "2m"})
		bound = time.Duration(len(pl.MigCounts)) * (8*time.Minute + pl.MigDrain)
	case scScaleStorm, scScaleSess100, scScaleSess1k:
		a := scaleArgs(pl, sc)
		args = slices.Concat(a[:1], args, pids(), warm, a[1:])
	default:
		r.Error = "unknown scenario " + sc
		return r
	}
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	argv := append([]string{e.path("baton-bench")}, args...)
	if c.Scaling {
		// Not pinned either: the load generator may run on every CPU, as the servers may.
		argv = append([]string{"taskset", "-c", e.online}, argv...)
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var outb, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &outb, &errb
	err := cmd.Run()
	r.Line = strings.TrimSpace(outb.String())
	if err != nil {
		r.Error = fmt.Sprintf("%v: %s %s", err, strings.TrimSpace(errb.String()), r.Line)
		return r
	}
	b, err := os.ReadFile(jsonPath)
	if err != nil {
		r.Error = err.Error()
		return r
	}
	r.Result = &load.Result{}
	if err := json.Unmarshal(b, r.Result); err != nil {
		r.Error = err.Error()
	}
	return r
}

// Machine describes where the suite ran.
type Machine struct {
	Date       string  `json:"date"`
	Revision   string  `json:"revision"`
	Kernel     string  `json:"kernel"`
	CPU        string  `json:"cpu"`
	CPUs       int     `json:"cpus"`
	MemGiB     float64 `json:"mem_gib"`
	Go         string  `json:"go"`
	HAProxy    string  `json:"haproxy"`
	Python     string  `json:"python"`
	NoFile     uint64  `json:"rlimit_nofile"`
	Pinning    string  `json:"pinning"`
	Online     string  `json:"online_cpus"` // where the scaling configurations run
	LoadAvg    string  `json:"loadavg_start"`
	LoadAvgEnd string  `json:"loadavg_end"`
	QuietWait  float64 `json:"quiet_wait_s"` // time spent waiting for the machine to calm down
	Retries    int     `json:"retries"`      // measurements repeated because of outside load
	Seconds    float64 `json:"seconds"`
}

func machine(e *env) Machine {
	m := Machine{Date: time.Now().UTC().Format("2006-01-02 15:04 UTC"), CPUs: runtime.NumCPU(), Go: runtime.Version(), LoadAvg: loadavg()}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		n := 0
		for line := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok && m.CPU == "" {
				m.CPU = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
			}
			if strings.HasPrefix(line, "processor") {
				n++
			}
		}
		m.CPUs = n
	}
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil {
		m.MemGiB = float64(si.Totalram) * float64(si.Unit) / (1 << 30)
	}
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) == nil {
		m.NoFile = rl.Max
	}
	if e.haproxy != "" {
		out, _ := exec.Command(e.haproxy, "-v").Output()
		m.HAProxy, _, _ = strings.Cut(strings.TrimPrefix(string(out), "HAProxy version "), " ")
	}
	out, _ := exec.Command(e.python, "--version").Output()
	m.Python = strings.TrimSpace(strings.TrimPrefix(string(out), "Python "))
	return m
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// pinning describes (and checks) the CPU split.
func pinning(e *env) string {
	var set unix.CPUSet
	self := "unknown"
	if unix.SchedGetaffinity(0, &set) == nil {
		var cpus []string
		for i := range 1024 {
			if set.IsSet(i) {
				cpus = append(cpus, strconv.Itoa(i))
			}
		}
		self = strings.Join(cpus, ",")
	}
	if e.cpu < 0 {
		return fmt.Sprintf("no pinning: server side and load generator share CPUs (load generator may run on %s)", self)
	}
	s := fmt.Sprintf("server side pinned to CPU %d (taskset -c %d; batond's workers and HAProxy's backends inherit it), load generator on CPU %s",
		e.cpu, e.cpu, self)
	if self == strconv.Itoa(e.cpu) || strings.Contains(","+self+",", ","+strconv.Itoa(e.cpu)+",") {
		s += " — WARNING: the load generator shares the server's CPU; run the suite under taskset -c <other cpu>"
	}
	return s
}
