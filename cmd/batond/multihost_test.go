package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/baton-gw/baton/cmd/internal/admin"
	"github.com/baton-gw/baton/worker"
)

// The multi-host proof (issue 11, item 5): three batond "hosts", each in its own network
// namespace with its own address on a bridge the test makes, behind a real HAProxy
// (balance leastconn, send-proxy-v2, agent-check) in the root namespace, under continuous load:
// short clients at a steady rate and long sessions that echo a numbered line every 200 ms.
// Each scenario is a function; the load generator counts outcomes per phase, so a failure is charged
// to the scenario during which it happened.

// Fixed ports inside each host's namespace: every host has its own network stack, so they
// cannot collide, and a fixed port is what a reload inherits and a restart binds again.
const (
	gamePort    = 7000
	agentPort   = 7001
	metricsPort = 7002
)

const (
	checkEvery   = 500 * time.Millisecond // HAProxy's inter and agent-inter
	shortRate    = 300                    // new short clients per second, through HAProxy
	longSessions = 300                    // each echoes a numbered line every 200 ms
)

func TestMultiHost(t *testing.T) {
	start := time.Now()
	needMultiHostTools(t)
	heavyTest(t)
	build(t)
	n := newTestNet(t, 3)
	hosts := []*host{
		// The big host: twice the workers of each other host, same per-worker capacity. Its
		// workers are this test binary playing a Go worker that shows its client's address.
		{name: "h1", ns: n.hosts[0], workers: 4, kind: "go"},
		// The built-in demo game.
		{name: "h2", ns: n.hosts[1], workers: 2, kind: "demo"},
		// Python workers that show their client's address.
		{name: "h3", ns: n.hosts[2], workers: 2, kind: "python"},
	}
	for _, h := range hosts {
		h.start(t, n.bridgeIP)
	}
	hp := startHAProxy(t, n.bridgeIP, hosts)
	for _, h := range hosts {
		hp.waitStatus(t, h.name, "UP", 20*time.Second)
	}
	t.Logf("set-up: %v (network, 3 batond, HAProxy with all servers UP)", time.Since(start).Round(time.Millisecond))

	tr := startTraffic(t, hp.addr, n.hostOf)
	tr.ramp(t, shortRate, longSessions)

	spreadByCapacity(t, tr, hp, hosts)
	drainHost(t, tr, hp, hosts[1])
	reloadHost(t, tr, hosts[0])
	killHost(t, tr, hp, hosts[1])
	linkDown(t, tr, hp, hosts[2], hosts[:2])

	tot := tr.finish(t)
	if tot.rate < 0.97*shortRate {
		t.Errorf("short clients came at %.0f/s, want %d/s", tot.rate, shortRate)
	}
	realAddresses(t, tot)
	if bad := tot.all.failed + tot.all.broken - tot.byPhase["kill"].failed; bad != 0 {
		t.Errorf("%d failures outside the kill -9 window", bad)
	}
	t.Logf("multi-host totals: %s", tot)
	t.Logf("multi-host test: %v in all", time.Since(start).Round(time.Millisecond))
}

// needMultiHostTools fails (never skips in CI) when something the test needs is missing.
func needMultiHostTools(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("the multi-host test makes network namespaces and needs root; CI runs as root")
		}
		t.Skip("the multi-host test makes network namespaces and needs root")
	}
	for _, tool := range []string{"ip", "haproxy", "python3"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("the multi-host test needs %s (Debian: apt-get install iproute2 haproxy python3): %v", tool, err)
		}
	}
}

// ---------------------------------------------------------------------------------------------
// The hosts: one batond each, started inside its namespace.

type host struct {
	name    string
	ns      *nsHost
	workers int
	kind    string // "go", "demo" or "python": what its workers are
	g       *gateway
}

func (h *host) addr(port int) string { return net.JoinHostPort(h.ns.ip, strconv.Itoa(port)) }

// healthz asks the host's metrics listener whether it takes clients.
func (h *host) healthz(t *testing.T) (int, string) {
	t.Helper()
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get("http://" + h.addr(metricsPort) + "/healthz")
	if err != nil {
		t.Fatalf("%s /healthz: %v", h.name, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// start runs batond in the host's namespace (ip netns exec execs it: the pid is batond's)
// and waits until it serves. balancer is the only address PROXY headers are accepted from. The gateway helpers (status, ctl, crash, restart, stop) work on
// it as on any other: its admin socket is a path, reachable from every namespace.
func (h *host) start(t *testing.T, balancer string) {
	t.Helper()
	dir := t.TempDir()
	g := &gateway{t: t, dir: dir, log: logFile{filepath.Join(dir, "batond.log")}}
	args := []string{
		"netns", "exec", h.ns.netns, bins.batond,
		"-listen", h.addr(gamePort), "-workers", strconv.Itoa(h.workers), "-capacity", "200",
		"-socket", filepath.Join(dir, "workers.sock"), "-admin", filepath.Join(dir, "admin.sock"),
		"-pidfile", filepath.Join(dir, "batond.pid"), "-stop-timeout", "3s",
		"-start-timeout", "20s", // cold CPython starts are slow on a loaded machine
		"-proxy-protocol", "-proxy-from", balancer + "/32", // only HAProxy, on the bridge
		"-agent", h.addr(agentPort), "-metrics", h.addr(metricsPort),
	}
	var env []string
	switch h.kind {
	case "go":
		self, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		args = append(args, "--", self)
		env = []string{roleEnv + "=peer"}
	case "python":
		args = append(append(args, "--"), pythonWorker(t, "testdata/peer_worker.py")...)
	}
	g.bin, g.args, g.env = "ip", args, append(os.Environ(), env...)
	h.g = g
	g.launch()
	t.Cleanup(g.stop)
	g.admin = admin.NewClient(filepath.Join(dir, "admin.sock"))
	g.waitServing()
	waitAllReady(t, g, h.workers)
}

// peerWorker is the Go worker of the big host: like the demo game, with the client's address
// (as batond handed it over in CONN) in its greeting.
func peerWorker() int {
	l, err := worker.Listen()
	if err != nil {
		fmt.Fprintln(os.Stderr, "peer worker:", err)
		return 1
	}
	for {
		c, err := l.Accept()
		if err != nil {
			break // drained: the sessions in hand play out
		}
		go func() {
			defer c.Close()
			fmt.Fprintf(c, "baton go · worker %d · pid %d · generation %d · client %s\n", l.Slot(), os.Getpid(), l.Generation(), c.RemoteAddr())
			r := bufio.NewScanner(c)
			for r.Scan() {
				if _, err := fmt.Fprintf(c, "%s\n", r.Text()); err != nil {
					return
				}
			}
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	l.Wait(ctx)
	return 0
}

// ---------------------------------------------------------------------------------------------
// The scenarios.

// spreadByCapacity: the host with twice the capacity gets about twice the clients, counted by
// the batonds themselves. Two measures, both with the tolerance 1.5..2.7 (2 expected):
//   - clients held at once (sampled every 500 ms over the window, averaged): h1 over h2 and
//     h1 over h3; this is what leastconn with the agent's weights balances;
//   - new clients over the window: h1 over the mean of h2 and h3. Each small host alone is not
//     compared: the one that happened to get more long sessions at the start rightly gets
//     fewer new clients (it has less free capacity), which leastconn evens out.
//
// HAProxy's own health checks reach the workers too (~2/s per host): within the tolerance.
func spreadByCapacity(t *testing.T, tr *traffic, hp *haproxy, hosts []*host) {
	t.Helper()
	tr.setPhase("spread")
	const window, every = 6 * time.Second, 500 * time.Millisecond
	before := make([]uint64, len(hosts))
	for i, h := range hosts {
		before[i] = h.g.status().Gateway.Acked
	}
	seen := tr.served()
	held := make([]float64, len(hosts))
	for k := 0; k < int(window/every); k++ {
		time.Sleep(every)
		for i, h := range hosts {
			held[i] += float64(h.g.status().Clients) / float64(window/every)
		}
	}
	got := make([]float64, len(hosts))
	for i, h := range hosts {
		got[i] = float64(h.g.status().Gateway.Acked - before[i])
	}
	after := tr.served()
	if st, err := hp.stats(); err == nil {
		t.Logf("HAProxy's weights (configured x agent's free %%): h1 %d, h2 %d, h3 %d", st["h1"].weight, st["h2"].weight, st["h3"].weight)
	}
	t.Logf("spread over %v: clients held (mean) h1 %.0f, h2 %.0f, h3 %.0f; new clients counted by batond h1 %.0f, h2 %.0f, h3 %.0f (by the load generator h1 %d, h2 %d, h3 %d)",
		window, held[0], held[1], held[2], got[0], got[1], got[2], after["h1"]-seen["h1"], after["h2"]-seen["h2"], after["h3"]-seen["h3"])
	ratio := func(what string, r float64) {
		t.Logf("spread: %s = %.2f (want 1.5..2.7)", what, r)
		if r < 1.5 || r > 2.7 {
			t.Errorf("spread: %s = %.2f, want 1.5..2.7", what, r)
		}
	}
	ratio("held h1/h2", held[0]/held[1])
	ratio("held h1/h3", held[0]/held[2])
	ratio("new h1/mean(h2,h3)", got[0]/((got[1]+got[2])/2))
	if c := tr.phaseCounts("spread"); c.failed+c.broken != 0 {
		t.Errorf("spread: %s", c)
	}
}

// drainHost: a drained host gets no new clients from two agent intervals after the drain (the
// agent says "drain" at HAProxy's next check, and a client already on its way is greeted
// within 300 ms), its sessions play on, nothing fails, and /healthz says why; undrain brings
// it back.
func drainHost(t *testing.T, tr *traffic, hp *haproxy, h *host) {
	t.Helper()
	tr.setPhase("drain")
	if code, out := h.g.ctl("drain", "-host"); code != 0 {
		t.Errorf("batonctl drain -host: exit %d: %s", code, out)
		return // the other scenarios still run
	}
	time.Sleep(2*checkEvery + 300*time.Millisecond)
	hp.waitStatus(t, h.name, "DRAIN", time.Second)
	if code, body := h.healthz(t); code != 503 || !strings.HasPrefix(body, "drained") {
		t.Errorf("/healthz of drained %s: %d %q, want 503 drained", h.name, code, body)
	}
	from := tr.served()[h.name]
	time.Sleep(3 * time.Second)
	if n := tr.served()[h.name] - from; n != 0 {
		t.Errorf("drained host %s got %d new clients in 3 s", h.name, n)
	}
	if code, out := h.g.ctl("undrain"); code != 0 {
		t.Fatalf("batonctl undrain: exit %d: %s", code, out)
	}
	hp.waitStatus(t, h.name, "UP", 4*checkEvery)
	if code, body := h.healthz(t); code != 200 {
		t.Errorf("/healthz of undrained %s: %d %q, want 200", h.name, code, body)
	}
	from = tr.served()[h.name]
	waitFor(t, h.name+" to get new clients after undrain", 3*time.Second, func() (bool, string) {
		n := tr.served()[h.name] - from
		return n >= 20, fmt.Sprintf("%d new clients", n)
	})
	time.Sleep(time.Second)
	c := tr.phaseCounts("drain")
	t.Logf("drain -host %s and undrain: %s; closed by %s's gateway so far: %v", h.name, c, h.name, h.g.status().Gateway.Closed)
	if c.failed+c.broken != 0 {
		t.Errorf("drain: %s", c)
	}
}

// reloadHost: batonctl reload of one host under load fails nothing.
func reloadHost(t *testing.T, tr *traffic, h *host) {
	t.Helper()
	tr.setPhase("reload")
	gen := h.g.status().Generation
	began := time.Now()
	if code, out := h.g.ctl("reload"); code != 0 {
		t.Fatalf("batonctl reload on %s: exit %d: %s", h.name, code, out)
	}
	took := time.Since(began)
	if g := h.g.status().Generation; g != gen+1 {
		t.Errorf("after the reload %s serves generation %d, want %d", h.name, g, gen+1)
	}
	from := tr.served()[h.name]
	waitFor(t, h.name+" to serve new clients after the reload", 5*time.Second, func() (bool, string) {
		n := tr.served()[h.name] - from
		return n >= 20, fmt.Sprintf("%d new clients", n)
	})
	time.Sleep(time.Second)
	c := tr.phaseCounts("reload")
	t.Logf("reload of %s (%v): %s", h.name, took.Round(time.Millisecond), c)
	if c.failed+c.broken != 0 {
		t.Errorf("reload: %s", c)
	}
}

// maxKillFailures bounds the clients a kill -9 of batond may cost. The listening socket dies
// with batond: a connect refused from then on is retried on another host by HAProxy
// (option redispatch), so it costs nothing; what is lost are the connections the kernel had
// queued in the dead listener's backlog and those batond had accepted but not handed over yet
// (at ~75 new clients/s on this host and a few ms from accept to handoff: a handful). The
// bound leaves room for a loaded machine.
const maxKillFailures = 25

// killHost: kill -9 of one host's batond loses none of its sessions and at most
// maxKillFailures new clients; restarted, it adopts its workers and serves again.
func killHost(t *testing.T, tr *traffic, hp *haproxy, h *host) {
	t.Helper()
	tr.setPhase("kill")
	pids := workerPIDs(h.g.status())
	h.g.crash()
	hp.waitStatus(t, h.name, "DOWN", 10*checkEvery)
	h.g.restart()
	hp.waitStatus(t, h.name, "UP", 10*checkEvery)
	// The design's promise (adoption): the same workers serve again, and no fresh ones start.
	// Checked without stopping the test: the sessions and clients below are what item 5 asks.
	var now []int
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if now = workerPIDs(h.g.status()); fmt.Sprint(now) == fmt.Sprint(pids) {
			break
		}
	}
	if fmt.Sprint(now) != fmt.Sprint(pids) {
		t.Errorf("%s after the restart runs workers %v, want the adopted %v only", h.name, now, pids)
	}
	from := tr.served()[h.name]
	waitFor(t, h.name+" to serve new clients after its restart", 5*time.Second, func() (bool, string) {
		n := tr.served()[h.name] - from
		return n >= 20, fmt.Sprintf("%d new clients", n)
	})
	time.Sleep(time.Second)
	c := tr.phaseCounts("kill")
	t.Logf("kill -9 of %s's batond and restart: %s (bound on failed clients: %d)", h.name, c, maxKillFailures)
	if c.broken != 0 {
		t.Errorf("kill -9: %d sessions broken", c.broken)
	}
	if c.failed > maxKillFailures {
		t.Errorf("kill -9: %d clients failed, more than %d", c.failed, maxKillFailures)
	}
}

// workerPIDs lists the pids of a status's workers, sorted.
func workerPIDs(st admin.Status) []int {
	var pids []int
	for _, w := range st.Workers {
		pids = append(pids, w.PID)
	}
	sort.Ints(pids)
	return pids
}

// linkDown: with a host's link down, HAProxy marks it down and new clients go to the others;
// sessions on the other hosts are unaffected (those on the dead host are not counted: no
// gateway can keep a session over a dead link).
func linkDown(t *testing.T, tr *traffic, hp *haproxy, h *host, others []*host) {
	t.Helper()
	tr.setPhase("link down")
	tr.mu.Lock()
	tr.cutHost = h.name
	tr.mu.Unlock()
	ipCmd(t, "link", "set", h.ns.veth, "down")
	began := time.Now()
	hp.waitStatus(t, h.name, "DOWN", 10*checkEvery)
	t.Logf("HAProxy marked %s DOWN %v after its link went down", h.name, time.Since(began).Round(time.Millisecond))
	time.Sleep(300 * time.Millisecond) // clients already on their way
	from := tr.served()
	time.Sleep(3 * time.Second)
	to := tr.served()
	if d := to[h.name] - from[h.name]; d != 0 {
		t.Errorf("%s (link down, marked DOWN) got %d new clients", h.name, d)
	}
	for _, o := range others {
		if d := to[o.name] - from[o.name]; d < 100 {
			t.Errorf("%s got only %d new clients in 3 s while %s was down", o.name, d, h.name)
		}
	}
	c := tr.phaseCounts("link down")
	t.Logf("link of %s down: %s", h.name, c)
	if c.failed+c.broken != 0 {
		t.Errorf("link down: failures on the hosts that are up: %s", c)
	}
	ipCmd(t, "link", "set", h.ns.veth, "up")
	hp.waitStatus(t, h.name, "UP", 10*checkEvery)
}

// realAddresses: the Go and the Python workers saw the client addresses HAProxy accepted
// (127.0.0.1:port), from PROXY v2, never HAProxy's own address on the bridge.
func realAddresses(t *testing.T, tot totals) {
	t.Helper()
	for _, kind := range []string{"go", "python"} {
		if tot.addrSeen[kind] < 100 {
			t.Errorf("%s workers showed a client address %d times; want at least 100", kind, tot.addrSeen[kind])
		}
		if tot.addrBad[kind] != 0 {
			t.Errorf("%s workers saw the wrong client address %d times of %d", kind, tot.addrBad[kind], tot.addrSeen[kind])
		}
	}
}
