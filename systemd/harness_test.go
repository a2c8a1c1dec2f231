package systemd_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// These tests install the units of this directory into a real, throwaway systemd (252 on
// Debian 12) booted as PID 1 of new pid+mount namespaces, and drive batond through systemctl.
// They need root; in CI (CI=true) they must run, never skip.

func TestMain(m *testing.M) {
	code := m.Run()
	if bins.dir != "" {
		os.RemoveAll(bins.dir)
	}
	os.Exit(code)
}

// requireRoot skips the test outside CI when not root, and fails it in CI.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("CI=true and not root: the systemd tests must run as root in CI")
	}
	t.Skip("needs root (boots a throwaway systemd in new namespaces); CI runs it as root")
}

// requireTools fails (never skips) when a program the test drives is missing.
func requireTools(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if strings.HasPrefix(n, "/") {
			if _, err := os.Stat(n); err != nil {
				t.Fatalf("%s is needed: %v", n, err)
			}
			continue
		}
		if _, err := exec.LookPath(n); err != nil {
			t.Fatalf("%s is needed: %v", n, err)
		}
	}
}

// raceEnabled says whether this test binary was built with -race; batond is then built with
// it too, so that the daemon is checked under the same traffic.
func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

var bins struct {
	once     sync.Once
	dir      string
	batond   string
	batonctl string
	err      error
}

// build compiles batond and batonctl once per test binary run.
func build(t *testing.T) {
	t.Helper()
	bins.once.Do(func() {
		bins.dir, bins.err = os.MkdirTemp("", "baton-systemd-bin-")
		if bins.err != nil {
			return
		}
		// systemd's units run these binaries: the directory must be searchable by root only,
		// which MkdirTemp's 0700 is.
		bins.batond = filepath.Join(bins.dir, "batond")
		bins.batonctl = filepath.Join(bins.dir, "batonctl")
		args := []string{"build"}
		if raceEnabled() {
			args = append(args, "-race")
		}
		args = append(args, "-o", bins.dir, "github.com/baton-gw/baton/cmd/batond", "github.com/baton-gw/baton/cmd/batonctl")
		out, err := exec.Command("go", args...).CombinedOutput()
		if err != nil {
			bins.err = fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	})
	if bins.err != nil {
		t.Fatal(bins.err)
	}
}

// unitFiles are the units this directory ships.
var unitFiles = []string{"baton.service", "baton.socket", "baton-workers.socket"}

// installUnits copies the units into dir with every rewrite applied (old → new). Each rewrite
// must match somewhere, so that a change to the units cannot silently leave the test running
// against the installed defaults.
func installUnits(t *testing.T, dir string, rewrites ...[2]string) []string {
	t.Helper()
	hits := make([]int, len(rewrites))
	var paths []string
	for _, name := range unitFiles {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		s := string(b)
		for i, rw := range rewrites {
			hits[i] += strings.Count(s, rw[0])
			s = strings.ReplaceAll(s, rw[0], rw[1])
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	for i, rw := range rewrites {
		if hits[i] == 0 {
			t.Fatalf("no unit file contains %q any more: update the test", rw[0])
		}
	}
	return paths
}

// binRewrites points the units at the binaries built for the test.
func binRewrites() [][2]string {
	return [][2]string{
		{"/usr/local/bin/batonctl", bins.batonctl},
		{"/usr/local/bin/batond", bins.batond},
	}
}

// ---- a throwaway systemd ----------------------------------------------------------------

// masked are the units that must not run in the throwaway systemd: it shares the host's files
// (all but /run), network, clock and kernel, and several boot-time units act on them. Above
// all systemd-tmpfiles-setup, which wipes /tmp of the whole machine (CI's checkout and this
// test's own binaries included). Masks for units that do not exist are harmless. The list
// grows from ../shared/recipes/systemd-in-namespace.sh (keep every mask it has).
var masked = []string{
	// from the recipe
	"systemd-tmpfiles-setup.service", "systemd-tmpfiles-setup-dev.service", "systemd-tmpfiles-clean.timer",
	"systemd-sysusers.service", "systemd-sysctl.service", "systemd-remount-fs.service", "systemd-binfmt.service",
	"systemd-modules-load.service", "systemd-journal-flush.service", "systemd-update-utmp.service",
	"systemd-logind.service", "dbus.service", "dbus.socket", "getty.target", "console-getty.service",
	"systemd-random-seed.service", "systemd-machine-id-commit.service", "postgresql.service",
	// files, clock, devices, swap and disks of the host
	"systemd-tmpfiles-clean.service", "systemd-timesyncd.service", "systemd-pstore.service",
	"systemd-hwdb-update.service", "systemd-journal-catalog-update.service", "systemd-update-done.service",
	"systemd-firstboot.service", "systemd-repart.service", "ldconfig.service", "kmod-static-nodes.service",
	"systemd-udevd.service", "systemd-udev-trigger.service", "systemd-udev-settle.service",
	"systemd-udevd-control.socket", "systemd-udevd-kernel.socket", "proc-sys-fs-binfmt_misc.automount",
	"systemd-pcrphase.service", "systemd-pcrphase-sysinit.service", "hwclock.service", "procps.service",
	"swap.target", "cryptsetup.target", "veritysetup.target", "integritysetup.target", "remote-fs.target",
	"systemd-fsck-root.service", "systemd-quotacheck.service", "e2scrub_reap.service",
	// the network namespace is the host's
	"networking.service", "systemd-networkd.service", "systemd-networkd.socket", "systemd-network-generator.service",
	// timers (package updates, fstrim, ...): none may fire from the throwaway systemd
	"timers.target", "apt-daily.timer", "apt-daily-upgrade.timer", "apt-daily.service", "apt-daily-upgrade.service",
	"dpkg-db-backup.timer", "dpkg-db-backup.service", "e2scrub_all.timer", "e2scrub_all.service",
	"fstrim.timer", "fstrim.service", "man-db.timer", "man-db.service", "logrotate.timer", "logrotate.service",
}

// bootScript runs inside the new namespaces (as their PID 1 until it execs systemd). Masks go
// into /run/systemd/system.control too, which takes precedence over /etc/systemd/system, so a
// unit file the host adds in /etc cannot slip past them. Any failing step aborts (set -e)
// before systemd starts.
const bootScript = `set -eu
# never touch the host's mounts: this must be a new mount namespace (and pid namespace)
[ "$(readlink /proc/self/ns/mnt)" != "$BATON_TEST_HOST_MNTNS" ] || { echo "not in a new mount namespace" >&2; exit 1; }
[ "$$" = 1 ] || { echo "not PID 1 of a new pid namespace" >&2; exit 1; }
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run
# journald keeps to /run (journal-flush is masked); an empty /var/log/journal makes sure
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=2755 tmpfs /var/log/journal; fi
mkdir -p /run/systemd/system /run/systemd/system.control
for u in $BATON_TEST_MASKED; do
  ln -sf /dev/null "/run/systemd/system/$u"
  ln -sf /dev/null "/run/systemd/system.control/$u"
done
for u in $BATON_TEST_MASKED; do
  [ "$(readlink /run/systemd/system.control/$u)" = /dev/null ] || { echo "mask $u missing" >&2; exit 1; }
done
cp "$BATON_TEST_UNITS"/* /run/systemd/system/
# the units' RuntimeDirectory= and the sockets' paths are under /run: fresh, private tmpfs
exec env -i container=baton-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  /lib/systemd/systemd --system --unit=basic.target --log-target=journal --show-status=no
`

// sysd is a systemd running as PID 1 of its own pid+mount namespaces.
type sysd struct {
	t      *testing.T
	pid    int // PID 1 of the namespace, as seen from here
	pidfd  int
	exited chan struct{}
	out    *syncBuffer
}

// bootSystemd boots a throwaway systemd with the units in unitDir and waits until it runs.
// It is torn down (SIGKILL to its PID 1, which ends every process in the namespace) in
// t.Cleanup, and also if this test process dies: unshare has a parent-death signal and
// passes its death on to its child (--kill-child).
func bootSystemd(t *testing.T, unitDir string) *sysd {
	t.Helper()
	heavyTest(t)
	requireTools(t, "unshare", "nsenter", "mount", "/lib/systemd/systemd")
	s := &sysd{t: t, pidfd: -1, exited: make(chan struct{}), out: &syncBuffer{}}
	cmd := exec.Command("unshare", "--fork", "--pid", "--mount", "--mount-proc", "--uts", "--ipc",
		"--kill-child", "bash", "-c", bootScript)
	hostNS, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	cmd.Env = append(os.Environ(),
		"BATON_TEST_HOST_MNTNS="+hostNS,
		"BATON_TEST_MASKED="+strings.Join(masked, " "),
		"BATON_TEST_UNITS="+unitDir)
	cmd.Stdout, cmd.Stderr = s.out, s.out
	// Setsid: no terminal signals reach it. Pdeathsig: if this process dies without running
	// its cleanups (a test timeout panics), unshare dies and --kill-child takes systemd along.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	go func() {
		// The parent-death signal fires when the thread that started the child ends: keep
		// this goroutine on its thread for as long as unshare lives.
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		cmd.Wait()
		close(s.exited)
	}()
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.teardown)

	// The namespace's PID 1 is unshare's only child; it becomes systemd once bash execs.
	deadline := time.Now().Add(20 * time.Second)
	for s.pid == 0 {
		select {
		case <-s.exited:
			t.Fatalf("the namespace ended during boot:\n%s", s.out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no systemd in the namespace after 20s:\n%s", s.out)
		}
		if pid := childOf(cmd.Process.Pid); pid != 0 {
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) == "systemd" {
				fd, err := unix.PidfdOpen(pid, 0)
				if err != nil {
					t.Fatalf("pidfd of the namespace's systemd: %v", err)
				}
				s.pid, s.pidfd = pid, fd
				break
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Boot is done when is-system-running stops saying "starting"/"initializing".
	for {
		out, _ := s.run(10*time.Second, "systemctl", "is-system-running", "--wait")
		state := strings.TrimSpace(out)
		if state == "running" {
			break
		}
		if state == "degraded" {
			failed, _ := s.run(10*time.Second, "systemctl", "--failed", "--no-pager", "--no-legend")
			t.Logf("the throwaway systemd booted degraded (harmless for these tests):\n%s", failed)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("systemd did not finish booting within 20s (state %q):\n%s", state, s.out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return s
}

// childOf returns the pid of a child of ppid, or 0.
func childOf(ppid int) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so parse after the last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) > 1 && f[1] == strconv.Itoa(ppid) {
			return pid
		}
	}
	return 0
}

// run runs a command inside the namespace (its mounts and pids) and returns its combined
// output.
func (s *sysd) run(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"-t", strconv.Itoa(s.pid), "-m", "-p", "--"}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"}
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%s: timed out after %v (%w)", strings.Join(args, " "), timeout, err)
	}
	return string(out), err
}

// systemctl runs systemctl in the namespace; a job gets at most 2 minutes.
func (s *sysd) systemctl(args ...string) (string, error) {
	return s.run(2*time.Minute, append([]string{"systemctl", "--no-pager"}, args...)...)
}

// show returns one property of a unit.
func (s *sysd) show(unit, prop string) string {
	out, err := s.systemctl("show", "-p", prop, "--value", unit)
	if err != nil {
		s.t.Errorf("systemctl show -p %s %s: %v: %s", prop, unit, err, out)
	}
	return strings.TrimSpace(out)
}

// journal returns the unit's last lines of log.
func (s *sysd) journal(unit string, lines int) string {
	out, _ := s.run(30*time.Second, "journalctl", "--no-pager", "-o", "short-precise", "-u", unit, "-n", strconv.Itoa(lines))
	return out
}

// alive says whether a pid of the namespace still runs (not a zombie).
func (s *sysd) alive(nspid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/root/proc/%d/stat", s.pid, nspid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && !bytes.HasPrefix(bytes.TrimSpace(b[i+1:]), []byte("Z"))
}

// teardown kills the namespace's PID 1, and with it every process in the namespace.
func (s *sysd) teardown() {
	if s.pidfd >= 0 {
		unix.PidfdSendSignal(s.pidfd, unix.SIGKILL, nil, 0)
		unix.Close(s.pidfd)
	}
	select {
	case <-s.exited:
	case <-time.After(20 * time.Second):
		s.t.Errorf("the namespace did not end within 20s of SIGKILL to its systemd")
	}
}

// killLeftovers kills any process still running a binary from dir (a test's build or release
// directory), through pidfds: the namespace's end takes them all, this is the safety net.
func killLeftovers(t *testing.T, dirs ...string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		for _, d := range dirs {
			if d == "" || !bytes.Contains(cmdline, []byte(d+"/")) {
				continue
			}
			if fd, err := unix.PidfdOpen(pid, 0); err == nil {
				t.Errorf("process %d (%s) outlived the test's namespace; killing it", pid, bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '}))
				unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
				unix.Close(fd)
			}
			break
		}
	}
}

// ---- batond's admin view -----------------------------------------------------------------

// status is what `batonctl status -json` prints (the fields the tests use).
type status struct {
	PID        int      `json:"pid"`
	Generation uint64   `json:"generation"`
	Listeners  []string `json:"listeners"`
	Workers    []struct {
		Slot       int    `json:"slot"`
		PID        int    `json:"pid"`
		Generation uint64 `json:"generation"`
		State      string `json:"state"`
		Clients    int    `json:"clients"`
		Restarts   int    `json:"restarts"`
		Adopted    bool   `json:"adopted"`
	} `json:"workers"`
	Clients  int `json:"clients"`
	Draining int `json:"draining"`
	Gateway  struct {
		Accepted uint64            `json:"accepted"`
		Acked    uint64            `json:"acked"`
		Closed   map[string]uint64 `json:"closed_by_gateway"`
		InFlight int               `json:"in_flight"`
	} `json:"gateway"`
}

func (st status) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "batond pid %d · generation %d · %d clients · %d draining · accepted %d acked %d closed %v in flight %d",
		st.PID, st.Generation, st.Clients, st.Draining, st.Gateway.Accepted, st.Gateway.Acked, st.Gateway.Closed, st.Gateway.InFlight)
	for _, w := range st.Workers {
		fmt.Fprintf(&b, "\n  gen %d slot %d pid %d %s clients %d restarts %d adopted %v", w.Generation, w.Slot, w.PID, w.State, w.Clients, w.Restarts, w.Adopted)
	}
	return b.String()
}

// batonStatus asks the serving batond through batonctl. batonctl runs out here and reaches
// the admin socket, /run/baton/admin.sock in the namespace, through the namespace's root as
// its PID 1 sees it (cheaper than entering the namespace for every poll).
func (s *sysd) batonStatus() (status, error) {
	var st status
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bins.batonctl, "-admin", fmt.Sprintf("/proc/%d/root/run/baton/admin.sock", s.pid), "status", "-json")
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			out = append(out, ee.Stderr...)
		}
		return st, fmt.Errorf("batonctl status -json: %w: %s", err, out)
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return st, fmt.Errorf("batonctl status -json: %w: %q", err, out)
	}
	return st, nil
}

// ---- small helpers -----------------------------------------------------------------------

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitFor polls cond every 50ms for at most d and returns its last answer.
func waitFor(d time.Duration, cond func() (bool, string)) (bool, string) {
	deadline := time.Now().Add(d)
	for {
		ok, last := cond()
		if ok || time.Now().After(deadline) {
			return ok, last
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// greetingRe matches the demo worker's first line.
var greetingRe = regexp.MustCompile(`^baton demo(?: (\S+))? · worker (\d+) · pid (\d+) · generation (\d+)$`)

type greeting struct {
	label string
	slot  int
	pid   int
	gen   uint64
}

func parseGreeting(line string) (greeting, error) {
	m := greetingRe.FindStringSubmatch(strings.TrimSuffix(line, "\n"))
	if m == nil {
		return greeting{}, fmt.Errorf("not a demo greeting: %q", line)
	}
	g := greeting{label: m[1]}
	g.slot, _ = strconv.Atoi(m[2])
	g.pid, _ = strconv.Atoi(m[3])
	g.gen, _ = strconv.ParseUint(m[4], 10, 64)
	return g, nil
}

// exitCode returns the exit status of a finished command's error (0 for nil, -1 if unknown).
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// readLines is bufio.Scanner over a string.
func readLines(s string) []string {
	var out []string
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		out = append(out, sc.Text())
	}
	return out
}

// procsRunning lists the namespace's processes whose command line mentions dir.
func (s *sysd) procsRunning(dir string) []string {
	root := fmt.Sprintf("/proc/%d/root/proc", s.pid)
	ents, _ := os.ReadDir(root)
	var out []string
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(root, e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte(dir+"/")) {
			continue
		}
		out = append(out, e.Name()+" "+string(bytes.ReplaceAll(bytes.TrimRight(b, "\x00"), []byte{0}, []byte{' '})))
	}
	return out
}
