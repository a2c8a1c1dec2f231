package main

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// The multi-host test's load generator.

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
	rate     float64          // short clients started per second, once stopped
	echoes   int64            // lines the long sessions got back
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

// shortClients starts short clients at rate per second until stopped: every 10 ms, as many as
// are due since it began, so that a late wake-up on a loaded machine does not lower the rate.
func (tr *traffic) shortClients(rate int) {
	defer tr.wg.Done()
	var inflight sync.WaitGroup
	defer inflight.Wait()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	began, started := time.Now(), 0
	defer func() {
		tr.mu.Lock()
		tr.rate = float64(started) / time.Since(began).Seconds()
		tr.mu.Unlock()
	}()
	for started < rate*int(maxRun/time.Second) {
		select {
		case <-tr.stop:
			return
		case <-tick.C:
		}
		for due := int(time.Since(began).Seconds() * float64(rate)); started < due; started++ {
			inflight.Add(1)
			go func() {
				defer inflight.Done()
				tr.shortClient()
			}()
		}
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
		tr.mu.Lock()
		tr.echoes++
		tr.mu.Unlock()
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
	rate     float64
	echoes   int64
	notes    []string
}

func (t totals) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "short clients (%.0f/s) %d ok / %d failed; long sessions %v, %d lines echoed, %d broken; %d cut by the dead link; short clients by host %v; client addresses checked %v, wrong %v",
		t.rate, t.all.ok, t.all.failed, t.sessOn, t.echoes, t.all.broken, t.all.cut, t.perHost, t.addrSeen, t.addrBad)
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
	tot := totals{byPhase: map[string]outcomes{}, phases: tr.phases, perHost: tr.perHost, sessOn: tr.sessOn, addrSeen: tr.addrSeen, addrBad: tr.addrBad, rate: tr.rate, echoes: tr.echoes, notes: tr.notes}
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
