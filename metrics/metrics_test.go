package metrics

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/baton-gw/baton/proxy"
	"github.com/baton-gw/baton/roster"
)

type fake struct{}

func (fake) Workers() []roster.Worker {
	return []roster.Worker{
		{Slot: 0, Generation: 3, PID: 10, State: roster.Ready, Connected: true, Clients: 5, Capacity: 100, Restarts: 2},
		{Slot: 1, Generation: 3, PID: 11, State: roster.CrashLoop},
		{Slot: 0, Generation: 2, PID: 7, State: roster.Draining, Clients: 4, Capacity: 100},
		// A drained worker beside its successor: same slot and generation.
		{Slot: 1, Generation: 3, PID: 12, State: roster.Draining, Clients: 3, Capacity: 100},
	}
}
func (fake) Generation() uint64 { return 3 }
func (fake) Gateway() proxy.Stats {
	return proxy.Stats{Accepted: 12, Acked: 9, InFlight: 1, Closed: map[string]uint64{"no_worker": 2, "host_drained": 0}}
}
func (fake) Latencies() (proxy.Histogram, proxy.Histogram) {
	h := proxy.Histogram{Bounds: []time.Duration{time.Millisecond, time.Second}, Counts: []uint64{8, 9}, Count: 9, Sum: 90 * time.Millisecond}
	return h, proxy.Histogram{Bounds: h.Bounds, Counts: []uint64{0, 0}}
}
func (fake) Reloads() Reloads {
	return Reloads{Succeeded: 4, Failed: 1, LastDuration: 1500 * time.Millisecond}
}
func (fake) HostDrained() bool { return true }
func (fake) Migration() proxy.MigrationStats {
	return proxy.MigrationStats{HandedBack: 5, Resumed: 4, Declined: 1, Migrating: 1}
}

func TestScrape(t *testing.T) {
	rec := httptest.NewRecorder()
	Handler(fake{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("scrape: %d %s", rec.Code, rec.Body)
	}
	body, _ := io.ReadAll(rec.Body)
	text := string(body)
	for _, want := range []string{
		"baton_connections_accepted_total 12",
		"baton_connections_handed_off_total 9",
		`baton_connections_closed_total{reason="no_worker"} 2`,
		"baton_connections_in_flight 1",
		`baton_handoff_latency_seconds_bucket{le="0.001"} 8`,
		`baton_handoff_latency_seconds_bucket{le="+Inf"} 9`,
		"baton_handoff_latency_seconds_sum 0.09",
		`baton_worker_clients{generation="3",slot="0"} 5`,
		`baton_worker_clients{generation="2",slot="0"} 4`,
		`baton_worker_clients{generation="3",slot="1"} 3`,
		`baton_generation_clients{generation="2"} 4`,
		`baton_workers{state="crashloop"} 1`,
		`baton_workers{state="backoff"} 0`,
		`baton_worker_restarts_total{slot="0"} 2`,
		`baton_reloads_total{outcome="failed"} 1`,
		"baton_last_reload_duration_seconds 1.5",
		"baton_draining_clients 7",
		"baton_host_drained 1",
		`baton_migrated_sessions_total{step="resumed"} 4`,
		`baton_migrated_sessions_total{step="declined"} 1`,
		"baton_migrating_sessions 1",
		"baton_generation 3",
		"process_open_fds ",
		"go_goroutines ",
	} {
		if !strings.HasSuffix(want, " ") {
			want += "\n" // a whole value: "} 2" must not match "} 20"
		}
		if !strings.Contains(text, want) {
			t.Errorf("scrape lacks %q", want)
		}
	}
	if strings.Contains(text, "127.0.0.1") {
		t.Error("a client address in the metrics")
	}
}
