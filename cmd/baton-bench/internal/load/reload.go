package load

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ReloadConfig configures the reload scenario.
type ReloadConfig struct {
	Addr     string
	Proto    *Proto
	Command  string // run with sh -c, Reloads times
	Reloads  int
	Every    time.Duration // a reload starts this long after the previous one started (or when it ends, if later)
	Lead     time.Duration // traffic before the first reload
	Tail     time.Duration // traffic after the last reload ended
	Rate     float64       // storm connections per second, open loop
	Sessions int
	Interval time.Duration // one request per session every this long
	Timeout  time.Duration // per storm connection and per session request
	// CommandTimeout bounds each reload command (default 2 minutes).
	CommandTimeout time.Duration
	Label          string
}

// Reload runs the reload scenario: Sessions paced sessions are established first, then an
// open-loop storm and the sessions run while Command runs Reloads times. Every storm connection
// that gets no reply is a failed connect, every session that ends or stops answering is a broken
// one (a broken session is not replaced). Both are divided by the number of reloads; failures
// that would happen without any reload are not told apart.
func Reload(cfg ReloadConfig) (*Result, error) {
	if cfg.Proto == nil || cfg.Command == "" || cfg.Reloads <= 0 || cfg.Rate <= 0 || cfg.Sessions < 0 {
		return nil, errors.New("reload: need a protocol, a command, reloads > 0 and a rate > 0")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.CommandTimeout <= 0 {
		cfg.CommandTimeout = 2 * time.Minute
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 20 * time.Millisecond
	}
	dst, err := parseDst(cfg.Addr)
	if err != nil {
		return nil, err
	}
	e, err := newEngine()
	if err != nil {
		return nil, err
	}
	defer e.close()
	e.nodelay = true
	res := &Result{Scenario: "reload", Label: cfg.Label, Proto: cfg.Proto.Name, Runs: 1, Conns: cfg.Sessions, Target: cfg.Rate}
	rr := &ReloadResult{Command: cfg.Command}
	res.Reload = rr

	ss := newSessions(e, cfg.Proto, dst, cfg.Sessions, cfg.Interval, cfg.Timeout, res)
	ss.stopAt = 1 << 62
	if cfg.Sessions > 0 {
		if err := e.run(e.now()+int64(30*time.Second), func(now int64) (int64, bool) {
			ss.open(now)
			return 0, ss.setupDone()
		}); err != nil {
			return nil, err
		}
		if ss.ready < cfg.Sessions {
			return res, fmt.Errorf("reload: %d of %d sessions established (%s)", ss.ready, cfg.Sessions, kinds(res.ErrorKinds))
		}
	}
	rr.Sessions = ss.ready

	t0 := e.now()
	st := &storm{e: e, p: cfg.Proto, dst: dst, timeout: int64(cfg.Timeout), res: res, stopAt: 1 << 62,
		interval: 1e9 / cfg.Rate, next: float64(t0), maxInflight: 4096, from: 0, to: 1 << 62}
	ss.from, ss.to = t0, 1<<62
	ss.begin(t0)

	// The reloads run on their own goroutine; the loop learns that they are over from lastEnd.
	var lastEnd atomic.Int64 // engine time the last reload ended; 0 while reloads go on
	var mu sync.Mutex
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		defer func() { lastEnd.Store(e.now()) }()
		select {
		case <-time.After(cfg.Lead):
		case <-ctx.Done():
			return
		}
		next := time.Now()
		for range cfg.Reloads {
			if d := time.Until(next); d > 0 {
				select {
				case <-time.After(d):
				case <-ctx.Done():
					return
				}
			}
			next = time.Now().Add(cfg.Every)
			start := time.Now()
			cctx, ccancel := context.WithTimeout(ctx, cfg.CommandTimeout)
			out, err := exec.CommandContext(cctx, "sh", "-c", cfg.Command).CombinedOutput()
			ccancel()
			mu.Lock()
			rr.Reloads++
			rr.ReloadSeconds = append(rr.ReloadSeconds, time.Since(start).Seconds())
			if err != nil {
				rr.ReloadErrors++
				if len(rr.ReloadOutput) < 2000 {
					rr.ReloadOutput += fmt.Sprintf("reload %d: %v: %s\n", rr.Reloads, err, strings.TrimSpace(string(out)))
				}
			}
			mu.Unlock()
		}
	}()

	bound := cfg.Lead + time.Duration(cfg.Reloads)*(cfg.Every+cfg.CommandTimeout) + cfg.Tail + cfg.Timeout + 5*time.Second
	err = e.run(t0+int64(bound), func(now int64) (int64, bool) {
		if end := lastEnd.Load(); end > 0 && st.stopAt > now && now >= end+int64(cfg.Tail) {
			st.stopAt, ss.stopAt = now, now
		}
		wake := st.tick(now)
		if wake == 0 || wake > now+int64(10*time.Millisecond) {
			wake = now + int64(10*time.Millisecond) // look at lastEnd now and then
		}
		return wake, now >= st.stopAt && st.inflight == 0 && ss.outstand == 0
	})
	cancel()
	if err != nil {
		return nil, err
	}
	mu.Lock()
	defer mu.Unlock()
	rr.Connects = st.attempts
	rr.FailedConnects = st.failed
	rr.BrokenSessions = ss.broken
	rr.Messages = ss.msgs
	if rr.Reloads > 0 {
		rr.FailedPer = float64(rr.FailedConnects) / float64(rr.Reloads)
		rr.BrokenPer = float64(rr.BrokenSessions) / float64(rr.Reloads)
	}
	rr.SessionP99 = float64(ss.all.Quantile(0.99)) / 1e3
	rr.SessionMax = float64(ss.all.Quantile(1)) / 1e3
	res.Window = seconds(e.now() - t0)
	res.Ops = st.ops
	res.PerSec = float64(st.ops) / res.Window
	res.setLatency(&st.lat)
	return res, nil
}
