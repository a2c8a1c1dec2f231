// Command batonctl talks to a running batond over its admin socket: status, and (as batond
// grows them) reload and drain. Usage errors print usage and exit 2.
package main

import (
	"os"

	"github.com/baton-gw/baton/cmd/internal/ctl"
)

func main() { os.Exit(ctl.Main(os.Args[1:], os.Stdout, os.Stderr)) }
