package load

import (
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/stats"
)

// Result is the outcome of one scenario run (or the medians of several: see Median). Latencies
// are in microseconds, CPU times in seconds. Its JSON form is what the suite reads.
type Result struct {
	Scenario string  `json:"scenario"`           // storm, sessions, bulk, idle, reload
	Mode     string  `json:"mode,omitempty"`     // storm: closed or open
	Label    string  `json:"label,omitempty"`    // free text from -label (the configuration)
	Proto    string  `json:"proto,omitempty"`    // echo or lobby
	Runs     int     `json:"runs"`               // measurement runs this result summarises
	Conns    int     `json:"conns,omitempty"`    // storm: concurrency (closed); sessions: sessions
	Target   float64 `json:"target,omitempty"`   // storm open-loop: connections/s asked for
	ProxyV2  bool    `json:"proxy_v2,omitempty"` // every connection began with a PROXY v2 header
	Depth    int     `json:"depth,omitempty"`    // sessions: requests out at once per session (one write)

	Window float64 `json:"window_s"` // length of the measured window
	Ops    int64   `json:"ops"`      // completed in the window: connections, messages
	PerSec float64 `json:"per_s"`    // Ops / Window
	P50    float64 `json:"p50_us,omitempty"`
	P99    float64 `json:"p99_us,omitempty"`
	P999   float64 `json:"p999_us,omitempty"`
	Max    float64 `json:"max_us,omitempty"`
	// CDF holds the latency quantiles at stats.CDFPoints.
	CDF []float64 `json:"cdf_us,omitempty"`

	Errors     int64            `json:"errors"`
	ErrorKinds map[string]int64 `json:"error_kinds,omitempty"`
	Skipped    int64            `json:"skipped,omitempty"` // open loop: starts not made (in-flight cap)

	ServerCPU    float64 `json:"server_cpu_s,omitempty"` // server side's CPU in the window
	ServerCPUPer float64 `json:"server_cpu_us_per_op,omitempty"`
	ServerBusy   float64 `json:"server_busy,omitempty"` // server CPU ÷ wall time (1 = one core)
	ClientBusy   float64 `json:"client_busy,omitempty"` // this process's CPU ÷ wall time
	// OthersBusy is the CPU used by everything else on the machine (other processes,
	// interrupts not charged to a process) ÷ wall time: a measure of the noise.
	OthersBusy  float64 `json:"others_busy"`
	ServerProcs int     `json:"server_procs,omitempty"`
	MBps        float64 `json:"mb_per_s,omitempty"` // bulk: bytes echoed back per second ÷ 1e6
	Bytes       int     `json:"bytes,omitempty"`    // scrape: size of the last body

	Idle    []IdleLevel    `json:"idle,omitempty"`
	Reload  *ReloadResult  `json:"reload,omitempty"`
	Migrate *MigrateResult `json:"migrate,omitempty"`
}

// IdleLevel is one step of the idle scenario.
type IdleLevel struct {
	Pass   int `json:"pass"`   // 1: the first fill after the server started; 2…: refills
	Target int `json:"target"` // connections asked for
	Held   int `json:"held"`   // connections open and answered by the server
	Failed int `json:"failed"` // attempts that failed on the way (after which the step stops)
	// Reached is Held ≥ Target.
	Reached bool `json:"reached"`
	// Middle box (batond or HAProxy): growth over the baseline with no connection, per held
	// connection. NaN-free: zero when there is no middle box.
	MiddleRSSPerConn float64 `json:"middle_rss_b_per_conn"`
	MiddleFDPerConn  float64 `json:"middle_fd_per_conn"`
	MiddleRSS        int64   `json:"middle_rss_b"`
	MiddleFDs        int     `json:"middle_fds"`
	// All server-side processes (middle box and workers), per held connection.
	ServerRSSPerConn float64 `json:"server_rss_b_per_conn"`
	ServerFDPerConn  float64 `json:"server_fd_per_conn"`
	// Seconds it took to open this step's connections.
	OpenSeconds float64          `json:"open_s"`
	ErrorKinds  map[string]int64 `json:"error_kinds,omitempty"`
	// Stop says why the step ended short of Target, if it did.
	Stop string `json:"stop,omitempty"`
}

// ReloadResult is the reload scenario's count of what went wrong.
type ReloadResult struct {
	Command        string    `json:"command"`
	Reloads        int       `json:"reloads"`
	ReloadErrors   int       `json:"reload_errors"` // commands that exited non-zero
	ReloadSeconds  []float64 `json:"reload_s"`      // how long each command took
	ReloadOutput   string    `json:"reload_output,omitempty"`
	Connects       int64     `json:"connects"`        // storm connections attempted
	FailedConnects int64     `json:"failed_connects"` // storm connections that got no reply
	Sessions       int       `json:"sessions"`
	BrokenSessions int       `json:"broken_sessions"` // sessions that failed while running
	Messages       int64     `json:"messages"`        // session replies received
	FailedPer      float64   `json:"failed_per_reload"`
	BrokenPer      float64   `json:"broken_per_reload"`
	SessionP99     float64   `json:"session_p99_us"`
	SessionMax     float64   `json:"session_max_us"`
}

func (r *Result) setLatency(s *stats.Samples) {
	if s.Len() == 0 {
		return
	}
	r.P50 = stats.Micros(s.Quantile(0.5))
	r.P99 = stats.Micros(s.Quantile(0.99))
	r.P999 = stats.Micros(s.Quantile(0.999))
	r.Max = stats.Micros(s.Quantile(1))
	r.CDF = s.CDF()
}

func (r *Result) setCPU(d cpuDelta, ops int64) {
	w := d.Wall.Seconds()
	if w <= 0 {
		return
	}
	r.ClientBusy = d.Client.Seconds() / w
	r.OthersBusy = d.Others.Seconds() / w
	if d.ServerPIDs == 0 {
		return
	}
	r.ServerProcs = d.ServerPIDs
	r.ServerCPU = d.Server.Seconds()
	r.ServerBusy = d.Server.Seconds() / w
	if ops > 0 {
		r.ServerCPUPer = d.Server.Seconds() * 1e6 / float64(ops)
	}
}

func (r *Result) addError(kind string) {
	if r.ErrorKinds == nil {
		r.ErrorKinds = map[string]int64{}
	}
	r.ErrorKinds[kind]++
	r.Errors++
}

// Median summarises several runs of the same scenario: the median of every figure (and the
// point-wise median of the CDFs); error counts are summed.
func Median(rs []*Result) *Result {
	if len(rs) == 0 {
		return nil
	}
	if len(rs) == 1 {
		return rs[0]
	}
	m := *rs[0]
	med := func(f func(*Result) float64) float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		return stats.Median(v)
	}
	m.Runs = 0
	m.Errors, m.Skipped, m.ErrorKinds = 0, 0, nil
	var cdfs [][]float64
	for _, r := range rs {
		m.Runs += max(r.Runs, 1)
		m.Errors += r.Errors
		m.Skipped += r.Skipped
		for k, v := range r.ErrorKinds {
			if m.ErrorKinds == nil {
				m.ErrorKinds = map[string]int64{}
			}
			m.ErrorKinds[k] += v
		}
		cdfs = append(cdfs, r.CDF)
	}
	m.Window = med(func(r *Result) float64 { return r.Window })
	m.Ops = int64(med(func(r *Result) float64 { return float64(r.Ops) }))
	m.PerSec = med(func(r *Result) float64 { return r.PerSec })
	m.P50 = med(func(r *Result) float64 { return r.P50 })
	m.P99 = med(func(r *Result) float64 { return r.P99 })
	m.P999 = med(func(r *Result) float64 { return r.P999 })
	m.Max = med(func(r *Result) float64 { return r.Max })
	m.CDF = stats.MedianCDF(cdfs)
	m.ServerCPU = med(func(r *Result) float64 { return r.ServerCPU })
	m.ServerCPUPer = med(func(r *Result) float64 { return r.ServerCPUPer })
	m.ServerBusy = med(func(r *Result) float64 { return r.ServerBusy })
	m.ClientBusy = med(func(r *Result) float64 { return r.ClientBusy })
	m.OthersBusy = med(func(r *Result) float64 { return r.OthersBusy })
	m.MBps = med(func(r *Result) float64 { return r.MBps })
	return &m
}

// String is the one-line summary printed for a result.
func (r *Result) String() string {
	var b strings.Builder
	name := r.Scenario
	if r.Mode != "" {
		name += "/" + r.Mode
	}
	if r.ProxyV2 {
		name += "+pp2"
	}
	if r.Label != "" {
		fmt.Fprintf(&b, "%-10s ", r.Label)
	}
	fmt.Fprintf(&b, "%-13s", name)
	runs := ""
	if r.Runs > 1 {
		runs = fmt.Sprintf(" (medians of %d runs)", r.Runs)
	}
	lat := func() {
		fmt.Fprintf(&b, " · latency p50 %s p99 %s", us(r.P50), us(r.P99))
	}
	cpu := func(unit string) {
		if r.ServerProcs > 0 {
			fmt.Fprintf(&b, " · server CPU %.1f µs/%s (busy %.0f%% of a core, %d procs)", r.ServerCPUPer, unit, 100*r.ServerBusy, r.ServerProcs)
		}
		fmt.Fprintf(&b, " · client busy %.0f%% · others %.0f%%", 100*r.ClientBusy, 100*r.OthersBusy)
	}
	switch r.Scenario {
	case "storm":
		if r.Mode == "open" {
			fmt.Fprintf(&b, " rate %.0f/s: %.0f conn/s", r.Target, r.PerSec)
		} else {
			fmt.Fprintf(&b, " c=%d: %.0f conn/s", r.Conns, r.PerSec)
		}
		lat()
		cpu("conn")
	case "sessions":
		if r.Depth > 1 {
			fmt.Fprintf(&b, " n=%d×%d: %.0f msg/s · batch rtt p50 %s p99 %s", r.Conns, r.Depth, r.PerSec, us(r.P50), us(r.P99))
		} else {
			fmt.Fprintf(&b, " n=%d: %.0f msg/s · rtt p50 %s p99 %s", r.Conns, r.PerSec, us(r.P50), us(r.P99))
		}
		cpu("msg")
	case "bulk":
		fmt.Fprintf(&b, " %.1f MB/s", r.MBps)
		cpu("MB")
	case "scrape":
		fmt.Fprintf(&b, " %d scrapes of %d B: %.0f/s · time to last byte p50 %s p99 %s", r.Ops, r.Bytes, r.PerSec, us(r.P50), us(r.P99))
		cpu("scrape")
	case "idle":
		for _, l := range r.Idle {
			fmt.Fprintf(&b, " · ")
			if l.Pass > 1 {
				fmt.Fprintf(&b, "again ")
			}
			fmt.Fprintf(&b, "%d: held %d", l.Target, l.Held)
			if l.MiddleRSS > 0 || l.MiddleFDs > 0 {
				fmt.Fprintf(&b, ", middle box %.0f B + %.2f fd per conn", l.MiddleRSSPerConn, l.MiddleFDPerConn)
			}
			fmt.Fprintf(&b, ", server side %.0f B + %.2f fd per conn", l.ServerRSSPerConn, l.ServerFDPerConn)
			if l.Stop != "" {
				fmt.Fprintf(&b, " (stopped: %s)", l.Stop)
			}
		}
	case "reload":
		if x := r.Reload; x != nil {
			fmt.Fprintf(&b, " %d reloads (%d failed): %d of %d connects failed (%.2f per reload), %d of %d sessions broken (%.2f per reload) · session rtt p99 %s max %s",
				x.Reloads, x.ReloadErrors, x.FailedConnects, x.Connects, x.FailedPer, x.BrokenSessions, x.Sessions, x.BrokenPer, us(x.SessionP99), us(x.SessionMax))
		}
	case "migrate":
		if x := r.Migrate; x != nil {
			for _, l := range x.Levels {
				b.WriteString(" · ")
				b.WriteString(l.String())
			}
		}
	}
	if r.Errors > 0 && r.Scenario != "reload" && r.Scenario != "migrate" {
		fmt.Fprintf(&b, " · %d errors (%s)", r.Errors, kinds(r.ErrorKinds))
	}
	if r.Skipped > 0 {
		fmt.Fprintf(&b, " · %d starts skipped", r.Skipped)
	}
	b.WriteString(runs)
	return b.String()
}

func kinds(m map[string]int64) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s ×%d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

func us(v float64) string {
	switch {
	case math.IsNaN(v) || v == 0:
		return "-"
	case v >= 10000:
		return fmt.Sprintf("%.1fms", v/1000)
	case v >= 1000:
		return fmt.Sprintf("%.2fms", v/1000)
	}
	return fmt.Sprintf("%.0fµs", v)
}

// seconds converts engine nanoseconds to seconds.
func seconds(ns int64) float64 { return time.Duration(ns).Seconds() }
