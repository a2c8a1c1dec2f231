package suite

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/load"
	"github.com/baton-gw/baton/cmd/baton-bench/internal/procstat"
)

// procs starts the server-side processes of one configuration, pinned to one CPU (or, for the
// scaling configurations, explicitly allowed on every CPU), and kills
// them all at the end. The suite is a child subreaper (see becomeSubreaper), so daemons that
// detach (haproxy -D, a restarted echo process, a reloaded batond) stay its descendants and are
// found and killed too.
type procs struct {
	cpus string // taskset -c cpus; "": no taskset (the processes inherit this one's CPUs)
	dir  string // logs
	cmds []*exec.Cmd
	done []chan struct{}
}

// becomeSubreaper makes orphaned descendants re-parent to this process instead of init.
func becomeSubreaper() error {
	return unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
}

// pinned returns argv run through taskset when the configuration sets its CPUs.
func (p *procs) pinned(argv ...string) []string {
	if p.cpus == "" {
		return argv
	}
	return append([]string{"taskset", "-c", p.cpus}, argv...)
}

// start starts argv (pinned), with its output in dir/<name>.log and env added to the
// environment. The process gets its own process group.
func (p *procs) start(name string, env []string, argv ...string) (*exec.Cmd, error) {
	argv = p.pinned(argv...)
	logf, err := os.OpenFile(p.dir+"/"+name+".log", os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	p.cmds = append(p.cmds, cmd)
	p.done = append(p.done, done)
	return cmd, nil
}

// exited reports whether cmd has exited.
func (p *procs) exited(cmd *exec.Cmd) bool {
	i := slices.Index(p.cmds, cmd)
	if i < 0 {
		return true
	}
	select {
	case <-p.done[i]:
		return true
	default:
		return false
	}
}

// log returns the tail of dir/<name>.log.
func (p *procs) log(name string) string {
	b, _ := os.ReadFile(p.dir + "/" + name + ".log")
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return strings.TrimSpace(string(b))
}

// stopAll sends SIGTERM to every descendant of this process, waits up to grace for them to go,
// SIGKILLs the rest and reaps the orphans that re-parented here.
func (p *procs) stopAll(grace time.Duration) {
	killDescendants(grace, func() { reapOrphans(p.cmds) })
	for _, d := range p.done {
		select {
		case <-d:
		case <-time.After(5 * time.Second):
		}
	}
	reapOrphans(p.cmds)
	p.cmds, p.done = nil, nil
}

// killDescendants sends SIGTERM to every live descendant of this process, calls poll while it
// waits up to grace for them to exit, then SIGKILLs what is left. It touches no procs state, so
// a signal handler may call it while the suite runs.
func killDescendants(grace time.Duration, poll func()) {
	self := os.Getpid()
	live := func() []int {
		var out []int
		for _, pid := range procstat.Tree([]int{self}) {
			if pid != self && !zombie(pid) {
				out = append(out, pid)
			}
		}
		return out
	}
	for _, pid := range live() {
		unix.Kill(pid, unix.SIGTERM)
	}
	deadline := time.Now().Add(grace)
	for len(live()) > 0 && time.Now().Before(deadline) {
		poll()
		time.Sleep(50 * time.Millisecond)
	}
	for range 3 {
		left := live()
		if len(left) == 0 {
			break
		}
		for _, pid := range left {
			unix.Kill(pid, unix.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// reapOrphans waits for (without blocking) the children of this process that exec did not
// start: daemons re-parented here.
func reapOrphans(ours []*exec.Cmd) {
	self := os.Getpid()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := procstat.ReadStat(pid)
		if err != nil || st.PPID != self {
			continue
		}
		if slices.ContainsFunc(ours, func(c *exec.Cmd) bool { return c.Process != nil && c.Process.Pid == pid }) {
			continue
		}
		var ws unix.WaitStatus
		unix.Wait4(pid, &ws, unix.WNOHANG, nil)
	}
}

func zombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || i+2 >= len(b) || b[i+2] == 'Z' || b[i+2] == 'X'
}

// freePort returns a TCP port on 127.0.0.1 that nothing listens on now.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// waitServing waits until addr answers: for echo, a probe byte comes back; for lobby, the
// greeting line arrives.
func waitServing(addr, proto string, d time.Duration, alive func() error) error {
	return waitServingAs(addr, proto, false, d, alive)
}

// waitServingAs is waitServing for a listener that expects a PROXY v2 header (proxy) before
// the client's bytes: the probes send one, in the same write as their first bytes.
func waitServingAs(addr, proto string, proxy bool, d time.Duration, alive func() error) error {
	deadline := time.Now().Add(d)
	var last error
	for time.Now().Before(deadline) {
		if err := alive(); err != nil {
			return err
		}
		last = probe(addr, proto, proxy)
		if last == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s not serving after %v: %w", addr, d, last)
}

func probe(addr, proto string, proxy bool) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	var hdr []byte
	if proxy {
		dst, err := netip.ParseAddrPort(addr)
		if err != nil {
			return err
		}
		hdr = load.ProxyV2Header(netip.MustParseAddrPort("203.0.113.1:40000"), dst)
	}
	buf := make([]byte, 512)
	if proto == "lobby" {
		if len(hdr) > 0 {
			if _, err := c.Write(hdr); err != nil {
				return err
			}
		}
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		if !strings.Contains(string(buf[:n]), "lobby") {
			return fmt.Errorf("unexpected greeting %q", buf[:n])
		}
		return nil
	}
	if _, err := c.Write(append(hdr, '?')); err != nil {
		return err
	}
	if n, err := c.Read(buf); err != nil || n != 1 || buf[0] != '?' {
		return fmt.Errorf("probe answer %q, %v", buf[:max(n, 0)], err)
	}
	return nil
}

// readPID reads a pid file.
func readPID(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("pid file %s: %q", path, b)
	}
	return pid, nil
}

var errExited = errors.New("exited")
