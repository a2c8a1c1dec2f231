// Command batond is baton's gateway: it accepts TCP clients and hands each connected socket to
// the least-loaded worker process, supervising the workers. See the README and `batond -h`.
package main

import (
	"os"

	"github.com/baton-gw/baton/cmd/internal/daemon"
)

func main() { os.Exit(daemon.Main(os.Args, os.Stderr)) }
