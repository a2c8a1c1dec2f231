package load

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/procstat"
)

// IdleConfig configures the idle scenario.
type IdleConfig struct {
	Addr   string
	Proto  *Proto
	Counts []int // connection counts to reach, in increasing order
	// Procs load-generator processes (this program, re-executed as "idle-child") hold the
	// client sockets between them: RLIMIT_NOFILE caps each process.
	Procs int
	// Sources is how many source addresses (127.0.0.2 upwards) the sockets are spread over:
	// each has the whole ephemeral port range towards the server.
	Sources     int
	Conc        int           // connections being opened at once, per process
	Verify      bool          // a connection counts once the server answered a probe on it
	Timeout     time.Duration // per connection, connect to probe answer
	OpenTimeout time.Duration // per count
	Settle      time.Duration // pause before memory is read
	Middle      []int         // the middle box (batond, haproxy): its RSS and fds are reported
	ServerPIDs  []int         // roots of every server-side process tree
	// Passes runs the counts this many times over (all connections closed in between), each
	// against a new baseline: the first pass after a server starts includes one-time growth
	// (heap arenas, runtime structures), later ones show what a held session itself costs.
	Passes int
	Label  string
}

// childReport is what an idle child says after each "open" command.
type childReport struct {
	Held   int              `json:"held"`
	Failed int              `json:"failed"`
	Lost   int              `json:"lost"`
	Errors map[string]int64 `json:"errors,omitempty"`
	Err    string           `json:"err,omitempty"`
}

type idleChild struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	out   *bufio.Scanner
	lines chan string
}

// Idle runs the idle scenario: for each count in turn, the children open connections until
// they hold that many between them (or give up), then the memory and descriptors of the middle
// box and of the whole server side are read and divided by the connections held. It stops at
// the first count it cannot reach, and says why.
func Idle(cfg IdleConfig) (*Result, error) {
	if cfg.Proto == nil || len(cfg.Counts) == 0 || cfg.Procs <= 0 {
		return nil, errors.New("idle: need a protocol, counts and procs > 0")
	}
	if cfg.Sources <= 0 || cfg.Sources > 250 {
		return nil, errors.New("idle: -src must be 1 to 250")
	}
	if _, err := parseDst(cfg.Addr); err != nil {
		return nil, err
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 3 * time.Second
	}
	if cfg.OpenTimeout <= 0 {
		cfg.OpenTimeout = 2 * time.Minute
	}
	if cfg.Conc <= 0 {
		cfg.Conc = 128
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	res := &Result{Scenario: "idle", Label: cfg.Label, Proto: cfg.Proto.Name, Runs: 1}
	middleBase := procstat.Sum(cfg.Middle)
	serverBase := procstat.Sum(procstat.Tree(cfg.ServerPIDs))

	children := make([]*idleChild, cfg.Procs)
	defer func() {
		for _, ch := range children {
			if ch == nil {
				continue
			}
			ch.in.Close() // EOF: the child closes its sockets and exits
			done := make(chan struct{})
			go func() { ch.cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				ch.cmd.Process.Kill()
				<-done
			}
		}
	}()
	for i := range children {
		cmd := exec.Command(exe, "idle-child", "-addr", cfg.Addr, "-proto", cfg.Proto.Name,
			"-index", strconv.Itoa(i), "-procs", strconv.Itoa(cfg.Procs), "-src", strconv.Itoa(cfg.Sources),
			"-conc", strconv.Itoa(cfg.Conc), "-verify="+strconv.FormatBool(cfg.Verify), "-timeout", cfg.Timeout.String())
		cmd.Stderr = os.Stderr
		in, err := cmd.StdinPipe()
		if err != nil {
			return nil, err
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			return nil, err
		}
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("idle: start load-generator process: %w", err)
		}
		ch := &idleChild{cmd: cmd, in: in, out: bufio.NewScanner(out), lines: make(chan string, 4)}
		go func() {
			for ch.out.Scan() {
				ch.lines <- ch.out.Text()
			}
			close(ch.lines)
		}()
		children[i] = ch
	}

	for pass := 1; pass <= max(cfg.Passes, 1); pass++ {
		if pass > 1 {
			// Close everything, let the server side notice, and take a new baseline.
			for i, ch := range children {
				if _, err := fmt.Fprintln(ch.in, "close"); err != nil {
					return nil, fmt.Errorf("idle: load-generator process %d: %w", i, err)
				}
			}
			for i, ch := range children {
				select {
				case _, ok := <-ch.lines:
					if !ok {
						return nil, fmt.Errorf("idle: load-generator process %d exited", i)
					}
				case <-time.After(time.Minute):
					return nil, fmt.Errorf("idle: load-generator process %d did not close within a minute", i)
				}
			}
			time.Sleep(cfg.Settle)
			middleBase = procstat.Sum(cfg.Middle)
			serverBase = procstat.Sum(procstat.Tree(cfg.ServerPIDs))
		}
		if !idlePass(cfg, res, children, pass, middleBase, serverBase) {
			break
		}
	}
	return res, nil
}

// idlePass runs the counts once; it reports whether every count was reached.
func idlePass(cfg IdleConfig, res *Result, children []*idleChild, pass int, middleBase, serverBase procstat.Usage) bool {
	for _, target := range cfg.Counts {
		lvl := IdleLevel{Target: target, Pass: pass, ErrorKinds: map[string]int64{}}
		t0 := time.Now()
		for i, ch := range children {
			share := target / cfg.Procs
			if i < target%cfg.Procs {
				share++
			}
			if _, err := fmt.Fprintf(ch.in, "open %d\n", share); err != nil {
				lvl.Stop = fmt.Sprintf("load-generator process %d: %v", i, err)
			}
		}
		deadline := time.Now().Add(cfg.OpenTimeout + 10*time.Second)
		var lost int
		for i, ch := range children {
			var rep childReport
			select {
			case line, ok := <-ch.lines:
				if !ok {
					rep.Err = "exited"
				} else if err := json.Unmarshal([]byte(line), &rep); err != nil {
					rep.Err = fmt.Sprintf("said %q", line)
				}
			case <-time.After(time.Until(deadline)):
				rep.Err = fmt.Sprintf("did not report within %v", cfg.OpenTimeout)
			}
			if rep.Err != "" {
				lvl.ErrorKinds[fmt.Sprintf("load generator %d: %s", i, rep.Err)]++
			}
			lvl.Held += rep.Held
			lvl.Failed += rep.Failed
			lost += rep.Lost
			for k, v := range rep.Errors {
				lvl.ErrorKinds[k] += v
			}
		}
		lvl.OpenSeconds = time.Since(t0).Seconds()
		lvl.Reached = lvl.Held >= target
		if lost > 0 {
			lvl.ErrorKinds["held connection lost"] += int64(lost)
		}
		if !lvl.Reached {
			lvl.Stop = fmt.Sprintf("held %d of %d; %s", lvl.Held, target, kinds(lvl.ErrorKinds))
		}
		if len(lvl.ErrorKinds) == 0 {
			lvl.ErrorKinds = nil
		}
		time.Sleep(cfg.Settle)
		mid := procstat.Sum(cfg.Middle)
		srv := procstat.Sum(procstat.Tree(cfg.ServerPIDs))
		if len(cfg.Middle) > 0 {
			lvl.MiddleRSS = mid.RSS - middleBase.RSS
			lvl.MiddleFDs = mid.FDs - middleBase.FDs
		}
		if lvl.Held > 0 {
			h := float64(lvl.Held)
			lvl.MiddleRSSPerConn = float64(lvl.MiddleRSS) / h
			lvl.MiddleFDPerConn = float64(lvl.MiddleFDs) / h
			lvl.ServerRSSPerConn = float64(srv.RSS-serverBase.RSS) / h
			lvl.ServerFDPerConn = float64(srv.FDs-serverBase.FDs) / h
		}
		res.Idle = append(res.Idle, lvl)
		res.Ops = int64(lvl.Held)
		if !lvl.Reached {
			return false
		}
	}
	return true
}

// IdleChild is one load-generator process of the idle scenario. It reads commands on stdin:
// "open N" opens connections until it holds N (or gives up) and answers one JSON line on stdout;
// "close" closes every connection (RST) and answers; EOF closes every connection and returns.
func IdleChild(args []string, stdin io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("idle-child", flag.ContinueOnError)
	addr := fs.String("addr", "", "server address")
	protoName := fs.String("proto", "echo", "protocol")
	index := fs.Int("index", 0, "this process's index")
	procs := fs.Int("procs", 1, "processes in all")
	nsrc := fs.Int("src", 1, "source addresses")
	conc := fs.Int("conc", 128, "connections being opened at once")
	verify := fs.Bool("verify", true, "probe each connection")
	timeout := fs.Duration("timeout", 3*time.Second, "per connection")
	if err := fs.Parse(args); err != nil {
		return err
	}
	proto, err := ProtoByName(*protoName)
	if err != nil {
		return err
	}
	dst, err := parseDst(*addr)
	if err != nil {
		return err
	}
	e, err := newEngine()
	if err != nil {
		return err
	}
	defer e.close()
	h := &idle{e: e, p: proto, dst: dst, verify: *verify, timeout: int64(*timeout), conc: *conc,
		index: *index, procs: *procs, nsrc: *nsrc}
	sc := bufio.NewScanner(stdin)
	enc := json.NewEncoder(stdout)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 1 && f[0] == "close" {
			h.closeAll()
			if err := enc.Encode(childReport{}); err != nil {
				return err
			}
			continue
		}
		if len(f) != 2 || f[0] != "open" {
			return fmt.Errorf("idle-child: unknown command %q", sc.Text())
		}
		n, err := strconv.Atoi(f[1])
		if err != nil || n < 0 {
			return fmt.Errorf("idle-child: bad count %q", f[1])
		}
		rep := h.open(n)
		if err := enc.Encode(rep); err != nil {
			return err
		}
	}
	return nil
}

// Idle connection phases (conn.phase).
const (
	idConnecting = iota
	idGreeting
	idProbing
	idHeld
)

type idle struct {
	e       *engine
	p       *Proto
	dst     *unix.SockaddrInet4
	verify  bool
	timeout int64
	conc    int
	index   int
	procs   int
	nsrc    int

	made     int // connections started, for the source address rotation
	opening  int
	held     int
	failed   int
	streak   int // failures since the last success
	lost     int
	errors   map[string]int64
	stopping bool
}

func (h *idle) open(target int) childReport {
	h.failed, h.lost, h.streak, h.stopping = 0, 0, 0, false
	h.errors = map[string]int64{}
	// Give up once failures pile up (the server has stopped taking connections): after 32 in a
	// row without a success in between, or after max(64, conc) in all.
	maxFail := max(64, h.conc)
	deadline := h.e.now() + int64(2*time.Minute)
	var backoff int64
	err := h.e.run(deadline, func(now int64) (int64, bool) {
		if h.failed >= maxFail || h.streak >= 32 {
			h.stopping = true
		}
		for !h.stopping && h.held+h.opening < target && h.opening < h.conc && now >= backoff {
			if !h.start(now) {
				backoff = now + int64(10*time.Millisecond)
				break
			}
		}
		if h.opening == 0 && (h.held >= target || h.stopping) {
			return 0, true
		}
		if backoff > now {
			return backoff, false
		}
		return 0, false
	})
	rep := childReport{Held: h.held, Failed: h.failed, Lost: h.lost, Errors: maps.Clone(h.errors)}
	if err != nil {
		rep.Err = err.Error()
	}
	if h.opening > 0 {
		rep.Err = fmt.Sprintf("%d connections still opening at the deadline", h.opening)
	}
	return rep
}

// closeAll closes every connection (RST).
func (h *idle) closeAll() {
	for _, c := range h.e.conns {
		if c != nil {
			h.e.closeConn(c)
		}
	}
	h.held, h.opening = 0, 0
}

func (h *idle) start(now int64) bool {
	g := h.index + h.made*h.procs
	h.made++
	src := netip.AddrFrom4([4]byte{127, 0, 0, byte(2 + g%h.nsrc)})
	c := &conn{fd: -1, h: h, hidx: -1, phase: idConnecting}
	if err := h.e.dial(c, h.dst, src); err != nil {
		h.fail(nil, err)
		return false
	}
	h.opening++
	h.e.setTimer(c, now+h.timeout)
	if c.connected {
		h.connected(c)
	}
	return true
}

func (h *idle) connected(c *conn) {
	c.connected = true
	if g := h.p.greeting(); g > 0 {
		c.phase, c.need = idGreeting, g
		return
	}
	h.probe(c)
}

func (h *idle) probe(c *conn) {
	if !h.verify {
		h.hold(c)
		return
	}
	n, err := unix.Write(c.fd, h.p.Probe)
	if err == nil && n < len(h.p.Probe) {
		err = io.ErrShortWrite
	}
	if err != nil {
		h.fail(c, sysErr("write", err))
		return
	}
	c.phase, c.need = idProbing, h.p.expect(h.p.Probe)
}

func (h *idle) hold(c *conn) {
	c.phase = idHeld
	h.e.clearTimer(c)
	h.opening--
	h.held++
	h.streak = 0
}

func (h *idle) event(c *conn, ev uint32) {
	if c.phase == idConnecting {
		if ev&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			err := soError(c.fd)
			if err == nil {
				err = unix.ECONNRESET
			}
			h.fail(c, sysErr("connect", err))
			return
		}
		if ev&unix.EPOLLOUT == 0 {
			return
		}
		h.connected(c)
		if c.fd < 0 {
			return
		}
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) == 0 {
		return
	}
	for c.fd >= 0 {
		n, err := unix.Read(c.fd, h.e.rbuf)
		switch {
		case err == unix.EAGAIN:
			return
		case err == unix.EINTR:
			continue
		case err != nil || n == 0:
			if err == nil {
				err = io.EOF
			}
			if c.phase == idHeld {
				h.lost++
				h.held--
				h.errors["held "+errKind(sysErr("read", err))]++
				h.e.closeConn(c)
				return
			}
			h.fail(c, sysErr("read", err))
			return
		}
		got := h.p.consume(h.e.rbuf[:n])
		switch c.phase {
		case idGreeting:
			c.need -= got
			if c.need <= 0 {
				h.probe(c)
			}
		case idProbing:
			c.need -= got
			if c.need <= 0 {
				h.hold(c)
			}
		}
		if n < len(h.e.rbuf) {
			return
		}
	}
}

func (h *idle) timer(c *conn) { h.fail(c, errors.New("timeout")) }

// fail counts a failed attempt; c is nil when the socket could not even be made.
func (h *idle) fail(c *conn, err error) {
	h.failed++
	h.streak++
	h.errors[errKind(err)]++
	if c != nil {
		h.opening--
		h.e.closeConn(c)
	}
	if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) {
		h.stopping = true // this process is out of descriptors: more tries cannot help
	}
}
