// Package ctl is batonctl: the command-line client of batond's admin socket.
package ctl

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/baton-gw/baton/cmd/internal/admin"
)

const usage = `usage: batonctl [-admin PATH] COMMAND

commands:
  status [-json]         workers by generation: slot, pid, state, clients, restarts, uptime
  reload [-timeout D]    start the batond binary on disk as the next generation and wait:
                         exit 0 once it serves, 1 (with the reason) if the old one keeps serving
`

// Main runs batonctl with args (without the program name) and returns the exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("batonctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminPath := fs.String("admin", "/run/baton/admin.sock", "batond's admin socket `path`")
	timeout := fs.Duration("timeout", 10*time.Second, "give up after this long")
	fs.Usage = func() { fmt.Fprint(stderr, usage, "\nflags:\n"); fs.PrintDefaults() }
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		return 2
	}
	if fs.NArg() == 0 {
		fmt.Fprint(stderr, "batonctl: no command given\n\n")
		fs.Usage()
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	c := admin.NewClient(*adminPath)
	switch cmd, rest := fs.Arg(0), fs.Args()[1:]; cmd {
	case "status":
		sf := flag.NewFlagSet("status", flag.ContinueOnError)
		sf.SetOutput(stderr)
		asJSON := sf.Bool("json", false, "print JSON")
		if err := sf.Parse(rest); err != nil || sf.NArg() > 0 {
			fmt.Fprint(stderr, usage)
			return 2
		}
		st, err := c.Status(ctx)
		if err != nil {
			fmt.Fprintln(stderr, "batonctl:", err)
			return 1
		}
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			_ = enc.Encode(st)
			return 0
		}
		printStatus(stdout, st)
		return 0
	case "reload":
		rf := flag.NewFlagSet("reload", flag.ContinueOnError)
		rf.SetOutput(stderr)
		rt := rf.Duration("timeout", 2*time.Minute, "give up waiting after this long")
		if err := rf.Parse(rest); err != nil || rf.NArg() > 0 {
			fmt.Fprint(stderr, usage)
			return 2
		}
		rctx, rcancel := context.WithTimeout(context.Background(), *rt)
		defer rcancel()
		before, _ := c.Status(rctx)
		if err := c.Reload(rctx); err != nil {
			fmt.Fprintln(stderr, "batonctl: reload:", err)
			return 1
		}
		// The answer came from the old batond; ask the new one who it is. The reload has
		// succeeded whatever this says: never turn it into a failure.
		after, err := c.Status(rctx)
		if err != nil {
			fmt.Fprintf(stdout, "reloaded: generation %d (pid %d) → a new batond (its status did not answer: %v)\n", before.Generation, before.PID, err)
			return 0
		}
		fmt.Fprintf(stdout, "reloaded: generation %d (pid %d) → generation %d (pid %d)\n", before.Generation, before.PID, after.Generation, after.PID)
		return 0
	default:
		fmt.Fprintf(stderr, "batonctl: unknown command %q\n\n", cmd)
		fs.Usage()
		return 2
	}
}

func printStatus(w io.Writer, st admin.Status) {
	g := st.Gateway
	fmt.Fprintf(w, "batond pid %d · generation %d · listening on %s\n", st.PID, st.Generation, strings.Join(st.Listeners, ", "))
	fmt.Fprintf(w, "%d clients · %d draining workers · accepted %d · handed off %d · closed by gateway %d · in flight %d\n\n",
		st.Clients, st.Draining, g.Accepted, g.Acked, g.ClosedTotal(), g.InFlight)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GEN\tSLOT\tPID\tSTATE\tCLIENTS\tRESTARTS\tUPTIME\tLAST EXIT")
	for _, x := range st.Workers {
		pid := "-"
		if x.PID != 0 {
			pid = fmt.Sprint(x.PID)
		}
		up := x.Uptime
		if up == "" {
			up = "-"
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%d\t%d\t%s\t%s\n", x.Generation, x.Slot, pid, x.State, x.Clients, x.Restarts, up, x.LastExit)
	}
	tw.Flush()
}
