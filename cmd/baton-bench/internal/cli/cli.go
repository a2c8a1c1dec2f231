// Package cli owns baton-bench's command line: one subcommand per scenario (each prints one
// result line, and with -json FILE writes the result as JSON), the echo server, the helpers the
// suite uses (idle-child, reuseport-restart), and the suite itself.
package cli

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/echo"
	"github.com/baton-gw/baton/cmd/baton-bench/internal/load"
	"github.com/baton-gw/baton/cmd/baton-bench/internal/suite"
)

const usage = `usage: baton-bench COMMAND [flags]

scenarios (each prints one result line; -runs N prints the medians of N runs):
  storm      connect, send one small request, read the reply, close (RST); closed loop at -c
             connections in flight, or open loop at -rate connections/s
  sessions   -n long-lived connections doing 64-byte request/reply ping-pong (-depth D: D
             requests in one write, then their D replies; every reply byte is checked)
  bulk       one connection streaming through an echo server; MB/s
  idle       hold -counts connections (spread over -procs processes and -src source
             addresses); RSS and fds of the -middle process per held connection
  reload     an open-loop storm and paced sessions while -cmd runs -reloads times;
             failed connects and broken sessions per reload
  migrate    batond only (workers started with -migrate): for each of -counts, hold that many
             idle sessions (-sample of them probing every -interval), run "batonctl reload
             -migrate", then check a round trip on every session; with -plain, the same
             with a plain reload, waiting for the old generation to go (its drain deadline)
  scrape     -n GETs of -url (a Prometheus /metrics) one after the other; the server's CPU
             and the time to the last byte per scrape

servers and helpers:
  echo               the Go echo server (-reuseport: share a port between processes; -rw: copy
                     with read/write instead of io.Copy's splice)
  reuseport-restart  restart every echo process listed in -dir, one at a time
  haproxy-reload     HAProxy's seamless reload (-x, -sf) that waits for the handover
  reaper             run a command as a child subreaper that reaps every orphan (what systemd
                     does for a real batond's old workers after a reload)
  suite              start the configurations of bench/run, run the scenarios interleaved,
                     write results.md, results.json and plot.svg (bench/run calls this)

Only 127.0.0.0/8 targets are accepted. Common flags: -addr, -proto echo|lobby, -server-pids
(roots of the server-side process trees whose CPU is measured), -label, -json FILE.
`

// Main runs baton-bench with args (without the program name) and returns the exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "-help" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "storm", "sessions", "bulk", "idle", "reload", "scrape", "migrate":
		err = scenario(cmd, rest, stdout, stderr)
	case "idle-child":
		err = load.IdleChild(rest, os.Stdin, stdout)
	case "echo":
		return echo.Main(rest, stderr)
	case "reuseport-restart":
		err = suite.RestartReuseport(rest, stderr)
	case "haproxy-reload":
		err = suite.RestartHAProxy(rest, stderr)
	case "reaper":
		err = suite.Reaper(rest, stderr)
	case "suite":
		err = suite.Main(rest, stdout, stderr)
	default:
		fmt.Fprintf(stderr, "baton-bench: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		if errors.Is(err, errUsage) {
			return 2
		}
		fmt.Fprintln(stderr, "baton-bench "+cmd+":", err)
		return 1
	}
	return 0
}

var errUsage = errors.New("usage")

type common struct {
	addr, proto, label, jsonOut string
	pids                        pidList
	runs                        int
	warmup, duration, timeout   time.Duration
}

type pidList []int

func (p *pidList) String() string {
	s := make([]string, len(*p))
	for i, v := range *p {
		s[i] = strconv.Itoa(v)
	}
	return strings.Join(s, ",")
}

func (p *pidList) Set(v string) error {
	for f := range strings.SplitSeq(v, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 {
			return fmt.Errorf("not a pid: %q", f)
		}
		*p = append(*p, n)
	}
	return nil
}

func scenario(name string, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var c common
	fs.StringVar(&c.addr, "addr", "127.0.0.1:7000", "server `address` (127.0.0.0/8 only)")
	fs.StringVar(&c.proto, "proto", "echo", "protocol: echo, or lobby (examples/python/lobby.py)")
	fs.StringVar(&c.label, "label", "", "label printed with the result (the configuration's name)")
	fs.StringVar(&c.jsonOut, "json", "", "also write the result as JSON to this `file`")
	fs.Var(&c.pids, "server-pids", "comma-separated `pids` whose process trees are the server side (CPU, memory)")
	fs.IntVar(&c.runs, "runs", 1, "measure this many times and print the medians")
	fs.DurationVar(&c.warmup, "warmup", 500*time.Millisecond, "unmeasured run before each window")
	fs.DurationVar(&c.duration, "duration", 3*time.Second, "measured window")
	fs.DurationVar(&c.timeout, "timeout", 5*time.Second, "per connection or request")

	var (
		conns, sessN, chunk, maxIn, procs, nsrc, conc, reloads, passes, depth int
		scrapes, warm                                                         int
		rate                                                                  float64
		interval, every, lead, tail, openTimeout, settle                      time.Duration
		counts, reloadCmd, scrapeURL, want                                    string
		middle                                                                pidList
		verify, proxyV2                                                       bool
		batonctl, adminSock                                                   string
		sample                                                                int
		plain                                                                 bool
		drainWait, cmdTimeout                                                 time.Duration
	)
	switch name {
	case "storm":
		fs.IntVar(&conns, "c", 32, "closed loop: connections in flight")
		fs.Float64Var(&rate, "rate", 0, "open loop: connections per second (0: closed loop)")
		fs.IntVar(&maxIn, "max-inflight", 4096, "open loop: most connections in flight")
		fs.BoolVar(&proxyV2, "proxy-v2", false, "send a PROXY v2 header (made-up client 203.0.113.x, the real destination) in the same write as each request")
	case "sessions":
		fs.IntVar(&sessN, "n", 100, "sessions")
		fs.DurationVar(&interval, "interval", 0, "one request per session every this long (0: ping-pong at full speed)")
		fs.IntVar(&depth, "depth", 1, "requests each session has out at once, sent in one write (pipelining; 1: strict ping-pong)")
		fs.BoolVar(&proxyV2, "proxy-v2", false, "send a PROXY v2 header (made-up client 203.0.113.x, the real destination) before each session's first bytes")
	case "bulk":
		fs.IntVar(&chunk, "chunk", 64<<10, "bytes per write")
	case "idle":
		fs.StringVar(&counts, "counts", "10000,100000", "connection counts to reach, in order")
		fs.IntVar(&procs, "procs", 8, "load-generator processes holding the client sockets")
		fs.IntVar(&nsrc, "src", 16, "source addresses 127.0.0.2, 127.0.0.3, … to spread the sockets over")
		fs.IntVar(&conc, "conc", 128, "connections being opened at once, per process")
		fs.Var(&middle, "middle", "`pid` of the middle box (batond, haproxy) whose RSS and fds are reported")
		fs.BoolVar(&verify, "verify", true, "send one probe per connection and wait for its answer (a held connection is one the server serves)")
		fs.DurationVar(&openTimeout, "open-timeout", 120*time.Second, "give up on a count after this long")
		fs.DurationVar(&settle, "settle", time.Second, "wait this long after a count is reached before reading memory")
		fs.IntVar(&passes, "passes", 1, "fill the counts this many times (closing everything in between; later passes show the cost without one-time growth)")
	case "scrape":
		fs.StringVar(&scrapeURL, "url", "", "the `URL` to scrape (http://127.x.y.z:port/metrics)")
		fs.IntVar(&scrapes, "n", 50, "scrapes measured")
		fs.IntVar(&warm, "warm", 3, "scrapes before the measured ones")
		fs.StringVar(&want, "want", "baton_", "every body must contain this")
	case "migrate":
		fs.StringVar(&counts, "counts", "1000,10000", "idle sessions held during one reload, in turn")
		fs.StringVar(&batonctl, "batonctl", "batonctl", "the batonctl `binary`")
		fs.StringVar(&adminSock, "admin", "", "batond's admin socket `path`")
		fs.IntVar(&sample, "sample", 100, "sessions that keep probing through the reload (the pause is measured on them)")
		fs.DurationVar(&interval, "interval", 20*time.Millisecond, "a sampled session's next probe goes this long after its last answer")
		fs.DurationVar(&lead, "lead", 500*time.Millisecond, "probing before the reload (the normal answer gap)")
		fs.DurationVar(&tail, "tail", 300*time.Millisecond, "probing after the reload command returned")
		fs.IntVar(&nsrc, "src", 4, "source addresses 127.0.0.2, 127.0.0.3, … to spread the sessions over")
		fs.BoolVar(&plain, "plain", true, "also measure the same reload without -migrate (it waits for the old generation's drain deadline)")
		fs.DurationVar(&drainWait, "drain-wait", 6*time.Minute, "plain reload: give up waiting for the old generation to exit after this long (batond's -drain-timeout and a margin)")
		fs.DurationVar(&cmdTimeout, "cmd-timeout", 2*time.Minute, "bound on one batonctl reload")
	case "reload":
		fs.StringVar(&reloadCmd, "cmd", "", "reload `command` (run with sh -c)")
		fs.IntVar(&reloads, "reloads", 5, "reloads to run")
		fs.DurationVar(&every, "every", 2*time.Second, "start a reload this often")
		fs.DurationVar(&lead, "lead", time.Second, "traffic before the first reload")
		fs.DurationVar(&tail, "tail", time.Second, "traffic after the last reload")
		fs.Float64Var(&rate, "rate", 2000, "storm connections per second (open loop)")
		fs.IntVar(&sessN, "n", 50, "sessions")
		fs.DurationVar(&interval, "interval", 20*time.Millisecond, "one request per session every this long")
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected arguments %q\n", name, fs.Args())
		return errUsage
	}
	proto, err := load.ProtoByName(c.proto)
	if err != nil {
		return err
	}
	var results []*load.Result
	for i := 0; i < max(c.runs, 1); i++ {
		var r *load.Result
		switch name {
		case "storm":
			r, err = load.Storm(load.StormConfig{Addr: c.addr, Proto: proto, Open: rate > 0, Conns: conns, Rate: rate,
				MaxInflight: maxIn, Warmup: c.warmup, Duration: c.duration, Timeout: c.timeout, ServerPIDs: c.pids, Label: c.label, ProxyV2: proxyV2})
		case "sessions":
			r, err = load.Sessions(load.SessionsConfig{Addr: c.addr, Proto: proto, Sessions: sessN, Interval: interval, Depth: depth,
				Warmup: c.warmup, Duration: c.duration, Timeout: c.timeout, ServerPIDs: c.pids, Label: c.label, ProxyV2: proxyV2})
		case "bulk":
			r, err = load.Bulk(load.BulkConfig{Addr: c.addr, Warmup: c.warmup, Duration: c.duration, Chunk: chunk, ServerPIDs: c.pids, Label: c.label})
		case "idle":
			var levels []int
			for f := range strings.SplitSeq(counts, ",") {
				n, perr := strconv.Atoi(strings.TrimSpace(f))
				if perr != nil || n <= 0 {
					return fmt.Errorf("-counts: not a count: %q", f)
				}
				levels = append(levels, n)
			}
			r, err = load.Idle(load.IdleConfig{Addr: c.addr, Proto: proto, Counts: levels, Procs: procs, Sources: nsrc,
				Conc: conc, Verify: verify, Timeout: c.timeout, OpenTimeout: openTimeout, Settle: settle,
				Middle: middle, ServerPIDs: c.pids, Passes: passes, Label: c.label})
		case "scrape":
			r, err = load.Scrape(load.ScrapeConfig{URL: scrapeURL, Warmup: warm, Scrapes: scrapes, Want: want,
				Timeout: c.timeout, ServerPIDs: c.pids, Label: c.label})
		case "migrate":
			var levels []int
			for f := range strings.SplitSeq(counts, ",") {
				n, perr := strconv.Atoi(strings.TrimSpace(f))
				if perr != nil || n <= 0 {
					return fmt.Errorf("-counts: not a count: %q", f)
				}
				levels = append(levels, n)
			}
			r, err = load.Migrate(load.MigrateConfig{Addr: c.addr, Batonctl: batonctl, Admin: adminSock, Counts: levels,
				Sample: sample, Interval: interval, Lead: lead, Tail: tail, Sources: nsrc, Plain: plain, DrainWait: drainWait,
				Timeout: c.timeout, CommandTimeout: cmdTimeout, Label: c.label})
		case "reload":
			r, err = load.Reload(load.ReloadConfig{Addr: c.addr, Proto: proto, Command: reloadCmd, Reloads: reloads,
				Every: every, Lead: lead, Tail: tail, Rate: rate, Sessions: sessN, Interval: interval,
				Timeout: c.timeout, Label: c.label})
		}
		if err != nil {
			if r != nil {
				fmt.Fprintln(stdout, r)
			}
			return err
		}
		results = append(results, r)
	}
	r := load.Median(results)
	fmt.Fprintln(stdout, r)
	if c.jsonOut != "" {
		b, err := json.Marshal(r)
		if err != nil {
			return err
		}
		if err := os.WriteFile(c.jsonOut, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	return nil
}
