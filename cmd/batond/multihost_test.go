package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/csv"
	"encoding/hex"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/baton-gw/baton/cmd/internal/admin"
	"github.com/baton-gw/baton/worker"
)

// The multi-host proof (issue 11, item 5): three batond "hosts", each in its own network
// namespace with its own address on a bridge the test makes, behind a real HAProxy
// (balance leastconn, send-proxy-v2, agent-check) in the root namespace, under continuous load:
// short clients at a steady rate and long sessions that echo a numbered line every 200 ms.
// Each scenario is a function; the load generator outcomes per phase, so a failure is charged
// to the scenario during which it happened.

// Fixed ports inside each host's namespace: every host has its own network stack, so they
// cannot collide, and a fixed port is what a reload inherits and a restart binds again.
const (
	gamePort    = 7000
	agentPort   = 7001
	metricsPort = 7002
	checkEvery  = 500 * time.Millisecond // HAProxy's inter and agent-inter
)

func TestMultiHost(t *testing.T) {
	start := time.Now()
	needMultiHostTools(t)
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
	tr.ramp(t, 300, 300)

	spreadByCapacity(t, tr, hp, hosts)
	if os.Getenv("MH_NODRAIN") == "" {
		drainHost(t, tr, hp, hosts[1])
	}
	reloadHost(t, tr, hosts[0])
	killHost(t, tr, hp, hosts[1])
	linkDown(t, tr, hp, n, hosts[2], hosts[:2])

	tot := tr.finish(t)
	realAddresses(t, tot)
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
// The network: a bridge in the root namespace and one namespace per host on a veth pair.

type testNet struct {
	id       string // random suffix of every name, so that concurrent runs cannot collide
	bridge   string
	bridgeIP string
	hosts    []*nsHost
	inodes   map[uint64]string // network namespace inode -> host name (see hostOf)
	pidHost  sync.Map          // pid -> host name, cached
}

type nsHost struct {
	netns string // ip netns name
	veth  string // root end, on the bridge
	peer  string // namespace end
	ip    string
}

// ipCmd runs ip(8) and fails the test with its output.
func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// newTestNet makes the bridge 10.77.N.1/24 and n namespaces at 10.77.N.11, .12, ... on it,
// with N a /24 no route of this machine uses yet. Everything is deleted at cleanup.
func newTestNet(t *testing.T, n int) *testNet {
	t.Helper()
	b := make([]byte, 3)
	rand.Read(b)
	id := hex.EncodeToString(b)
	subnet := freeSubnet(t)
	tn := &testNet{id: id, bridge: "btb" + id, bridgeIP: fmt.Sprintf("10.77.%d.1", subnet), inodes: map[uint64]string{}}
	t.Cleanup(tn.remove)
	ipCmd(t, "link", "add", tn.bridge, "type", "bridge")
	ipCmd(t, "addr", "add", tn.bridgeIP+"/24", "dev", tn.bridge)
	ipCmd(t, "link", "set", tn.bridge, "up")
	for i := 1; i <= n; i++ {
		h := &nsHost{
			netns: fmt.Sprintf("baton-%s-h%d", id, i),
			veth:  fmt.Sprintf("btv%sh%d", id, i),
			peer:  fmt.Sprintf("btp%sh%d", id, i),
			ip:    fmt.Sprintf("10.77.%d.%d", subnet, 10+i),
		}
		tn.hosts = append(tn.hosts, h)
		ipCmd(t, "netns", "add", h.netns)
		ipCmd(t, "link", "add", h.veth, "type", "veth", "peer", "name", h.peer, "netns", h.netns)
		ipCmd(t, "link", "set", h.veth, "master", tn.bridge, "up")
		ipCmd(t, "-n", h.netns, "addr", "add", h.ip+"/24", "dev", h.peer)
		ipCmd(t, "-n", h.netns, "link", "set", h.peer, "up")
		ipCmd(t, "-n", h.netns, "link", "set", "lo", "up")
		var st syscall.Stat_t
		if err := syscall.Stat("/run/netns/"+h.netns, &st); err != nil {
			t.Fatal(err)
		}
		tn.inodes[st.Ino] = fmt.Sprintf("h%d", i)
	}
	return tn
}

// freeSubnet picks N for 10.77.N.0/24 that no address or route of this machine uses.
func freeSubnet(t *testing.T) int {
	t.Helper()
	out, err := exec.Command("ip", "-4", "route", "show", "table", "all").CombinedOutput()
	if err != nil {
		t.Fatalf("ip route: %v\n%s", err, out)
	}
	for i := 0; i < 50; i++ {
		r, _ := rand.Int(rand.Reader, big.NewInt(250))
		n := int(r.Int64()) + 2
		if !strings.Contains(string(out), fmt.Sprintf("10.77.%d.", n)) {
			return n
		}
	}
	t.Fatal("no free 10.77.N.0/24 after 50 tries")
	return 0
}

// remove deletes what newTestNet made (deleting a namespace deletes the veth pair in it).
func (tn *testNet) remove() {
	for _, h := range tn.hosts {
		exec.Command("ip", "netns", "delete", h.netns).Run()
		exec.Command("ip", "link", "delete", h.veth).Run() // gone already, unless the move failed
	}
	exec.Command("ip", "link", "delete", tn.bridge).Run()
}

// hostOf names the host whose namespace pid runs in ("?" if it is gone or none of ours).
func (tn *testNet) hostOf(pid int) string {
	if v, ok := tn.pidHost.Load(pid); ok {
		return v.(string)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err != nil {
		return "?"
	}
	name, ok := tn.inodes[st.Ino]
	if !ok {
		return "?"
	}
	tn.pidHost.Store(pid, name)
	return name
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
// HAProxy, in the root namespace.

type haproxy struct {
	addr   string // where clients connect (127.0.0.1)
	sock   string // stats socket
	cmd    *exec.Cmd
	log    logFile
	exited chan struct{}
}

// haproxyConfig is the configuration the README shows. Weights are relative: an agent reply
// "N%" scales the server's configured weight, so each host's weight is its total capacity
// (workers x capacity / 8) and the agent's percentage of free capacity steers from there.
// option redispatch with retries sends a client whose connect to a dead host fails to
// another host at once, instead of failing it, during the check interval in which HAProxy
// does not know yet.
func haproxyConfig(listen, sock string, hosts []*host) string {
	var b strings.Builder
	fmt.Fprintf(&b, `global
    maxconn 4000
    stats socket %s mode 600 level admin

defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    retries 3
    option redispatch 1

listen baton
    bind %s
    balance leastconn
    default-server send-proxy-v2 check inter %dms fall 2 rise 2 agent-check agent-port %d agent-inter %dms
`, sock, listen, checkEvery.Milliseconds(), agentPort, checkEvery.Milliseconds())
	for _, h := range hosts {
		fmt.Fprintf(&b, "    server %s %s weight %d\n", h.name, h.addr(gamePort), h.workers*200/8)
	}
	return b.String()
}

func startHAProxy(t *testing.T, bridgeIP string, hosts []*host) *haproxy {
	t.Helper()
	dir := t.TempDir()
	hp := &haproxy{addr: freeLoopbackAddr(t), sock: filepath.Join(dir, "haproxy.sock"), log: logFile{filepath.Join(dir, "haproxy.log")}}
	cfg := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(haproxyConfig(hp.addr, hp.sock, hosts)), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(hp.log.path)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	hp.cmd = exec.Command("haproxy", "-db", "-f", cfg)
	hp.cmd.Stdout, hp.cmd.Stderr = logf, logf
	if err := hp.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	hp.exited = make(chan struct{})
	go func() { hp.cmd.Wait(); close(hp.exited) }()
	t.Cleanup(func() {
		hp.cmd.Process.Kill()
		<-hp.exited
		if t.Failed() {
			t.Logf("haproxy config:\n%s\nhaproxy log:\n%s", haproxyConfig(hp.addr, hp.sock, hosts), hp.log)
		}
	})
	waitFor(t, "HAProxy's stats socket", 10*time.Second, func() (bool, string) {
		select {
		case <-hp.exited:
			t.Fatalf("haproxy exited:\n%s", hp.log)
		default:
		}
		_, err := hp.stats()
		return err == nil, fmt.Sprint(err)
	})
	return hp
}

// freeLoopbackAddr returns 127.0.0.1:PORT with a port free a moment ago.
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// serverStat is one server's row of HAProxy's "show stat".
type serverStat struct {
	status string // UP, DOWN, DRAIN, MAINT, "UP 1/2", ...
	weight int
	total  int // sessions HAProxy sent it (stot)
}

// stats asks HAProxy's stats socket for its servers.
func (hp *haproxy) stats() (map[string]serverStat, error) {
	c, err := net.DialTimeout("unix", hp.sock, 2*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "show stat\n"); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return nil, err
	}
	rows, err := csv.NewReader(strings.NewReader(strings.TrimPrefix(string(b), "# "))).ReadAll()
	if err != nil || len(rows) == 0 {
		return nil, fmt.Errorf("show stat: %v: %q", err, b)
	}
	col := map[string]int{}
	for i, name := range rows[0] {
		col[name] = i
	}
	out := map[string]serverStat{}
	for _, r := range rows[1:] {
		if len(r) < len(rows[0]) || r[col["svname"]] == "FRONTEND" || r[col["svname"]] == "BACKEND" {
			continue
		}
		w, _ := strconv.Atoi(r[col["weight"]])
		n, _ := strconv.Atoi(r[col["stot"]])
		out[r[col["svname"]]] = serverStat{status: r[col["status"]], weight: w, total: n}
	}
	return out, nil
}

// waitStatus waits until HAProxy shows server name with a status that starts with want.
func (hp *haproxy) waitStatus(t *testing.T, name, want string, d time.Duration) {
	t.Helper()
	waitFor(t, fmt.Sprintf("HAProxy to see %s %s", name, want), d, func() (bool, string) {
		st, err := hp.stats()
		if err != nil {
			return false, err.Error()
		}
		return strings.HasPrefix(st[name].status, want), fmt.Sprintf("%+v", st)
	})
}

// ---------------------------------------------------------------------------------------------
// The load generator.

// traffic keeps up the load through HAProxy: short clients at a steady rate (connect, read
// the greeting, echo a line, close) and long sessions (echo a numbered line every 200 ms and
// check every answer). Every outcome is counted in the phase during which it happened.
type traffic struct {
	addr   string
	hostOf func(pid int) string
	stop   chan struct{}
	wg     sync.WaitGroup

	mu       sync.Mutex
	phase    string
	byPhase  map[string]*outcomes
	phases   []string         // in order, for the log
	perHost  map[string]int64 // short clients served, by host (from the greeting's pid)
	sessOn   map[string]int   // live sessions by host
	cutHost  string           // a host whose link is down: its sessions may be cut
	notes    []string         // the first failures, for the log
	addrSeen map[string]int   // greetings with a client address, by worker kind
	addrBad  map[string]int   // ... whose address is not the client's
}

// outcomes are one phase's outcomes.
type outcomes struct {
	ok     int64 // short clients served
	failed int64 // short clients that failed (connect, greeting or echo)
	broken int64 // long sessions that failed
	cut    int64 // sessions and clients on a host whose link is down (not baton's failures)
}

func (c outcomes) String() string {
	return fmt.Sprintf("%d ok, %d failed, %d sessions broken, %d cut by a dead link", c.ok, c.failed, c.broken, c.cut)
}

func startTraffic(t *testing.T, addr string, hostOf func(int) string) *traffic {
	tr := &traffic{
		addr: addr, hostOf: hostOf, stop: make(chan struct{}),
		byPhase: map[string]*outcomes{}, perHost: map[string]int64{}, sessOn: map[string]int{},
		addrSeen: map[string]int{}, addrBad: map[string]int{},
	}
	tr.setPhase("ramp")
	t.Cleanup(func() {
		select {
		case <-tr.stop:
		default:
			close(tr.stop)
			tr.wg.Wait()
		}
	})
	return tr
}

const (
	maxRun     = 4 * time.Minute        // bounds every loop of the load generator
	shortVisit = 500 * time.Millisecond // how long a short client stays
)

// ramp opens n long sessions, then starts short clients at rate per second. The sessions come
// first and alone, so that leastconn spreads them exactly by weight: a host that starts with
// a few sessions more than its share would rightly get fewer new clients for the rest of the
// test, and blur the spread measured later.
func (tr *traffic) ramp(t *testing.T, rate, n int) {
	t.Helper()
	opened := make(chan bool, n)
	for i := 0; i < n; i++ {
		tr.wg.Add(1)
		go tr.session(i, opened)
		time.Sleep(2 * time.Millisecond)
	}
	ok := 0
	for i := 0; i < n; i++ {
		if <-opened {
			ok++
		}
	}
	tr.mu.Lock()
	t.Logf("%d long sessions open: %v", ok, tr.sessOn)
	tr.mu.Unlock()
	if ok != n {
		t.Fatalf("only %d of %d sessions could open: %v", ok, n, tr.notes)
	}
	tr.wg.Add(1)
	go tr.shortClients(rate)
	time.Sleep(time.Second) // short clients at their steady state
}

func (tr *traffic) setPhase(p string) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.phase = p
	if tr.byPhase[p] == nil {
		tr.byPhase[p] = &outcomes{}
		tr.phases = append(tr.phases, p)
	}
}

// record outcomes one outcome in the current phase.
func (tr *traffic) record(f func(c *outcomes), note string) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	f(tr.byPhase[tr.phase])
	if note != "" && len(tr.notes) < 30 {
		tr.notes = append(tr.notes, tr.phase+": "+note)
	}
}

// phaseCounts returns a copy of the outcomes of phase p.
func (tr *traffic) phaseCounts(p string) outcomes {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if c := tr.byPhase[p]; c != nil {
		return *c
	}
	return outcomes{}
}

// served returns a copy of the short clients served per host so far.
func (tr *traffic) served() map[string]int64 {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	m := map[string]int64{}
	for k, v := range tr.perHost {
		m[k] = v
	}
	return m
}

func (tr *traffic) shortClients(rate int) {
	defer tr.wg.Done()
	var inflight sync.WaitGroup
	defer inflight.Wait()
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	for i := 0; i < rate*int(maxRun/time.Second); i++ {
		select {
		case <-tr.stop:
			return
		case <-tick.C:
		}
		inflight.Add(1)
		go func() {
			defer inflight.Done()
			tr.shortClient()
		}()
	}
}

func (tr *traffic) shortClient() {
	c, err := dial(tr.addr)
	if err != nil {
		tr.record(func(c *outcomes) { c.failed++ }, "connect: "+err.Error())
		return
	}
	defer c.c.Close()
	host := tr.greeted(c)
	// A short visit, not an instant one: leastconn balances the connections open at once, so
	// with many in flight (~150) the arrivals split like the open connections, by weight; with
	// a handful, a difference of a few long sessions would decide where they all go.
	time.Sleep(shortVisit)
	if err := c.echo("ping"); err != nil {
		tr.lost(host, func(c *outcomes) { c.failed++ }, fmt.Sprintf("client on %s (%s): %v", host, c.greeting, err))
		return
	}
	tr.record(func(c *outcomes) { c.ok++ }, "")
}

// greeted outcomes a new client on its host and checks the client address its worker saw.
func (tr *traffic) greeted(c *client) string {
	_, pid := c.worker()
	host := tr.hostOf(pid)
	kind, seen := greetingKind(c.greeting), greetingField(c.greeting, "client")
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.perHost[host]++
	if seen != "" {
		tr.addrSeen[kind]++
		if want := c.c.LocalAddr().String(); seen != want {
			tr.addrBad[kind]++
			if len(tr.notes) < 30 {
				tr.notes = append(tr.notes, fmt.Sprintf("%s worker saw client %s, not %s", kind, seen, want))
			}
		}
	}
	return host
}

// lost outcomes a failure, as cut if its host's link is down.
func (tr *traffic) lost(host string, f func(c *outcomes), note string) {
	tr.mu.Lock()
	cut := tr.cutHost != "" && tr.cutHost == host
	tr.mu.Unlock()
	if cut {
		tr.record(func(c *outcomes) { c.cut++ }, "")
		return
	}
	tr.record(f, note)
}

// session is one long session: it echoes a numbered line every 200 ms until stopped.
func (tr *traffic) session(i int, opened chan<- bool) {
	defer tr.wg.Done()
	c, err := dial(tr.addr)
	if err != nil {
		tr.record(func(c *outcomes) { c.broken++ }, fmt.Sprintf("session %d: connect: %v", i, err))
		opened <- false
		return
	}
	defer c.c.Close()
	_, pid := c.worker()
	host := tr.hostOf(pid)
	tr.mu.Lock()
	tr.sessOn[host]++
	tr.mu.Unlock()
	opened <- true
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for k := 0; k < int(maxRun/(200*time.Millisecond)); k++ {
		if err := c.echo(fmt.Sprintf("session %d line %d", i, k)); err != nil {
			tr.lost(host, func(c *outcomes) { c.broken++ }, fmt.Sprintf("session %d on %s (%s) at line %d: %v", i, host, c.greeting, k, err))
			return
		}
		select {
		case <-tr.stop:
			return
		case <-tick.C:
		}
	}
}

// totals is what the load generator saw over the whole test.
type totals struct {
	byPhase  map[string]outcomes
	phases   []string
	all      outcomes
	perHost  map[string]int64
	sessOn   map[string]int
	addrSeen map[string]int
	addrBad  map[string]int
	notes    []string
}

func (t totals) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "short clients %d ok / %d failed; long sessions %v, %d broken; %d cut by the dead link; short clients by host %v; client addresses checked %v, wrong %v",
		t.all.ok, t.all.failed, t.sessOn, t.all.broken, t.all.cut, t.perHost, t.addrSeen, t.addrBad)
	for _, p := range t.phases {
		fmt.Fprintf(&b, "\n  %-10s %s", p, t.byPhase[p])
	}
	return b.String()
}

// finish stops the load (sessions answer one last time first) and returns the totals.
func (tr *traffic) finish(t *testing.T) totals {
	t.Helper()
	tr.setPhase("end")
	time.Sleep(500 * time.Millisecond)
	close(tr.stop)
	tr.wg.Wait()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tot := totals{byPhase: map[string]outcomes{}, phases: tr.phases, perHost: tr.perHost, sessOn: tr.sessOn, addrSeen: tr.addrSeen, addrBad: tr.addrBad, notes: tr.notes}
	for p, c := range tr.byPhase {
		tot.byPhase[p] = *c
		tot.all.ok += c.ok
		tot.all.failed += c.failed
		tot.all.broken += c.broken
		tot.all.cut += c.cut
	}
	if len(tr.notes) > 0 {
		t.Logf("first failures:\n  %s", strings.Join(tr.notes, "\n  "))
	}
	return tot
}

// greetingField returns the value after key in a greeting "a · key value · ...".
func greetingField(greeting, key string) string {
	for _, part := range strings.Split(greeting, " · ") {
		if v, ok := strings.CutPrefix(part, key+" "); ok {
			return v
		}
	}
	return ""
}

// greetingKind is the worker kind a greeting names: "go", "python" or "demo".
func greetingKind(greeting string) string {
	kind, _, _ := strings.Cut(strings.TrimPrefix(greeting, "baton "), " ")
	return kind
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

// drainHost: a drained host gets no new clients within two agent intervals, its sessions play
// on, nothing fails; undrain brings it back.
func drainHost(t *testing.T, tr *traffic, hp *haproxy, h *host) {
	t.Helper()
	tr.setPhase("drain")
	if code, out := h.g.ctl("drain", "-host"); code != 0 {
		t.Fatalf("batonctl drain -host: exit %d: %s", code, out)
	}
	time.Sleep(2*checkEvery + 300*time.Millisecond) // two agent intervals, and in-flight greetings
	hp.waitStatus(t, h.name, "DRAIN", time.Second)
	from := tr.served()[h.name]
	time.Sleep(3 * time.Second)
	if n := tr.served()[h.name] - from; n != 0 {
		t.Errorf("drained host %s got %d new clients in 3 s", h.name, n)
	}
	if code, out := h.g.ctl("undrain"); code != 0 {
		t.Fatalf("batonctl undrain: exit %d: %s", code, out)
	}
	hp.waitStatus(t, h.name, "UP", 4*checkEvery)
	from = tr.served()[h.name]
	waitFor(t, h.name+" to get new clients after undrain", 3*time.Second, func() (bool, string) {
		n := tr.served()[h.name] - from
		return n >= 20, fmt.Sprintf("%d new clients", n)
	})
	time.Sleep(time.Second)
	c := tr.phaseCounts("drain")
	t.Logf("drain -host %s: %s", h.name, c)
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
	h.g.crash()
	hp.waitStatus(t, h.name, "DOWN", 10*checkEvery)
	h.g.restart()
	hp.waitStatus(t, h.name, "UP", 10*checkEvery)
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

// linkDown: with a host's link down, HAProxy marks it down and new clients go to the others;
// sessions on the other hosts are unaffected (those on the dead host are not counted: no
// gateway can keep a session over a dead link).
func linkDown(t *testing.T, tr *traffic, hp *haproxy, n *testNet, h *host, others []*host) {
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
	if bad := tot.all.failed + tot.all.broken - tot.byPhase["kill"].failed; bad != 0 {
		t.Errorf("%d failures outside the kill -9 window", bad)
	}
}
