// Package ctl is batonctl: the command-line client of batond's admin socket.
package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"time"

	"github.com/baton-gw/baton/cmd/internal/admin"
)

// Exit statuses.
const (
	exitOK      = 0
	exitFailed  = 1 // the command failed, or the reload did (with the reason)
	exitUsage   = 2
	exitPending = 3 // batonctl stopped waiting before the reload's outcome was known
)

const exitStatuses = `exit status: 0 done · 1 failed (the reason is printed) · 2 usage error ·
3 the reload's outcome is not known yet (ask with 'batonctl reload -status')`

// command is one level of batonctl's command line: its flags and how -h describes it.
type command struct {
	fs       *flag.FlagSet
	synopsis string // after "usage: "
	about    string
	name     string // for the hint: "batonctl" or "batonctl reload"
}

func newCommand(name, synopsis, about string) *command {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported by parse, in one line
	fs.Usage = func() {}
	return &command{fs: fs, synopsis: synopsis, about: about, name: name}
}

// help prints the command's usage, about text and flags, in the one format of every -h.
func (c *command) help(w io.Writer) {
	fmt.Fprintf(w, "usage: %s\n\n%s\n", c.synopsis, c.about)
	n := 0
	c.fs.VisitAll(func(*flag.Flag) { n++ })
	if n > 0 {
		fmt.Fprint(w, "\nflags:\n")
		c.fs.SetOutput(w)
		c.fs.PrintDefaults()
		c.fs.SetOutput(io.Discard)
	}
}

// parse parses args; done says the caller should return code (help shown, or a usage error
// reported as one line and the hint). maxArgs < 0 allows any number of arguments.
func (c *command) parse(args []string, maxArgs int, stdout, stderr io.Writer) (code int, done bool) {
	err := c.fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		c.help(stdout)
		return exitOK, true
	case err != nil:
		return usageError(stderr, c.name, err.Error()), true
	case maxArgs >= 0 && c.fs.NArg() > maxArgs:
		return usageError(stderr, c.name, fmt.Sprintf("unexpected argument %q", c.fs.Arg(maxArgs))), true
	}
	return 0, false
}

func usageError(stderr io.Writer, name, msg string) int {
	fmt.Fprintf(stderr, "batonctl: %s\nrun '%s -h' for usage\n", msg, name)
	return exitUsage
}

// Main runs batonctl with args (without the program name) and returns the exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	top := newCommand("batonctl", "batonctl [-admin PATH] [-timeout D] COMMAND [flags]",
		"Talks to a running batond over its admin socket.\n\ncommands:\n"+
			"  status    what batond is doing, and its workers by generation\n"+
			"  reload    start the batond binary on disk as the next generation and wait for the outcome\n"+
			"  drain     drain a worker (SLOT), every worker (-all) or the host (-host)\n"+
			"  undrain   end a host drain; drained slots get fresh workers now\n"+
			"  migrate   move a worker's (SLOT) or every worker's (-all) live sessions to fresh workers\n"+
			"  workers   one line per worker, for scripts\n"+
			"  top       a live view of workers, clients, rates and handoff latency (q quits)\n\n"+
			"Run 'batonctl COMMAND -h' for a command's flags.\n\n"+exitStatuses)
	adminPath := top.fs.String("admin", "/run/baton/admin.sock", "batond's admin socket `path`")
	timeout := top.fs.Duration("timeout", 10*time.Second, "wait this long for an answer (status, reload -status)")
	version := top.fs.Bool("version", false, "print batonctl's version and exit")
	if code, done := top.parse(args, -1, stdout, stderr); done {
		return code
	}
	if *version {
		fmt.Fprintln(stdout, "batonctl", admin.Version())
		return exitOK
	}
	if top.fs.NArg() == 0 {
		return usageError(stderr, "batonctl", "no command given")
	}
	c := admin.NewClient(*adminPath)
	switch cmd, rest := top.fs.Arg(0), top.fs.Args()[1:]; cmd {
	case "status":
		return status(c, *timeout, rest, stdout, stderr)
	case "reload":
		return reload(c, *timeout, rest, stdout, stderr)
	case "drain":
		return drain(c, *timeout, rest, stdout, stderr)
	case "undrain":
		return undrain(c, *timeout, rest, stdout, stderr)
	case "migrate":
		return migrate(c, *timeout, rest, stdout, stderr)
	case "workers":
		return workers(c, *timeout, rest, stdout, stderr)
	case "top":
		return topView(c, *timeout, rest, stdout, stderr)
	default:
		return usageError(stderr, "batonctl", fmt.Sprintf("unknown command %q", cmd))
	}
}

func status(c *admin.Client, timeout time.Duration, args []string, stdout, stderr io.Writer) int {
	cmd := newCommand("batonctl status", "batonctl [-admin PATH] status [-json]",
		"Prints what batond is doing (starting, serving, reloading, stopping), then its workers by\n"+
			"generation: slot, pid, state, clients, restarts, uptime.")
	asJSON := cmd.fs.Bool("json", false, "print the status as JSON")
	if code, done := cmd.parse(args, 0, stdout, stderr); done {
		return code
	}
	st, ok := fetchStatus(c, timeout, stderr)
	if !ok {
		return exitFailed
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(st)
		return exitOK
	}
	printStatus(stdout, st)
	return exitOK
}

func printStatus(w io.Writer, st admin.Status) {
	g := st.Gateway
	fmt.Fprintln(w, st.PhaseDetail)
	fmt.Fprintf(w, "batond pid %d · generation %d · listening on %s\n", st.PID, st.Generation, strings.Join(st.Listeners, ", "))
	fmt.Fprintf(w, "%d clients · %d draining workers · accepted %d · handed off %d · closed by gateway %d · in flight %d\n\n",
		st.Clients, st.Draining, g.Accepted, g.Acked, g.ClosedTotal(), g.InFlight)
	if st.HostDrained {
		fmt.Fprintln(w, "host drained: balancers are told to send no new clients")
	}
	if m := st.Migration; m.Asked > 0 {
		fmt.Fprintf(w, "migration: %d migrating · %d migrated · %d declined · %d handed back (workers asked %d times)\n\n",
			m.Migrating, m.Resumed, m.Declined, m.HandedBack, m.Asked)
	}
	workerTable(w, st)
}

// fetchStatus asks for the status within timeout; on failure it says why on stderr.
func fetchStatus(c *admin.Client, timeout time.Duration, stderr io.Writer) (admin.Status, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	st, err := c.Status(ctx)
	if err != nil {
		fmt.Fprintln(stderr, "batonctl:", err)
		return st, false
	}
	return st, true
}
