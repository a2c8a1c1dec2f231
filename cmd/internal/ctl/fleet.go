package ctl

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/baton-gw/baton/cmd/internal/admin"
)

func drain(c *admin.Client, timeout time.Duration, args []string, stdout, stderr io.Writer) int {
	cmd := newCommand("batonctl drain", "batonctl [-admin PATH] drain [-replace] (SLOT | -all | -host)",
		"Drains a worker, every worker, or the whole host. A drained worker gets no new clients,\n"+
			"keeps its sessions and exits when the last one leaves; a fresh worker takes its slot then\n"+
			"(with -replace: at once, beside it). A drained host tells its balancers so (agent-check\n"+
			"'drain', /healthz 503) and its sessions play out; 'batonctl undrain' ends it.")
	all := cmd.fs.Bool("all", false, "drain every slot's worker")
	host := cmd.fs.Bool("host", false, "drain the whole host (for a balancer in front)")
	replace := cmd.fs.Bool("replace", false, "start each drained slot's successor now")
	if code, done := cmd.parse(args, 1, stdout, stderr); done {
		return code
	}
	target := cmd.fs.Arg(0)
	switch {
	case *all && *host, (*all || *host) && target != "":
		return usageError(stderr, cmd.name, "give one of SLOT, -all, -host")
	case *all:
		target = "all"
	case *host:
		target = "host"
	case target == "":
		return usageError(stderr, cmd.name, "give one of SLOT, -all, -host")
	default:
		if _, err := strconv.Atoi(target); err != nil {
			return usageError(stderr, cmd.name, fmt.Sprintf("slot %q is not a number", target))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	res, err := c.Drain(ctx, target, *replace)
	if err != nil {
		fmt.Fprintln(stderr, "batonctl: drain:", err)
		return exitFailed
	}
	switch target {
	case "host":
		fmt.Fprintln(stdout, "host drained: balancers are told to send no new clients; its sessions play out ('batonctl undrain' ends it)")
	default:
		fmt.Fprintf(stdout, "drained %d worker(s)%s\n", res.Slots, map[bool]string{true: "; their successors start now", false: "; each slot restarts when its worker has left"}[*replace])
	}
	return exitOK
}

func undrain(c *admin.Client, timeout time.Duration, args []string, stdout, stderr io.Writer) int {
	cmd := newCommand("batonctl undrain", "batonctl [-admin PATH] undrain",
		"Ends a host drain (balancers are told the host is ready again) and gives every slot whose\n"+
			"worker was drained a fresh worker now.")
	if code, done := cmd.parse(args, 0, stdout, stderr); done {
		return code
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	res, err := c.Undrain(ctx)
	if err != nil {
		fmt.Fprintln(stderr, "batonctl: undrain:", err)
		return exitFailed
	}
	fmt.Fprintf(stdout, "undrained: the host takes new clients; %d drained slot(s) got a fresh worker\n", res.Slots)
	return exitOK
}

func workers(c *admin.Client, timeout time.Duration, args []string, stdout, stderr io.Writer) int {
	cmd := newCommand("batonctl workers", "batonctl [-admin PATH] workers",
		"Prints one line per worker, for scripts: generation, slot, pid, state, clients, capacity,\n"+
			"restarts, adopted (yes/no), connected (yes/no), separated by spaces, no header.")
	if code, done := cmd.parse(args, 0, stdout, stderr); done {
		return code
	}
	st, ok := fetchStatus(c, timeout, stderr)
	if !ok {
		return exitFailed
	}
	yes := map[bool]string{true: "yes", false: "no"}
	for _, w := range st.Workers {
		fmt.Fprintf(stdout, "%d %d %d %s %d %d %d %s %s\n", w.Generation, w.Slot, w.PID, w.State, w.Clients, w.Capacity, w.Restarts, yes[w.Adopted], yes[w.Connected])
	}
	return exitOK
}

// workerTable prints the workers as status and top show them.
func workerTable(w io.Writer, st admin.Status) {
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
		state := string(x.State)
		if x.Adopted {
			state += ", adopted" // taken back after a batond crash
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%d\t%d\t%s\t%s\n", x.Generation, x.Slot, pid, state, x.Clients, x.Restarts, up, x.LastExit)
	}
	tw.Flush()
}
