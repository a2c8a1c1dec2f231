package daemon

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/baton-gw/baton/agent"
	"github.com/baton-gw/baton/cmd/internal/admin"
	"github.com/baton-gw/baton/metrics"
	"github.com/baton-gw/baton/proxy"
	"github.com/baton-gw/baton/roster"
	"github.com/baton-gw/baton/supervisor"
)

// What batond offers a fleet of hosts behind a balancer: PROXY protocol on the public
// listeners, HAProxy's agent-check, Prometheus metrics with a health endpoint, and drains of a
// worker or of the whole host.

// FleetConfig is the fleet part of batond's configuration.
type FleetConfig struct {
	ProxyProtocol bool           // every public listener expects a PROXY v1/v2 header
	ProxyListen   []string       // or only these (-listen addresses; baton.toml proxy_listen)
	ProxyListenAt string         // where proxy_listen was set (FILE:LINE), for its errors
	ProxyFrom     []netip.Prefix // balancers allowed to send one (empty: anyone)
	ProxyTimeout  time.Duration  // a header must arrive within this
	Agent         string         // HAProxy agent-check address ("" = none)
	Metrics       string         // Prometheus /metrics and /healthz address ("" = none)
}

type prefixFlag struct{ v *[]netip.Prefix }

func (p prefixFlag) String() string { return "" }
func (p prefixFlag) Set(s string) error {
	pr, err := parsePrefix(s)
	if err != nil {
		return err
	}
	*p.v = append(*p.v, pr)
	return nil
}

// parsePrefix takes a network (10.0.0.0/8) or a single address (10.0.0.1).
func parsePrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("not an address or network: %q", s)
		}
		return netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("not an address or network: %q", s)
	}
	return p.Masked(), nil
}

func (c *FleetConfig) flags(fs *flag.FlagSet) {
	fs.BoolVar(&c.ProxyProtocol, "proxy-protocol", false, "every public listener expects a PROXY protocol v1/v2 header (from a balancer) before the client's bytes")
	fs.Var(prefixFlag{&c.ProxyFrom}, "proxy-from", "accept PROXY headers only from this `network` or address (repeatable; default: any)")
	fs.DurationVar(&c.ProxyTimeout, "proxy-timeout", 3*time.Second, "a PROXY header must arrive within this after connect")
	fs.StringVar(&c.Agent, "agent", "", "answer HAProxy's agent-check on this TCP `address`")
	fs.StringVar(&c.Metrics, "metrics", "", "serve Prometheus /metrics and /healthz on this TCP `address`")
}

// fileFleet are the fleet keys of baton.toml.
type fileFleet struct {
	ProxyProtocol *bool     `toml:"proxy_protocol"`
	ProxyListen   []string  `toml:"proxy_listen"`
	ProxyFrom     []string  `toml:"proxy_from"`
	ProxyTimeout  *duration `toml:"proxy_timeout"`
	Agent         *string   `toml:"agent"`
	Metrics       *string   `toml:"metrics"`
}

func (f *fileFleet) apply(c *FleetConfig, set map[string]bool, path string, text []byte) error {
	if f.ProxyProtocol != nil && !set["proxy-protocol"] {
		c.ProxyProtocol = *f.ProxyProtocol
	}
	if len(f.ProxyListen) > 0 && !set["proxy-protocol"] {
		c.ProxyListenAt = fmt.Sprintf("%s:%d", path, lineOf(text, "proxy_listen"))
		for _, s := range f.ProxyListen {
			if _, err := listenAddr(s); err != nil {
				return fmt.Errorf("%w: %s: proxy_listen: %v", ErrConfig, c.ProxyListenAt, err)
			}
		}
		c.ProxyListen = f.ProxyListen
	}
	if len(f.ProxyFrom) > 0 && !set["proxy-from"] {
		c.ProxyFrom = nil
		for _, s := range f.ProxyFrom {
			p, err := parsePrefix(s)
			if err != nil {
				return fmt.Errorf("%w: %s:%d: proxy_from: %v", ErrConfig, path, lineOf(text, "proxy_from"), err)
			}
			c.ProxyFrom = append(c.ProxyFrom, p)
		}
	}
	if f.ProxyTimeout != nil && !set["proxy-timeout"] {
		c.ProxyTimeout = f.ProxyTimeout.Duration
	}
	if f.Agent != nil && !set["agent"] {
		c.Agent = *f.Agent
	}
	if f.Metrics != nil && !set["metrics"] {
		c.Metrics = *f.Metrics
	}
	return nil
}

// fleet is the running part: its listeners (inherited across reloads like the public ones)
// and the reload counts metrics report.
type fleet struct {
	agentL, metricsL net.Listener
	mu               sync.Mutex
	reloads          metrics.Reloads
	undrainedAt      time.Time // the last undrain of the host (agent.Ready), kept in a file
}

// openFleet opens or inherits the agent and metrics listeners and sets PROXY protocol on the
// public ones.
func (d *daemon) openFleet() error {
	c := d.cfg.Fleet
	expect, err := proxyListeners(c, d.lns)
	if err != nil {
		return err
	}
	for i, l := range d.lns {
		if expect[i] {
			l.ExpectProxy(proxy.ProxyProtocol{From: c.ProxyFrom, Timeout: c.ProxyTimeout})
		}
	}
	if c.Agent != "" {
		if d.fleet.agentL, err = d.upg.Listen("tcp", c.Agent); err != nil {
			return fmt.Errorf("agent-check listener %s: %w", c.Agent, err)
		}
	}
	if c.Metrics != "" {
		if d.fleet.metricsL, err = d.upg.Listen("tcp", c.Metrics); err != nil {
			return fmt.Errorf("metrics listener %s: %w", c.Metrics, err)
		}
	}
	return d.loadHostDrain()
}

// listenAddr resolves a listener's address (as -listen, proxy_listen or systemd give it) for
// comparison: "localhost:7000", "127.0.0.1:7000" and "[::ffff:127.0.0.1]:7000" are one, and so
// are ":7000", "0.0.0.0:7000" and "[::]:7000" (any address).
func listenAddr(s string) (netip.AddrPort, error) {
	a, err := net.ResolveTCPAddr("tcp", s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q is not a TCP address: %w", s, err)
	}
	ip := netip.IPv6Unspecified()
	if len(a.IP) > 0 && !a.IP.IsUnspecified() {
		ip, _ = netip.AddrFromSlice(a.IP)
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(a.Port)), nil
}

// proxyListeners says which of lns expect a PROXY header: all of them with proxy_protocol,
// else those proxy_listen names (by address, or by name as systemd's sockets have them). An
// entry that matches no listener is a configuration error, not silently nothing.
func proxyListeners(c FleetConfig, lns []*proxy.Listener) ([]bool, error) {
	expect := make([]bool, len(lns))
	if c.ProxyProtocol {
		for i := range expect {
			expect[i] = true
		}
		return expect, nil
	}
	for _, s := range c.ProxyListen {
		want, err := listenAddr(s)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: proxy_listen: %v", ErrConfig, c.ProxyListenAt, err)
		}
		found := false
		for i, l := range lns {
			named, nerr := listenAddr(l.Name())
			bound, berr := listenAddr(l.Addr().String())
			if l.Name() == s || (nerr == nil && named == want) || (berr == nil && bound == want) {
				expect[i], found = true, true
			}
		}
		if !found {
			names := make([]string, len(lns))
			for i, l := range lns {
				names[i] = l.Name()
			}
			return nil, fmt.Errorf("%w: %s: proxy_listen: %q is not one of the listeners (%s)", ErrConfig, c.ProxyListenAt, s, strings.Join(names, ", "))
		}
	}
	return expect, nil
}

// serveFleet answers agent checks and scrapes until ctx ends; the returned function waits for
// both servers to finish.
func (d *daemon) serveFleet(ctx context.Context) (wait func()) {
	var wg sync.WaitGroup
	if l := d.fleet.agentL; l != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := agent.NewServer(l, d, d.log.Named("agent")).Serve(ctx); err != nil {
				d.log.Error("agent-check listener", "error", err)
			}
		}()
	}
	if l := d.fleet.metricsL; l != nil {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", metrics.Handler(d))
		mux.HandleFunc("GET /healthz", d.healthz)
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ErrorLog: d.log.Named("metrics").StandardLogger(nil)}
		stop := context.AfterFunc(ctx, func() {
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx)
		})
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer stop()
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
				d.log.Error("metrics listener", "error", err)
			}
		}()
	}
	return wg.Wait
}

// healthz says whether this host can take clients, for balancers without agent-check: 200
// with the count of serving workers, or 503 with the reason.
func (d *daemon) healthz(w http.ResponseWriter, _ *http.Request) {
	ws := d.Workers()
	ready := supervisor.ReadyIn(ws, d.gen)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	switch {
	case d.gw.HostDrained():
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, "drained: the host takes no new clients")
	case ready == 0:
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, "down: no ready workers")
	default:
		fmt.Fprintf(w, "ready: %d of %d workers serve generation %d\n", ready, d.cfg.Workers, d.gen)
	}
}

// Sources for agent and metrics.

func (d *daemon) Workers() []roster.Worker                      { return d.sup.Status() }
func (d *daemon) Generation() uint64                            { return d.gen }
func (d *daemon) HostDrained() bool                             { return d.gw.HostDrained() }
func (d *daemon) Gateway() proxy.Stats                          { return d.gw.Stats() }
func (d *daemon) Latencies() (proxy.Histogram, proxy.Histogram) { return d.gw.Latencies() }

func (d *daemon) Reloads() metrics.Reloads {
	d.fleet.mu.Lock()
	defer d.fleet.mu.Unlock()
	return d.fleet.reloads
}

// countReload records a reload's outcome for metrics.
func (d *daemon) countReload(err error, took time.Duration) {
	d.fleet.mu.Lock()
	defer d.fleet.mu.Unlock()
	if err != nil {
		d.fleet.reloads.Failed++
	} else {
		d.fleet.reloads.Succeeded++
	}
	d.fleet.reloads.LastDuration = took
}

// Host drain lasts across reloads and restarts: it is a file in the state directory, and so is
// the time of the last undrain, during whose window the agent says "ready" (agent.Ready): a
// reload right after an undrain must not leave a balancer in DRAIN.

const (
	hostDrainFile   = "host-drained"
	hostUndrainFile = "host-undrained"
)

func (d *daemon) loadHostDrain() error {
	_, err := os.Stat(filepath.Join(d.cfg.stateDir(), hostDrainFile))
	switch {
	case err == nil:
		d.hostDrainAtReady = true
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("host drain state: %w", err)
	}
	b, err := os.ReadFile(filepath.Join(d.cfg.stateDir(), hostUndrainFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("host drain state: %w", err)
	}
	at, err := time.Parse(time.RFC3339Nano, strings.TrimSpace(string(b)))
	if err != nil {
		d.log.Warn("host drain state: ignoring the last undrain's time", "file", hostUndrainFile, "error", err)
		return nil
	}
	d.fleet.mu.Lock()
	d.fleet.undrainedAt = at
	d.fleet.mu.Unlock()
	return nil
}

// SetHostDrain drains the whole host (on) or ends that, and remembers it.
func (d *daemon) SetHostDrain(on bool) error {
	dir := d.cfg.stateDir()
	now := time.Now()
	stamp := []byte(now.UTC().Format(time.RFC3339Nano) + "\n")
	set, del := filepath.Join(dir, hostDrainFile), filepath.Join(dir, hostUndrainFile)
	if !on {
		set, del = del, set
	}
	err := os.WriteFile(set, stamp, 0o600)
	if err == nil {
		if err = os.Remove(del); errors.Is(err, os.ErrNotExist) {
			err = nil
		}
	}
	if err != nil {
		return fmt.Errorf("host drain state: %w", err)
	}
	d.fleet.mu.Lock()
	if on {
		d.fleet.undrainedAt = time.Time{}
	} else {
		d.fleet.undrainedAt = now
	}
	d.fleet.mu.Unlock()
	d.gw.SetHostDrain(on)
	d.log.Info("host drain", "drained", on)
	return nil
}

// UndrainedAt is when the host was last undrained (agent.Source).
func (d *daemon) UndrainedAt() time.Time {
	d.fleet.mu.Lock()
	defer d.fleet.mu.Unlock()
	return d.fleet.undrainedAt
}

// Steering (admin.Steerer).

func (d *daemon) DrainSlot(slot int, replace bool) error { return d.sup.DrainSlot(slot, replace) }
func (d *daemon) DrainAll(replace bool) int              { return d.sup.DrainAll(replace) }
func (d *daemon) Undrain() int                           { return d.sup.Undrain() }
func (d *daemon) Metrics() http.Handler                  { return metrics.Handler(d) }

// handoffLatency summarises the gateway's handoff latency for status.
func (d *daemon) handoffLatency() admin.Latency {
	h, _ := d.gw.Latencies()
	return admin.Latency{Count: h.Count, P50: h.Quantile(0.5), P99: h.Quantile(0.99)}
}
