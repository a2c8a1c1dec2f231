package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// Worker output outlives the batond that started the worker. A Go, a Python and a sh-launched
// worker each print a line per message, with SIGPIPE at its default: across 5 reloads and a
// kill -9 of batond (no systemd: the output goes through pipes) every session keeps working and
// every line reaches batond's log under the worker's generation, slot and pid.
func TestWorkerOutputAcrossReloadsAndCrash(t *testing.T) {
	self, _ := os.Executable()
	py := pythonWorker(t, "testdata/printer.py")
	for _, c := range []struct {
		name string
		cmd  []string
		env  []string
	}{
		{"go", []string{self}, []string{roleEnv + "=printer"}},
		{"python", py, nil},
		{"sh", []string{"sh", "-c", "echo launcher up; python3 " + py[1] + "; echo launcher done"}, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := startGateway(t, opts{workers: 2, command: c.cmd, env: c.env, args: append([]string{"-drain-timeout", "5m"}, pythonArgs...)})
			var ps []*printerSession
			open := func(n int) {
				for i := 0; i < n; i++ {
					ps = append(ps, dialPrinter(t, g.addr, len(ps)))
				}
			}
			var want []*regexp.Regexp
			round := func(k int) {
				for _, p := range ps {
					want = append(want, p.say(t, k))
				}
			}
			open(4)
			round(0)
			for k := 1; k <= 5; k++ {
				if code, out := g.ctl("reload"); code != 0 {
					t.Fatalf("reload %d: exit %d: %s", k, code, out)
				}
				open(2)
				round(k)
			}
			logged := func(what string) {
				waitFor(t, what, 30*time.Second, func() (bool, string) {
					log := g.log.String()
					for _, re := range want {
						if !re.MatchString(log) {
							return false, "missing " + re.String()
						}
					}
					return true, ""
				})
			}
			// What a batond has read but not yet written when it is killed is lost with it (at
			// most one read); the crash below is about what workers write while none runs.
			logged("every line of the reloads in batond's log under its worker's generation")
			g.crash()
			round(6) // no batond at all: the workers serve on, their lines wait in the pipes
			g.restart()
			open(2)
			round(7)
			logged("every line written while batond was down, and after, in the restarted batond's log")
			if c.name == "sh" && !strings.Contains(g.log.String(), "launcher up") {
				t.Error("the launcher's own line is missing from the log")
			}
		})
	}
}

// printerSession is one client of a printer worker.
type printerSession struct {
	n         int
	c         net.Conn
	r         *bufio.Reader
	gen, slot string
	pid       string
}

var printerHello = regexp.MustCompile(`^printer gen=(\d+) slot=(\d+) pid=(\d+)$`)

func dialPrinter(t *testing.T, addr string, n int) *printerSession {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	p := &printerSession{n: n, c: c, r: bufio.NewReader(c)}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	line, err := p.r.ReadString('\n')
	m := printerHello.FindStringSubmatch(strings.TrimSpace(line))
	if err != nil || m == nil {
		t.Fatalf("session %d: greeting %q: %v", n, line, err)
	}
	p.gen, p.slot, p.pid = m[1], m[2], m[3]
	return p
}

// say sends round k's message, checks the echo, and returns the log line it must produce:
// under the logger of the worker's generation and slot (the pid in the logger's name is the
// process batond spawned or admitted, the launcher's for the first batond of a sh worker).
func (p *printerSession) say(t *testing.T, k int) *regexp.Regexp {
	t.Helper()
	msg := fmt.Sprintf("session %d round %d", p.n, k)
	p.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(p.c, "%s\n", msg); err != nil {
		t.Fatalf("session %d (gen %s pid %s) round %d: %v", p.n, p.gen, p.pid, k, err)
	}
	line, err := p.r.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != msg {
		t.Fatalf("session %d (gen %s pid %s) round %d: echo %q, %v", p.n, p.gen, p.pid, k, line, err)
	}
	return regexp.MustCompile(fmt.Sprintf(`supervisor\.gen%s\.slot%s\.pid\d+: printer gen=%s slot=%s pid=%s: %s\b`,
		p.gen, p.slot, p.gen, p.slot, p.pid, regexp.QuoteMeta(msg)))
}
