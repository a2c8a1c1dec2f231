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
// sessions finish). The new processes detach; the suite, a child subreaper, adopts them.
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
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
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
