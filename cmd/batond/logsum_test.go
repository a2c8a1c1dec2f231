package main

import (
	"net"
	"regexp"
	"strconv"
	"testing"
	"time"
)

// A real batond whose one worker is full closes the clients it cannot place after the queue
// timeout, and its log says so in a line or two with the count and the cause, never one line
// per client (the first after a quiet spell is said at once, the rest when the interval ends
// or, here, when batond stops).
func TestQueueTimeoutLogIsSummarized(t *testing.T) {
	g := startGateway(t, opts{workers: 1, args: []string{"-capacity", "1", "-queue-timeout", "300ms"}})
	held, err := dial(g.addr) // the worker's only place
	if err != nil {
		t.Fatal(err)
	}
	defer held.c.Close()
	const n = 50
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", g.addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		go func() {
			c.SetReadDeadline(time.Now().Add(20 * time.Second))
			c.Read(make([]byte, 1))
		}()
	}
	waitFor(t, "50 clients closed after the queue timeout", 20*time.Second, func() (bool, string) {
		st := g.status()
		return st.Gateway.Closed["no_worker"] == n, strconv.FormatUint(st.Gateway.Closed["no_worker"], 10)
	})
	held.c.Close() // nothing left to drain: the stop is quick
	g.stop()
	log := g.log.String()
	re := regexp.MustCompile(`closed (\d+) clients? after the queue timeout \(300ms\): the one worker at capacity 1`)
	lines, sum := re.FindAllStringSubmatch(log, -1), 0
	for _, m := range lines {
		k, _ := strconv.Atoi(m[1])
		sum += k
	}
	if len(lines) == 0 || len(lines) > 2 || sum != n {
		t.Errorf("%d summary lines counting %d clients, want 1 or 2 counting %d:\n%s", len(lines), sum, n, log)
	}
	for _, m := range lines {
		t.Logf("batond: %s", m[0])
	}
	if k := len(regexp.MustCompile(`(?i)closing connection|no worker available`).FindAllString(log, -1)); k > 0 {
		t.Errorf("%d lines about single clients:\n%s", k, log)
	}
}
