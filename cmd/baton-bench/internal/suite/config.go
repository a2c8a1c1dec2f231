package suite

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// env is what the configurations are built from.
type env struct {
	bin     string // directory holding batond, batonctl, echo, baton-bench
	repo    string // the repository (examples/python/lobby.py)
	python  string
	haproxy string
	work    string // scratch directory of this run
	cpu     int    // server CPU, -1 for no pinning
	// online is every CPU of the machine as a taskset list ("0-1"): where the scaling
	// configurations and their load generator run (the suite itself is pinned by bench/run).
	online string
	// migDrain is batond's -drain-timeout in the migration configuration (DM).
	migDrain time.Duration
}

// serverCPUs is the taskset list for c's server side: every CPU for a scaling configuration,
// the server CPU for the others ("" when not pinned).
func (e *env) serverCPUs(c *config) string {
	switch {
	case c.Scaling:
		return e.online
	case e.cpu < 0:
		return ""
	}
	return strconv.Itoa(e.cpu)
}

func (e *env) path(name string) string { return filepath.Join(e.bin, name) }

// server is a running configuration.
type server struct {
	addr   string
	proto  string
	roots  []int  // roots of the server-side process trees (CPU and memory are summed over them)
	middle []int  // the middle box, if any (batond, haproxy)
	reload string // the reload command, "" if the configuration has none
	// proxy: every connection must begin with a PROXY v2 header (as from a balancer).
	proxy bool
	// metrics is the Prometheus /metrics URL, "" if the configuration serves none.
	metrics string
	// admin is batond's admin socket ("" if the configuration is not batond).
	admin string
}

// config is one configuration of the comparison.
type config struct {
	ID    string // A, A2, B, C, D, DP, D8, E, F
	Name  string // short column title
	Desc  string // what runs
	Proto string // echo or lobby
	// Scenarios this configuration runs, in order.
	Scenarios []string
	// Scaling: the server side and its load generator are not pinned (they may use every CPU),
	// and the configuration is reported in the scaling table, not the main one.
	Scaling bool
	Workers int // scaling: batond's workers (0: the process accepting directly)
	start   func(e *env, p *procs, dir string) (*server, error)
}

// Scenario keys.
const (
	scStormSat  = "storm-sat"
	scStormOpen = "storm-open"
	scSess1     = "sessions-1"
	scSess100   = "sessions-100"
	scBulk      = "bulk"
	scIdle      = "idle"
	scReload    = "reload"
	scScrape    = "scrape"
	scMigrate   = "migrate"
)

var goScenarios = []string{scStormSat, scStormOpen, scSess1, scSess100, scBulk, scIdle}

// configs returns every configuration, in the order they run in a round: the pinned ones, then
// the scaling ones (one Python process accepting directly, batond with 1…scaleMax Python
// workers).
func configs(scaleMax int) []*config {
	return append([]*config{
		{ID: "A", Name: "direct", Proto: "echo", Scenarios: goScenarios, start: startDirect,
			Desc: "examples/go/echo accepting directly (BATON_FALLBACK_LISTEN), one process"},
		{ID: "A2", Name: "direct r/w", Proto: "echo", Scenarios: []string{scStormSat, scSess1, scSess100, scBulk}, start: startDirectRW,
			Desc: "`baton-bench echo -rw`, one process accepting directly, copying with read/write: the data path examples/go/echo takes under batond (accepting directly, its io.Copy splices through a pipe)"},
		{ID: "B", Name: "reuseport×2", Proto: "echo", Scenarios: append(goScenarios[:len(goScenarios):len(goScenarios)], scReload), start: startReuseport,
			Desc: "two `baton-bench echo -reuseport` processes sharing the port (SO_REUSEPORT); reload = restart each in turn"},
		{ID: "C", Name: "haproxy", Proto: "echo", Scenarios: append(goScenarios[:len(goScenarios):len(goScenarios)], scReload), start: startHAProxy,
			Desc: "HAProxy (Debian package) `mode tcp`, `balance leastconn`, 1 thread, in front of two direct echo workers; reload = a new `haproxy -x <stats socket> -sf <old pid>` (seamless: listener handed over)"},
		{ID: "D", Name: "baton", Proto: "echo", Scenarios: append(goScenarios[:len(goScenarios):len(goScenarios)], scReload), start: batonStarter(batonOpts{workers: 2}),
			Desc: "batond with 2 examples/go/echo workers (-capacity 19000); reload = `batonctl reload`"},
		{ID: "DP", Name: "baton+PROXY", Proto: "echo", Scenarios: []string{scStormSat, scStormOpen, scSess1, scScrape}, start: batonStarter(batonOpts{workers: 2, proxy: true, metrics: true}),
			Desc: "D with `-proxy-protocol -proxy-from 127.0.0.1` (every connection begins with a PROXY v2 header from a made-up client in 203.0.113.0/24, sent in the same write as the request, as a balancer does) and `-metrics` (scraped only in the scrape scenario, after the others)"},
		{ID: "D8", Name: "baton 8w", Proto: "echo", Scenarios: []string{scIdle}, start: batonStarter(batonOpts{workers: 8}),
			Desc: "batond with 8 examples/go/echo workers (idle only: 100,000 sessions need ≥ 6 workers under the 20,000-fd cap)"},
		{ID: "DM", Name: "baton migrate", Proto: "echo", Scenarios: []string{scMigrate}, start: batonStarter(batonOpts{workers: 2, migrate: true}),
			Desc: "batond with 2 `examples/go/echo -migrate` workers (they hand their sessions back when asked), `-drain-timeout` short (the plain reload it is compared with waits for it), started under `baton-bench reaper` (a subreaper that reaps the old generation's workers as they exit, as systemd does); idle sessions, then `batonctl reload -migrate`, then the same with a plain `batonctl reload`"},
		{ID: "E", Name: "baton-py", Proto: "lobby", Scenarios: []string{scStormSat, scStormOpen, scSess1, scSess100, scReload}, start: batonStarter(batonOpts{workers: 2, python: true}),
			Desc: "batond with 2 examples/python/lobby.py workers; reload = `batonctl reload`"},
		{ID: "F", Name: "py direct", Proto: "lobby", Scenarios: []string{scStormSat, scStormOpen, scSess1, scSess100}, start: startPyDirect,
			Desc: "examples/python/lobby.py --direct (plain asyncio.start_server), one process (E′ of the issue)"},
	}, scalingConfigs(scaleMax)...)
}

func startDirect(e *env, p *procs, dir string) (*server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	cmd, err := p.start("echo", []string{"BATON_FALLBACK_LISTEN=" + addr}, e.path("echo"))
	if err != nil {
		return nil, err
	}
	if err := waitServing(addr, "echo", 10*time.Second, alive(p, cmd, "echo")); err != nil {
		return nil, err
	}
	return &server{addr: addr, proto: "echo", roots: []int{cmd.Process.Pid}}, nil
}

func startDirectRW(e *env, p *procs, dir string) (*server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	cmd, err := p.start("echo", nil, e.path("baton-bench"), "echo", "-listen", addr, "-rw")
	if err != nil {
		return nil, err
	}
	if err := waitServing(addr, "echo", 10*time.Second, alive(p, cmd, "echo")); err != nil {
		return nil, err
	}
	return &server{addr: addr, proto: "echo", roots: []int{cmd.Process.Pid}}, nil
}

func alive(p *procs, cmd *exec.Cmd, name string) func() error {
	return func() error {
		if p.exited(cmd) {
			return fmt.Errorf("%s exited: %s", name, p.log(name))
		}
		return nil
	}
}

func startReuseport(e *env, p *procs, dir string) (*server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	var roots []int
	for i := range 2 {
		name := fmt.Sprintf("echo%d", i)
		cmd, err := p.start(name, nil, e.path("baton-bench"), "echo", "-listen", addr, "-reuseport",
			"-pidfile", filepath.Join(dir, name+".pid"))
		if err != nil {
			return nil, err
		}
		if err := waitFile(filepath.Join(dir, name+".pid"), 10*time.Second, alive(p, cmd, name)); err != nil {
			return nil, err
		}
		roots = append(roots, cmd.Process.Pid)
	}
	if err := waitServing(addr, "echo", 10*time.Second, func() error { return nil }); err != nil {
		return nil, err
	}
	reload := fmt.Sprintf("%s reuseport-restart -dir %s -listen %s -cpu %d", shq(e.path("baton-bench")), shq(dir), addr, e.cpu)
	return &server{addr: addr, proto: "echo", roots: roots, reload: reload}, nil
}

func waitFile(path string, d time.Duration, alive func() error) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if err := alive(); err != nil {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("%s not written after %v", path, d)
}

const haproxyConfig = `# written by baton-bench suite
global
    nbthread 1
    stats socket %[1]s/haproxy.sock mode 600 level admin expose-fd listeners
    # no maxconn: HAProxy derives it from RLIMIT_NOFILE (20,000 here), two fds per session

defaults
    mode tcp
    balance leastconn
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend bench
    bind %[2]s
    default_backend echo

backend echo
    server echo0 %[3]s
    server echo1 %[4]s
`

func startHAProxy(e *env, p *procs, dir string) (*server, error) {
	if e.haproxy == "" {
		return nil, fmt.Errorf("haproxy is not installed (apt-get install haproxy)")
	}
	var backends []string
	var roots []int
	for i := range 2 {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		addr := "127.0.0.1:" + strconv.Itoa(port)
		name := fmt.Sprintf("echo%d", i)
		cmd, err := p.start(name, []string{"BATON_FALLBACK_LISTEN=" + addr}, e.path("echo"))
		if err != nil {
			return nil, err
		}
		if err := waitServing(addr, "echo", 10*time.Second, alive(p, cmd, name)); err != nil {
			return nil, err
		}
		backends = append(backends, addr)
		roots = append(roots, cmd.Process.Pid)
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, fmt.Appendf(nil, haproxyConfig, dir, addr, backends[0], backends[1]), 0o644); err != nil {
		return nil, err
	}
	// In the foreground (-db): -D would setsid, and a new session is a new scheduler autogroup
	// (see RestartHAProxy).
	cmd, err := p.start("haproxy", nil, e.haproxy, "-f", cfgPath, "-db")
	if err != nil {
		return nil, err
	}
	pidfile := filepath.Join(dir, "haproxy.pid")
	if err := os.WriteFile(pidfile, fmt.Appendf(nil, "%d\n", cmd.Process.Pid), 0o644); err != nil {
		return nil, err
	}
	if err := waitServing(addr, "echo", 10*time.Second, alive(p, cmd, "haproxy")); err != nil {
		return nil, err
	}
	reload := fmt.Sprintf("%s haproxy-reload -haproxy %s -f %s -pidfile %s -x %s -listen %s -log %s -cpu %d",
		shq(e.path("baton-bench")), shq(e.haproxy), shq(cfgPath), shq(pidfile), shq(filepath.Join(dir, "haproxy.sock")), addr,
		shq(filepath.Join(dir, "haproxy.log")), e.cpu)
	return &server{addr: addr, proto: "echo", roots: append([]int{cmd.Process.Pid}, roots...), middle: []int{cmd.Process.Pid}, reload: reload}, nil
}

// batonOpts is what differs between the batond configurations.
type batonOpts struct {
	workers int
	python  bool // examples/python/lobby.py workers instead of examples/go/echo
	proxy   bool // -proxy-protocol, headers accepted from 127.0.0.1 (where the load comes from)
	metrics bool // -metrics on a free port
	// migrate: the echo workers take part in session migration (-migrate), batond drains in
	// e.migDrain, and runs under `baton-bench reaper` (see Reaper).
	migrate bool
}

func batonStarter(o batonOpts) func(e *env, p *procs, dir string) (*server, error) {
	workers, python := o.workers, o.python
	return func(e *env, p *procs, dir string) (*server, error) {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		addr := "127.0.0.1:" + strconv.Itoa(port)
		admin := filepath.Join(dir, "admin.sock")
		pidfile := filepath.Join(dir, "batond.pid")
		drain := 2 * time.Minute
		var args []string
		if o.migrate {
			drain = e.migDrain
			args = []string{e.path("baton-bench"), "reaper", "--"}
		}
		args = append(args, e.path("batond"), "-listen", addr, "-workers", strconv.Itoa(workers),
			"-capacity", "19000", "-socket", filepath.Join(dir, "workers.sock"), "-admin", admin,
			"-pidfile", pidfile, "-log-level", "warn", "-stop-timeout", "3s", "-drain-timeout", drain.String())
		if o.proxy {
			args = append(args, "-proxy-protocol", "-proxy-from", "127.0.0.1")
		}
		metricsURL := ""
		if o.metrics {
			mport, err := freePort()
			if err != nil {
				return nil, err
			}
			args = append(args, "-metrics", "127.0.0.1:"+strconv.Itoa(mport))
			metricsURL = "http://127.0.0.1:" + strconv.Itoa(mport) + "/metrics"
		}
		args = append(args, "--")
		proto := "echo"
		if python {
			proto = "lobby"
			args = append(args, e.python, filepath.Join(e.repo, "examples/python/lobby.py"), "--log-level", "warning")
		} else {
			args = append(args, e.path("echo"))
			if o.migrate {
				args = append(args, "-migrate")
			}
		}
		cmd, err := p.start("batond", nil, args...)
		if err != nil {
			return nil, err
		}
		if err := waitReady(e, admin, workers, 30*time.Second, alive(p, cmd, "batond")); err != nil {
			return nil, err
		}
		pid, err := readPID(pidfile)
		if err != nil {
			return nil, err
		}
		if err := waitServingAs(addr, proto, o.proxy, 10*time.Second, alive(p, cmd, "batond")); err != nil {
			return nil, err
		}
		reload := fmt.Sprintf("%s -admin %s reload -timeout 60s", shq(e.path("batonctl")), shq(admin))
		return &server{addr: addr, proto: proto, roots: []int{pid}, middle: []int{pid}, reload: reload, proxy: o.proxy, metrics: metricsURL, admin: admin}, nil
	}
}

// waitReady polls `batonctl status -json` until n workers are ready.
func waitReady(e *env, admin string, n int, d time.Duration, alive func() error) error {
	deadline := time.Now().Add(d)
	var last string
	for time.Now().Before(deadline) {
		if err := alive(); err != nil {
			return err
		}
		out, err := exec.Command(e.path("batonctl"), "-admin", admin, "status", "-json").Output()
		if err == nil {
			var st struct {
				Workers []struct {
					State string `json:"state"`
				} `json:"workers"`
			}
			if json.Unmarshal(out, &st) == nil {
				ready := 0
				for _, w := range st.Workers {
					if w.State == "ready" {
						ready++
					}
				}
				if ready >= n {
					return nil
				}
				last = fmt.Sprintf("%d of %d workers ready", ready, n)
			}
		} else {
			last = err.Error()
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("batond not ready after %v: %s", d, last)
}

func startPyDirect(e *env, p *procs, dir string) (*server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	cmd, err := p.start("lobby", nil, e.python, filepath.Join(e.repo, "examples/python/lobby.py"), "--direct", addr, "--log-level", "warning")
	if err != nil {
		return nil, err
	}
	if err := waitServing(addr, "lobby", 20*time.Second, alive(p, cmd, "lobby")); err != nil {
		return nil, err
	}
	return &server{addr: addr, proto: "lobby", roots: []int{cmd.Process.Pid}}, nil
}

// shq quotes s for sh.
func shq(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-:=") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func shqAll(v []string) []string {
	out := make([]string, len(v))
	for i, s := range v {
		out[i] = shq(s)
	}
	return out
}
