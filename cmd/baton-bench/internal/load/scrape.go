package load

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/stats"
)

// ScrapeConfig configures the scrape scenario: what one Prometheus scrape of /metrics costs the
// server (its CPU and the time to the last byte), one scrape after the other over one kept-alive
// connection, as Prometheus scrapes.
type ScrapeConfig struct {
	URL        string // http://127.x.y.z:port/metrics
	Warmup     int    // scrapes before the measured ones
	Scrapes    int
	Want       string // the body must contain this (a metric name), or the scrape is an error
	Timeout    time.Duration
	ServerPIDs []int
	Label      string
}

// Scrape runs the scrape scenario.
func Scrape(cfg ScrapeConfig) (*Result, error) {
	if cfg.Scrapes <= 0 {
		return nil, errors.New("scrape: scrapes must be > 0")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	u, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("scrape: %w", err)
	}
	if _, err := parseDst(u.Host); err != nil || u.Scheme != "http" {
		return nil, fmt.Errorf("scrape: %q: an http:// URL on 127.0.0.0/8 is needed", cfg.URL)
	}
	tr := &http.Transport{MaxIdleConns: 1, DisableCompression: true}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: cfg.Timeout}
	res := &Result{Scenario: "scrape", Label: cfg.Label, Runs: 1, Conns: 1}
	get := func() (int, error) {
		ctx, cancel := context.WithTimeout(context.Background(), cfg.Timeout)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, cfg.URL, nil)
		if err != nil {
			return 0, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
		switch {
		case err != nil:
			return 0, err
		case resp.StatusCode != http.StatusOK:
			return 0, fmt.Errorf("status %s", resp.Status)
		case cfg.Want != "" && !strings.Contains(string(body), cfg.Want):
			return 0, fmt.Errorf("no %q in the %d-byte body", cfg.Want, len(body))
		}
		return len(body), nil
	}
	for range cfg.Warmup {
		if _, err := get(); err != nil {
			return nil, fmt.Errorf("scrape %s: %w", cfg.URL, err)
		}
	}
	probe := newCPUProbe(cfg.ServerPIDs)
	var lat stats.Samples
	probe.mark()
	for range cfg.Scrapes {
		t := time.Now()
		n, err := get()
		if err != nil {
			res.addError(errKind(err))
			continue
		}
		lat.Add(time.Since(t))
		res.Ops++
		res.Bytes = n
	}
	d := probe.delta()
	res.Window = d.Wall.Seconds()
	if res.Window > 0 {
		res.PerSec = float64(res.Ops) / res.Window
	}
	res.setLatency(&lat)
	res.setCPU(d, res.Ops)
	return res, nil
}
