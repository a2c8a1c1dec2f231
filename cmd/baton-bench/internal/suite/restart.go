package suite

import (
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// RestartReuseport is the reload of configuration B: for every echo process whose pid file
// (echo*.pid) is in -dir, in turn, it starts a new SO_REUSEPORT echo process on the same port,
// waits until it listens, then sends the old one SIGTERM (which closes its listener and lets its
// sessions finish). The new processes are left running when this returns; the suite, a child
// subreaper, adopts them. They stay in the caller's session (no setsid): see RestartHAProxy.
func RestartReuseport(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("reuseport-restart", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", "", "directory of the echo processes' pid files (echo*.pid)")
	listen := fs.String("listen", "", "the shared address")
	cpu := fs.Int("cpu", -1, "pin the new processes to this CPU (-1: do not)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || *listen == "" {
		return fmt.Errorf("-dir and -listen are required")
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	pidfiles, _ := filepath.Glob(filepath.Join(*dir, "echo*.pid"))
	sort.Strings(pidfiles)
	if len(pidfiles) == 0 {
		return fmt.Errorf("no echo*.pid in %s", *dir)
	}
	for _, pf := range pidfiles {
		old, err := readPID(pf)
		if err != nil {
			return err
		}
		next := pf + ".next"
		os.Remove(next)
		argv := []string{exe, "echo", "-listen", *listen, "-reuseport", "-pidfile", next}
		if *cpu >= 0 {
			argv = append([]string{"taskset", "-c", strconv.Itoa(*cpu)}, argv...)
		}
		logf, err := os.OpenFile(strings.TrimSuffix(pf, ".pid")+".log", os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		err = cmd.Start()
		logf.Close()
		if err != nil {
			return err
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		if err := waitFile(next, 10*time.Second, func() error {
			select {
			case <-exited:
				return fmt.Errorf("new echo process exited")
			default:
				return nil
			}
		}); err != nil {
			return err
		}
		if err := os.Rename(next, pf); err != nil {
			return err
		}
		if err := syscall.Kill(old, syscall.SIGTERM); err != nil {
			fmt.Fprintf(stderr, "reuseport-restart: old echo %d: %v\n", old, err)
		}
	}
	return nil
}

// RestartHAProxy is the reload of configuration C, HAProxy's own seamless reload: it starts a
// new haproxy on the same configuration that takes the listening socket over from the old one
// through the stats socket (-x) and tells it to finish its sessions and exit (-sf), then waits
// until the old process has let go of the listener.
//
// The new haproxy runs in the foreground (-db), left running when this returns (the suite, a
// child subreaper, adopts it), in the caller's session. `haproxy -D` would call setsid: a new
// session is a new scheduler autogroup, and with every server process on one core that alone
// made HAProxy and its Go backends cost 2.5 times the CPU per connection.
func RestartHAProxy(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("haproxy-reload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	haproxy := fs.String("haproxy", "haproxy", "the haproxy `binary`")
	cfg := fs.String("f", "", "haproxy configuration `file`")
	pidfile := fs.String("pidfile", "", "pid `file` of the serving haproxy (rewritten)")
	sock := fs.String("x", "", "stats socket with expose-fd listeners")
	listen := fs.String("listen", "", "the listening address (to see the handover)")
	logPath := fs.String("log", "", "append the new haproxy's output to this `file`")
	cpu := fs.Int("cpu", -1, "pin the new process to this CPU (-1: do not)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *cfg == "" || *pidfile == "" || *sock == "" || *listen == "" {
		return fmt.Errorf("-f, -pidfile, -x and -listen are required")
	}
	old, err := readPID(*pidfile)
	if err != nil {
		return err
	}
	_, portStr, _ := strings.Cut(*listen, ":")
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("-listen %q: %w", *listen, err)
	}
	inode, err := listenerInode(port)
	if err != nil {
		return err
	}
	argv := []string{*haproxy, "-f", *cfg, "-db", "-x", *sock, "-sf", strconv.Itoa(old)}
	if *cpu >= 0 {
		argv = append([]string{"taskset", "-c", strconv.Itoa(*cpu)}, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	if *logPath != "" {
		logf, err := os.OpenFile(*logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer logf.Close()
		cmd.Stdout, cmd.Stderr = logf, logf
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	if err := os.WriteFile(*pidfile, fmt.Appendf(nil, "%d\n", cmd.Process.Pid), 0o644); err != nil {
		return err
	}
	deadline := time.Now().Add(20 * time.Second)
	for holds(old, inode) {
		select {
		case <-exited:
			return fmt.Errorf("new haproxy exited: %s", tail(*logPath))
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("old haproxy %d still holds the listener 20s after the new one started", old)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// listenerInode returns the socket inode of the TCP listener on 127.0.0.1:port (/proc/net/tcp).
func listenerInode(port int) (string, error) {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return "", err
	}
	want := fmt.Sprintf(":%04X", port)
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 9 && f[3] == "0A" && strings.HasSuffix(f[1], want) {
			return f[9], nil
		}
	}
	return "", fmt.Errorf("no listener on port %d in /proc/net/tcp", port)
}

// holds reports whether process pid has the socket with this inode open.
func holds(pid int, inode string) bool {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false // gone
	}
	want := "socket:[" + inode + "]"
	for _, e := range ents {
		if l, err := os.Readlink(dir + "/" + e.Name()); err == nil && l == want {
			return true
		}
	}
	return false
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 1000 {
		b = b[len(b)-1000:]
	}
	return strings.TrimSpace(string(b))
}
