package load

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/stats"
)

// MigrateConfig configures the migrate scenario (batond with echo workers that take part in
// live session migration: examples/go/echo -migrate).
type MigrateConfig struct {
	Addr     string
	Batonctl string // the batonctl binary
	Admin    string // batond's admin socket
	Counts   []int  // idle sessions held during one reload, in turn
	// Sample sessions keep a request/answer loop going through the reload (a probe byte, the
	// next one Interval after the answer); the others stay idle until the check.
	Sample   int
	Interval time.Duration
	Lead     time.Duration // probing before the reload request (the normal answer gap)
	Tail     time.Duration // probing after the reload command returned
	Sources  int           // source addresses 127.0.0.2… the sessions are spread over
	// Plain also measures, after each migrating reload, the same reload without migration.
	Plain bool
	// DrainWait bounds the wait for the old generation to exit after a plain reload: batond's
	// drain deadline and a margin.
	DrainWait      time.Duration
	Timeout        time.Duration // connect and answer of one probe outside the reload window
	CommandTimeout time.Duration // one batonctl reload
	Label          string
}

// MigrateResult holds one MigrateLevel per count and kind of reload, in the order measured.
type MigrateResult struct {
	Sample   int            `json:"sample"`
	Interval float64        `json:"interval_ms"`
	Levels   []MigrateLevel `json:"levels"`
}

// MigrateLevel is one reload with Sessions idle sessions held. Times in seconds, pauses in
// milliseconds.
type MigrateLevel struct {
	Sessions int    `json:"sessions"` // asked for
	Held     int    `json:"held"`     // established and answered a probe before the reload
	Migrate  bool   `json:"migrate"`  // reload -migrate, or the plain reload
	Command  string `json:"command"`
	// CommandSeconds: from the request until batonctl returned (with -migrate it waits until
	// every old worker has exited); ReloadSeconds and MigrateSeconds are batonctl's own split
	// (the reload up to the new batond serving; then the wait for the hand-over).
	CommandSeconds float64 `json:"command_s"`
	ReloadSeconds  float64 `json:"reload_s"`
	MigrateSeconds float64 `json:"migrate_s,omitempty"`
	// GoneSeconds: from the request until the last worker of the old generation exited, seen
	// through pidfds (0: it did not exit within the wait; OldLeft says how many were left).
	GoneSeconds float64 `json:"old_gone_s"`
	OldWorkers  int     `json:"old_workers"`
	OldLeft     int     `json:"old_left,omitempty"`
	// As batonctl reports them (migrating reload only).
	Migrated   int `json:"migrated"`
	HandedBack int `json:"handed_back"`
	Declined   int `json:"declined"`
	Lost       int `json:"lost"`
	// The sampled sessions' pause: per session, the longest gap between two consecutive
	// answers of which the later came after the reload request (it contains the client's own
	// pacing, Interval, as the normal gap does); Stall is the longest single round trip in
	// the same window (the pause without that pacing, give or take one Interval).
	Paused     int     `json:"paused"` // sampled sessions answered after the request
	PauseP50   float64 `json:"pause_p50_ms"`
	PauseP99   float64 `json:"pause_p99_ms"`
	PauseMax   float64 `json:"pause_max_ms"`
	StallP50   float64 `json:"stall_p50_ms"`
	StallP99   float64 `json:"stall_p99_ms"`
	NormalGap  float64 `json:"normal_gap_ms"` // median answer gap before the request
	Unanswered int     `json:"unanswered"`    // sampled probes never answered
	// After the command returned (and Tail), every session still open sends one probe: Checked
	// answered it, CheckFailed did not (timeout, reset, EOF).
	Checked     int `json:"checked"`
	CheckFailed int `json:"check_failed"`
	// Cut: sessions the server side closed at any time after they were held (for the plain
	// reload, the drain deadline's SIGTERM cuts every session the old generation still has).
	Cut        int              `json:"cut"`
	Output     string           `json:"output,omitempty"`
	Error      string           `json:"error,omitempty"`
	ErrorKinds map[string]int64 `json:"error_kinds,omitempty"`
}

// Migrate runs the migrate scenario: for each count, N idle sessions are opened and verified,
// Sample of them probe, `batonctl reload -migrate` runs, and afterwards every session must
// answer one round trip; with Plain, the same again with a plain `batonctl reload`, waiting
// for the old generation to go (its drain deadline). Every level is one fresh set of sessions.
func Migrate(cfg MigrateConfig) (*Result, error) {
	if len(cfg.Counts) == 0 || cfg.Batonctl == "" || cfg.Admin == "" {
		return nil, errors.New("migrate: need counts, -batonctl and -admin")
	}
	if cfg.Sources <= 0 || cfg.Sources > 250 {
		return nil, errors.New("migrate: -src must be 1 to 250")
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 20 * time.Millisecond
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.CommandTimeout <= 0 {
		cfg.CommandTimeout = 2 * time.Minute
	}
	if cfg.DrainWait <= 0 {
		cfg.DrainWait = 6 * time.Minute
	}
	dst, err := parseDst(cfg.Addr)
	if err != nil {
		return nil, err
	}
	res := &Result{Scenario: "migrate", Label: cfg.Label, Proto: "echo", Runs: 1}
	mr := &MigrateResult{Sample: cfg.Sample, Interval: float64(cfg.Interval) / 1e6}
	res.Migrate = mr
	for _, n := range cfg.Counts {
		for _, mig := range []bool{true, false} {
			if !mig && !cfg.Plain {
				continue
			}
			lvl := migrateLevel(cfg, dst, n, mig)
			mr.Levels = append(mr.Levels, lvl)
			if lvl.Error != "" {
				res.Errors++
			}
			// The next level starts from a batond whose workers hold nothing.
			if err := waitNoClients(cfg, 30*time.Second); err != nil {
				return res, err
			}
		}
	}
	return res, nil
}

// Per-session phases of the migrate scenario.
const (
	mgConnecting = iota
	mgVerify     // connected, the first probe is out
	mgIdle       // held, nothing out
	mgPaced      // sampled: the next probe goes at the timer
	mgProbe      // sampled: a probe is out
	mgCheck      // the check probe is out
	mgChecked    // answered the check
	mgDead       // failed or closed
)

// migration drives the sessions of one level. Its fields are the engine goroutine's.
type migration struct {
	e        *engine
	cfg      MigrateConfig
	interval int64
	timeout  int64
	sess     []*msess
	opening  int
	held     int
	failed   int // setup failures
	sampling bool
	checking bool
	checks   int   // check probes out
	reqAt    int64 // engine time of the reload request; 0 before
	normal   stats.Samples
	errors   map[string]int64
	lvl      *MigrateLevel
}

// msess is one session: its socket and what it measured. It is its own engine handler.
type msess struct {
	c       conn
	m       *migration
	sampled bool
	sent    int64 // the probe out was sent then
	last    int64 // last answer
	gap     int64 // longest answer gap ending after the request
	stall   int64 // longest round trip answered after the request
	after   bool  // answered after the request
}

func (m *migration) fail(kind string) { m.errors[kind]++ }

func migrateLevel(cfg MigrateConfig, dst *unix.SockaddrInet4, n int, mig bool) MigrateLevel {
	lvl := MigrateLevel{Sessions: n, Migrate: mig}
	m := &migration{cfg: cfg, interval: int64(cfg.Interval), timeout: int64(cfg.Timeout), errors: map[string]int64{}, lvl: &lvl}
	defer func() {
		if len(m.errors) > 0 {
			lvl.ErrorKinds = m.errors
		}
	}()
	e, err := newEngine()
	if err != nil {
		lvl.Error = err.Error()
		return lvl
	}
	defer e.close() // RST on every session still open
	e.nodelay = true
	m.e = e
	if err := m.open(dst, n); err != nil {
		lvl.Error = err.Error()
		return lvl
	}
	lvl.Held = m.held
	if m.held < n {
		lvl.Error = fmt.Sprintf("held %d of %d sessions (%s)", m.held, n, kinds(m.errors))
		return lvl
	}
	old, err := workerPIDs(cfg)
	if err != nil {
		lvl.Error = err.Error()
		return lvl
	}
	w, err := watchPIDs(old)
	if err != nil {
		lvl.Error = err.Error()
		return lvl
	}
	defer w.close()
	lvl.OldWorkers = len(old)
	m.startSampling()
	if err := m.runFor(int64(cfg.Lead)); err != nil {
		lvl.Error = err.Error()
		return lvl
	}
	if err := m.reload(mig, w); err != nil {
		lvl.Error = err.Error()
	}
	m.sampling = false
	if err := m.check(); err != nil && lvl.Error == "" {
		lvl.Error = err.Error()
	}
	// The old generation: gone already after -migrate (batonctl waited for it), gone at its
	// drain deadline after a plain reload. Meanwhile the engine counts the sessions cut.
	wait := cfg.DrainWait
	if mig {
		wait = 5 * time.Second
	}
	gone, left := w.wait(e, wait)
	if gone > 0 {
		lvl.GoneSeconds = seconds(gone - m.reqAt)
	}
	lvl.OldLeft = left
	_ = m.runFor(int64(200 * time.Millisecond)) // the last resets after the exits
	m.summarise()
	return lvl
}

// open dials n sessions, at most 256 at a time, each verified by one probe answered.
func (m *migration) open(dst *unix.SockaddrInet4, n int) error {
	m.sess = make([]*msess, n)
	for i := range m.sess {
		s := &msess{m: m}
		s.c = conn{fd: -1, h: s, hidx: -1}
		m.sess[i] = s
	}
	next := 0
	return m.e.run(m.e.now()+int64(2*time.Minute), func(now int64) (int64, bool) {
		for next < n && m.opening < 256 && m.failed < 64 {
			s := m.sess[next]
			src := netip.AddrFrom4([4]byte{127, 0, 0, byte(2 + next%m.cfg.Sources)})
			next++
			if err := m.e.dial(&s.c, dst, src); err != nil {
				s.c.phase = mgDead
				m.failed++
				m.fail(errKind(err))
				continue
			}
			m.opening++
			s.c.phase = mgConnecting
			m.e.setTimer(&s.c, now+m.timeout)
			if s.c.connected {
				s.probe(now, mgVerify)
			}
		}
		return 0, m.opening == 0 && (next == n || m.failed >= 64)
	})
}

// startSampling sets Sample sessions probing, their first probes spread over one interval.
// They are spread evenly over the sessions in the order they were opened: workers hand their
// sessions back in some order, and the first ones opened alone would see only one end of it.
func (m *migration) startSampling() {
	m.sampling = true
	now := m.e.now()
	k := min(m.cfg.Sample, len(m.sess))
	for i := range k {
		s := m.sess[i*len(m.sess)/k]
		if s.c.phase != mgIdle {
			continue
		}
		s.sampled = true
		s.c.phase = mgPaced
		m.e.setTimer(&s.c, now+m.interval*int64(i)/int64(k))
	}
}

// runFor drives the engine for d.
func (m *migration) runFor(d int64) error {
	end := m.e.now() + d
	return m.e.run(end, func(now int64) (int64, bool) { return end, now >= end })
}

var (
	reloadedRE = regexp.MustCompile(`reloaded: .* in ([0-9.]+[µmn]?s),`)
	migratedRE = regexp.MustCompile(`migrated (\d+) sessions \(handed back (\d+), declined (\d+), lost (\d+)\) in ([0-9.]+[µmn]?s)`)
)

// reload runs batonctl reload (-migrate) while the engine keeps the probes going, then Tail more.
func (m *migration) reload(mig bool, w *pidWatch) error {
	argv := []string{m.cfg.Batonctl, "-admin", m.cfg.Admin, "reload", "-timeout", m.cfg.CommandTimeout.String()}
	if mig {
		argv = append(argv, "-migrate")
	}
	m.lvl.Command = "batonctl reload -timeout " + m.cfg.CommandTimeout.String()
	if mig {
		m.lvl.Command += " -migrate"
	}
	type outcome struct {
		out []byte
		err error
		at  int64
	}
	done := make(chan outcome, 1)
	m.reqAt = m.e.now()
	w.start(m.e)
	go func() {
		out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
		done <- outcome{out, err, m.e.now()}
	}()
	var got *outcome
	bound := int64(m.cfg.CommandTimeout + m.cfg.Tail + 10*time.Second)
	err := m.e.run(m.reqAt+bound, func(now int64) (int64, bool) {
		if got == nil {
			select {
			case o := <-done:
				got = &o
			default:
				return now + int64(5*time.Millisecond), false
			}
		}
		end := got.at + int64(m.cfg.Tail)
		return end, now >= end
	})
	if got == nil {
		o := <-done // batonctl's own -timeout ends it
		got = &o
	}
	m.lvl.CommandSeconds = seconds(got.at - m.reqAt)
	m.lvl.Output = string(got.out)
	if mt := reloadedRE.FindSubmatch(got.out); mt != nil {
		if d, perr := time.ParseDuration(string(mt[1])); perr == nil {
			m.lvl.ReloadSeconds = d.Seconds()
		}
	}
	if mt := migratedRE.FindSubmatch(got.out); mt != nil {
		m.lvl.Migrated, _ = strconv.Atoi(string(mt[1]))
		m.lvl.HandedBack, _ = strconv.Atoi(string(mt[2]))
		m.lvl.Declined, _ = strconv.Atoi(string(mt[3]))
		m.lvl.Lost, _ = strconv.Atoi(string(mt[4]))
		if d, perr := time.ParseDuration(string(mt[5])); perr == nil {
			m.lvl.MigrateSeconds = d.Seconds()
		}
	} else if mig && got.err == nil {
		return fmt.Errorf("batonctl reload -migrate did not say what moved: %q", got.out)
	}
	if got.err != nil {
		return fmt.Errorf("%s: %v", m.lvl.Command, got.err)
	}
	return err
}

// check sends one probe on every session still open and waits for the answers.
func (m *migration) check() error {
	m.checking = true
	now := m.e.now()
	for _, s := range m.sess {
		switch s.c.phase {
		case mgIdle, mgPaced:
			s.probe(now, mgCheck)
		}
		// mgProbe: its answer sends the check.
	}
	return m.e.run(now+2*m.timeout+int64(m.cfg.Interval), func(now int64) (int64, bool) {
		pending := m.checks > 0
		for _, s := range m.sess {
			if s.c.phase == mgProbe {
				pending = true
				break
			}
		}
		return now + int64(10*time.Millisecond), !pending
	})
}

// probe sends one probe byte and enters phase ph (mgVerify, mgProbe or mgCheck).
func (s *msess) probe(now int64, ph int) {
	m := s.m
	n, err := unix.Write(s.c.fd, []byte{'?'})
	if err == nil && n != 1 {
		err = io.ErrShortWrite
	}
	if ph == mgCheck {
		m.checks++
	}
	if err != nil {
		s.dead(sysErr("write", err))
		return
	}
	s.c.phase, s.sent = ph, now
	switch ph {
	case mgProbe:
		// No timeout within the reload: a probe waits as long as the session is paused.
		m.e.setTimer(&s.c, now+int64(m.cfg.CommandTimeout+m.cfg.Tail))
	default:
		m.e.setTimer(&s.c, now+m.timeout)
	}
}

func (s *msess) event(c *conn, ev uint32) {
	m := s.m
	now := m.e.now()
	if c.phase == mgConnecting {
		if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			err := soError(c.fd)
			if err == nil {
				err = unix.ECONNRESET
			}
			s.dead(sysErr("connect", err))
			return
		}
		if ev&unix.EPOLLOUT == 0 {
			return
		}
		c.connected = true
		s.probe(now, mgVerify)
		if c.phase == mgDead {
			return
		}
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) == 0 {
		return
	}
	for c.phase != mgDead {
		n, err := unix.Read(c.fd, m.e.rbuf)
		switch {
		case err == unix.EAGAIN:
			return
		case err == unix.EINTR:
			continue
		case err != nil:
			s.dead(sysErr("read", err))
			return
		case n == 0:
			s.dead(sysErr("read", io.EOF))
			return
		}
		if n != 1 || m.e.rbuf[0] != '?' {
			s.dead(fmt.Errorf("%d unexpected bytes", n))
			return
		}
		s.answered(now)
	}
}

// answered handles the answer to the probe out.
func (s *msess) answered(now int64) {
	m := s.m
	m.e.clearTimer(&s.c)
	switch s.c.phase {
	case mgVerify:
		m.opening--
		m.held++
		s.c.phase = mgIdle
	case mgProbe:
		if s.last > 0 {
			gap := now - s.last
			if m.reqAt > 0 {
				s.gap, s.stall, s.after = max(s.gap, gap), max(s.stall, now-s.sent), true
			} else {
				m.normal.Add(time.Duration(gap))
			}
		}
		s.last = now
		switch {
		case m.checking:
			s.probe(now, mgCheck)
		case m.sampling:
			s.c.phase = mgPaced
			m.e.setTimer(&s.c, now+m.interval)
		default:
			s.c.phase = mgIdle
		}
	case mgCheck:
		m.checks--
		m.lvl.Checked++
		s.c.phase = mgChecked
	default:
		s.dead(errors.New("an answer to no probe"))
	}
}

func (s *msess) timer(c *conn) {
	switch c.phase {
	case mgPaced:
		if s.m.sampling {
			s.probe(s.m.e.now(), mgProbe)
		} else {
			c.phase = mgIdle
		}
	case mgConnecting, mgVerify:
		s.dead(errors.New("setup timeout"))
	case mgProbe:
		s.dead(errProbeTimeout)
	default:
		s.dead(errors.New("check timeout"))
	}
}

// dead counts a failure by phase and closes the session.
func (s *msess) dead(err error) {
	m := s.m
	switch s.c.phase {
	case mgConnecting, mgVerify:
		m.opening--
		m.failed++
		m.fail("setup " + errKind(err))
	case mgCheck:
		m.checks--
		m.lvl.CheckFailed++
		m.lvl.Cut++
		m.fail("check " + errKind(err))
	case mgProbe:
		if errors.Is(err, errProbeTimeout) {
			m.lvl.Unanswered++
		}
		m.lvl.Cut++
		m.fail("held " + errKind(err))
	default:
		m.lvl.Cut++
		m.fail("held " + errKind(err))
	}
	s.c.phase = mgDead
	m.e.closeConn(&s.c)
}

var errProbeTimeout = errors.New("probe timeout")

// summarise computes the pause figures of the sampled sessions.
func (m *migration) summarise() {
	var gaps, stalls stats.Samples
	for _, s := range m.sess {
		if s.sampled && s.after {
			gaps.Add(time.Duration(s.gap))
			stalls.Add(time.Duration(s.stall))
		}
	}
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	m.lvl.Paused = gaps.Len()
	if gaps.Len() > 0 {
		m.lvl.PauseP50, m.lvl.PauseP99, m.lvl.PauseMax = ms(gaps.Quantile(0.5)), ms(gaps.Quantile(0.99)), ms(gaps.Quantile(1))
		m.lvl.StallP50, m.lvl.StallP99 = ms(stalls.Quantile(0.5)), ms(stalls.Quantile(0.99))
	}
	if m.normal.Len() > 0 {
		m.lvl.NormalGap = ms(m.normal.Quantile(0.5))
	}
}

// status is the part of `batonctl status -json` the scenario reads.
type status struct {
	Clients int `json:"clients"`
	Workers []struct {
		PID int `json:"pid"`
	} `json:"workers"`
}

func readStatus(cfg MigrateConfig) (status, error) {
	var st status
	out, err := exec.Command(cfg.Batonctl, "-admin", cfg.Admin, "status", "-json").Output()
	if err != nil {
		return st, fmt.Errorf("batonctl status: %w", err)
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return st, fmt.Errorf("batonctl status -json: %w", err)
	}
	return st, nil
}

// workerPIDs lists every worker batond knows of (the generation about to become the old one).
func workerPIDs(cfg MigrateConfig) ([]int, error) {
	st, err := readStatus(cfg)
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, w := range st.Workers {
		if w.PID > 0 {
			pids = append(pids, w.PID)
		}
	}
	if len(pids) == 0 {
		return nil, errors.New("batonctl status lists no worker")
	}
	return pids, nil
}

// waitNoClients waits until batond counts no client (the previous level's sessions are closed).
func waitNoClients(cfg MigrateConfig, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		st, err := readStatus(cfg)
		if err == nil && st.Clients == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			if err != nil {
				return err
			}
			return fmt.Errorf("batond still counts %d clients %v after the sessions closed", st.Clients, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// String is the level's part of the result line.
func (l MigrateLevel) String() string {
	var b strings.Builder
	if l.Migrate {
		fmt.Fprintf(&b, "%d sessions, reload -migrate: %.2fs (reload %.2fs + hand-over %.2fs), old generation gone at %s; moved %d (handed back %d, declined %d, lost %d); pause p50 %s p99 %s max %s (normal gap %s)",
			l.Sessions, l.CommandSeconds, l.ReloadSeconds, l.MigrateSeconds, secs(l.GoneSeconds), l.Migrated, l.HandedBack, l.Declined, l.Lost,
			millis(l.PauseP50), millis(l.PauseP99), millis(l.PauseMax), millis(l.NormalGap))
	} else {
		fmt.Fprintf(&b, "%d sessions, plain reload: %.2fs, old generation gone at %s with %d sessions cut; pause p50 %s p99 %s max %s",
			l.Sessions, l.CommandSeconds, secs(l.GoneSeconds), l.Cut, millis(l.PauseP50), millis(l.PauseP99), millis(l.PauseMax))
	}
	fmt.Fprintf(&b, "; %d of %d answered after", l.Checked, l.Held)
	if l.Migrate && l.Cut > 0 {
		fmt.Fprintf(&b, ", %d cut", l.Cut)
	}
	if l.OldLeft > 0 {
		fmt.Fprintf(&b, ", %d old workers left", l.OldLeft)
	}
	if l.Error != "" {
		fmt.Fprintf(&b, " — FAILED: %s", l.Error)
	}
	return b.String()
}

func secs(v float64) string {
	if v <= 0 {
		return "– (not gone)"
	}
	return fmt.Sprintf("%.2fs", v)
}

func millis(v float64) string {
	if v <= 0 {
		return "–"
	}
	if v >= 100 {
		return fmt.Sprintf("%.0fms", v)
	}
	return fmt.Sprintf("%.1fms", v)
}
