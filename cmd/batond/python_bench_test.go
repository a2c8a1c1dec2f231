package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-gw/baton/supervisor"
)

// BenchmarkPythonLobby measures examples/python/lobby.py accepting directly on its own port
// (--direct: plain asyncio.start_server, no baton) next to the same lobby behind batond (with 1
// and with 2 Python workers), in one run:
//
//	go test -run '^$' -bench PythonLobby -benchtime 2s ./cmd/batond/
//
// sessions/<server>: short sessions (connect, read the first greeting line, close with RST so
// that TIME_WAIT does not pile up), 4×GOMAXPROCS clients in parallel; metric sessions/s.
//
// rtt64/<server>: round trips on one established session. The request is a 64-byte line,
// "/ping" padded with a space and 'x's ("/ping xxx…x\n"); the lobby answers it "pong\n" through
// its ordinary command path (the 6-byte "/ping\n" takes a shorter one). A 64-byte chat line in a
// room of one would do as well, but chat is rate-limited to 10 lines a second, so it cannot be
// measured in a loop; lobby.py is not changed for the benchmark. Metrics: rtt-µs-p50 and
// rtt-µs-p99 (ns/op is the mean).
//
// Every server is started once, before the sub-benchmarks, and stopped after them.
func BenchmarkPythonLobby(b *testing.B) {
	lobby := pythonWorker(b, lobbyScript)
	if err := inTestT(func(t *testing.T) { build(t) }); err != nil {
		b.Fatalf("build: %v", err)
	}
	type server struct{ name, addr string }
	var servers []server

	addr := freeAddr(b)
	direct := exec.Command(lobby[0], lobby[1], "--direct", addr, "--log-level", "warning")
	direct.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := direct.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		syscall.Kill(-direct.Process.Pid, syscall.SIGTERM)
		done := make(chan struct{})
		go func() { direct.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-direct.Process.Pid, syscall.SIGKILL)
			<-done
		}
	}()
	waitDialLong(b, addr, 30*time.Second)
	servers = append(servers, server{"direct", addr})

	for _, n := range []int{1, 2} {
		g := startBenchGateway(b, n, lobby)
		servers = append(servers, server{fmt.Sprintf("baton-%dw", n), g.addr})
	}

	b.Run("sessions", func(b *testing.B) {
		for _, s := range servers {
			b.Run(s.name, func(b *testing.B) { lobbySessions(b, s.addr) })
		}
	})
	b.Run("rtt64", func(b *testing.B) {
		for _, s := range servers {
			b.Run(s.name, func(b *testing.B) { lobbyRTT(b, s.addr) })
		}
	})
}

// inTestT runs f with a bare testing.T on its own goroutine (the harness helpers take a
// *testing.T; a benchmark has none) and turns a failure into an error. A bare T panics when it
// logs, so a failure shows as that panic, not as the helper's message.
func inTestT(f func(t *testing.T)) (err error) {
	t := &testing.T{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("harness helper failed (run the tests for its message): %v", r)
			}
		}()
		f(t)
	}()
	<-done
	if err == nil && t.Failed() {
		err = fmt.Errorf("harness helper failed (run the tests for its message)")
	}
	return err
}

// startBenchGateway starts batond with n lobby workers and waits until they are ready and idle;
// it is stopped (and its temporary directory removed) when b ends.
func startBenchGateway(b *testing.B, n int, lobby []string) *gateway {
	var g *gateway
	err := inTestT(func(t *testing.T) {
		g = startGateway(t, opts{workers: n, command: lobby, args: append([]string{"-log-level", "warn"}, pythonArgs...)})
	})
	if err != nil {
		b.Fatalf("batond with %d Python workers: %v", n, err)
	}
	b.Cleanup(func() {
		if err := inTestT(func(*testing.T) { g.stop() }); err != nil {
			b.Errorf("stopping batond: %v\n%s", err, g.log.String())
		}
		// The bare T never runs its cleanups: remove its temporary directory here.
		if parent := filepath.Dir(g.dir); strings.HasPrefix(parent, os.TempDir()+string(os.PathSeparator)) {
			os.RemoveAll(parent)
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		var ready, clients int
		err := inTestT(func(*testing.T) {
			st := g.status()
			clients = st.Clients
			for _, w := range st.Workers {
				if w.State == supervisor.StateReady {
					ready++
				}
			}
		})
		if err != nil {
			b.Fatalf("status: %v", err)
		}
		if ready == n && clients == 0 {
			return g
		}
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d workers ready, %d clients after 30s:\n%s", ready, n, clients, g.log.String())
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func waitDialLong(b *testing.B, addr string, d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	b.Fatalf("nothing listens on %s after %v", addr, d)
}

// lobbySessions: connect, read the first greeting line, close; in parallel.
func lobbySessions(b *testing.B, addr string) {
	b.SetParallelism(4)
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, 512)
		for pb.Next() {
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				b.Error(err)
				return
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			got := 0
			for !bytes.Contains(buf[:got], []byte("\n")) && got < len(buf) {
				n, err := c.Read(buf[got:])
				got += n
				if err != nil {
					b.Errorf("greeting: %v after %q", err, buf[:got])
					break
				}
			}
			if !bytes.HasPrefix(buf[:got], []byte("welcome to the baton lobby")) {
				b.Errorf("greeting %q", buf[:got])
			}
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "sessions/s")
}

// lobbyRTT: b.N round trips of a 64-byte request on one session.
func lobbyRTT(b *testing.B, addr string) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	r := bufio.NewReader(c)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	for range 2 { // the greeting
		if _, err := r.ReadString('\n'); err != nil {
			b.Fatal(err)
		}
	}
	req := []byte("/ping " + strings.Repeat("x", 57) + "\n")
	if len(req) != 64 {
		b.Fatalf("request is %d bytes", len(req))
	}
	const reply = "pong\n"
	// Warm up (and check the answer) before measuring.
	for range 100 {
		c.Write(req)
		if s, err := r.ReadString('\n'); err != nil || s != reply {
			b.Fatalf("answer %q, %v", s, err)
		}
	}
	samples := make([]time.Duration, b.N)
	c.SetDeadline(time.Now().Add(10 * time.Minute))
	b.ResetTimer()
	for i := range b.N {
		t0 := time.Now()
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		if s, err := r.ReadString('\n'); err != nil || s != reply {
			b.Fatalf("answer %q, %v", s, err)
		}
		samples[i] = time.Since(t0)
	}
	b.StopTimer()
	slices.Sort(samples)
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	b.ReportMetric(us(samples[len(samples)/2]), "rtt-µs-p50")
	b.ReportMetric(us(samples[len(samples)*99/100]), "rtt-µs-p99")
}
