package main

import (
	"net"
	"os"
	"os/exec"
	"testing"
	"time"
)

// BenchmarkStorm measures short connections (connect, read the greeting, close) through batond
// with 2 demo workers, next to the same demo worker accepting directly (its fallback listener),
// in one run: go test -run ^$ -bench Storm ./cmd/batond/
func BenchmarkStorm(b *testing.B) {
	t := &testing.T{}
	build(t)
	b.Run("direct", func(b *testing.B) {
		addr := freeAddr(b)
		cmd := exec.Command(bins.batond, "demo-worker")
		cmd.Env = append(os.Environ(), "BATON_FALLBACK_LISTEN="+addr)
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		defer func() { cmd.Process.Kill(); cmd.Wait() }()
		waitDial(b, addr)
		storm(b, addr)
	})
	b.Run("baton", func(b *testing.B) {
		tt := &testing.T{}
		g := startGateway(tt, opts{workers: 2, args: []string{"-log-level", "warn"}})
		defer g.stop()
		storm(b, g.addr)
	})
}

func storm(b *testing.B, addr string) {
	b.ResetTimer()
	start := time.Now()
	b.SetParallelism(4)
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, 256)
		for pb.Next() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				b.Error(err)
				return
			}
			if _, err := c.Read(buf); err != nil {
				b.Error(err)
			}
			c.(*net.TCPConn).SetLinger(0) // no TIME_WAIT pile-up over a long run
			c.Close()
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "conn/s")
}

func freeAddr(b *testing.B) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func waitDial(b *testing.B, addr string) {
	for i := 0; i < 200; i++ {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	b.Fatalf("nothing listens on %s", addr)
}
