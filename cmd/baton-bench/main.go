// Command baton-bench is baton's benchmark harness: a load generator (storm, sessions, bulk,
// idle and reload scenarios against any TCP server on loopback), a small SO_REUSEPORT echo
// server to compare against, and the suite that bench/run drives (configurations started,
// interleaved and measured side by side; the table, results.json and plot.svg).
//
// Run `baton-bench -h` for the subcommands; see BENCHMARKS.md for the method.
package main

import (
	"os"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr)) }
