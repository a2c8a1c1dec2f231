package metrics

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/baton-gw/baton/proxy"
	"github.com/baton-gw/baton/roster"
)

// Reloads counts reloads by outcome, with the duration of the last one.
type Reloads struct {
	Succeeded, Failed uint64
	LastDuration      time.Duration
}

// Source is what a scrape reads.
type Source interface {
	Workers() []roster.Worker
	Generation() uint64
	Gateway() proxy.Stats
	Latencies() (handoff, queue proxy.Histogram)
	Reloads() Reloads
	HostDrained() bool
	Migration() proxy.MigrationStats
}

const ns = "baton"

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(prometheus.BuildFQName(ns, "", name), help, labels, nil)
}

var (
	dAccepted     = desc("connections_accepted_total", "Client connections accepted by batond.")
	dHandedOff    = desc("connections_handed_off_total", "Client connections acknowledged by a worker.")
	dClosed       = desc("connections_closed_total", "Client connections batond closed instead of handing them off, by reason.", "reason")
	dRedispatched = desc("connections_redispatched_total", "Connections handed to another worker after their first failed or refused.")
	dAcceptErrors = desc("accept_errors_total", "Failed accepts on the public listeners.")
	dInFlight     = desc("connections_in_flight", "Connections batond holds now: queued or handed off and not yet acknowledged.")
	dHandoff      = desc("handoff_latency_seconds", "Time from accept to a worker's acknowledgement.")
	dQueue        = desc("queue_wait_seconds", "Time connections that waited for a free worker waited.")
	dWorkerCli    = desc("worker_clients", "Live client connections of each worker.", "slot", "generation")
	dWorkerCap    = desc("worker_capacity", "Most client connections each worker takes.", "slot", "generation")
	dGenCli       = desc("generation_clients", "Live client connections per generation.", "generation")
	dWorkers      = desc("workers", "Workers by state.", "state")
	dRestarts     = desc("worker_restarts_total", "Restarts of each slot in the serving generation.", "slot")
	dReloads      = desc("reloads_total", "Reloads by outcome, as seen by the batond that kept or took over serving.", "outcome")
	dReloadDur    = desc("last_reload_duration_seconds", "How long the last reload took, from request to outcome.")
	dDraining     = desc("draining_workers", "Workers draining (after a reload, or drained by an operator).")
	dDrainingCli  = desc("draining_clients", "Client connections held by draining workers.")
	dGeneration   = desc("generation", "The serving generation.")
	dHostDrained  = desc("host_drained", "1 while an operator has drained the whole host.")
	dMigrated     = desc("migrated_sessions_total", "Live sessions in migration, by step: handed_back by a worker, resumed (acknowledged) by another, declined (kept by their worker), lost (closed by batond while moving).", "step")
	dMigrating    = desc("migrating_sessions", "Sessions batond holds between a worker's handback and the next worker's acknowledgement.")
)

// states are the worker states always reported (0 when none), so a query never misses one.
var states = []roster.State{roster.Starting, roster.Ready, roster.Draining, roster.Backoff, roster.CrashLoop, roster.Stopped}

// collector reads a Source at each scrape.
type collector struct{ src Source }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{dAccepted, dHandedOff, dClosed, dRedispatched, dAcceptErrors, dInFlight,
		dHandoff, dQueue, dWorkerCli, dWorkerCap, dGenCli, dWorkers, dRestarts, dReloads, dReloadDur,
		dDraining, dDrainingCli, dGeneration, dHostDrained, dMigrated, dMigrating} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	c.gateway(ch)
	c.workers(ch)
	r := c.src.Reloads()
	ch <- prometheus.MustNewConstMetric(dReloads, prometheus.CounterValue, float64(r.Succeeded), "succeeded")
	ch <- prometheus.MustNewConstMetric(dReloads, prometheus.CounterValue, float64(r.Failed), "failed")
	ch <- prometheus.MustNewConstMetric(dReloadDur, prometheus.GaugeValue, r.LastDuration.Seconds())
	ch <- prometheus.MustNewConstMetric(dGeneration, prometheus.GaugeValue, float64(c.src.Generation()))
	ch <- prometheus.MustNewConstMetric(dHostDrained, prometheus.GaugeValue, b2f(c.src.HostDrained()))
	m := c.src.Migration()
	ch <- prometheus.MustNewConstMetric(dMigrated, prometheus.CounterValue, float64(m.HandedBack), "handed_back")
	ch <- prometheus.MustNewConstMetric(dMigrated, prometheus.CounterValue, float64(m.Resumed), "resumed")
	ch <- prometheus.MustNewConstMetric(dMigrated, prometheus.CounterValue, float64(m.Declined), "declined")
	ch <- prometheus.MustNewConstMetric(dMigrated, prometheus.CounterValue, float64(m.Lost), "lost")
	ch <- prometheus.MustNewConstMetric(dMigrating, prometheus.GaugeValue, float64(m.Migrating))
}

func (c collector) gateway(ch chan<- prometheus.Metric) {
	g := c.src.Gateway()
	ch <- prometheus.MustNewConstMetric(dAccepted, prometheus.CounterValue, float64(g.Accepted))
	ch <- prometheus.MustNewConstMetric(dHandedOff, prometheus.CounterValue, float64(g.Acked))
	ch <- prometheus.MustNewConstMetric(dRedispatched, prometheus.CounterValue, float64(g.Redispatched))
	ch <- prometheus.MustNewConstMetric(dAcceptErrors, prometheus.CounterValue, float64(g.AcceptErrors))
	ch <- prometheus.MustNewConstMetric(dInFlight, prometheus.GaugeValue, float64(g.InFlight))
	for reason, n := range g.Closed {
		ch <- prometheus.MustNewConstMetric(dClosed, prometheus.CounterValue, float64(n), reason)
	}
	h, q := c.src.Latencies()
	ch <- histogram(dHandoff, h)
	ch <- histogram(dQueue, q)
}

func (c collector) workers(ch chan<- prometheus.Metric) {
	ws, gen := c.src.Workers(), c.src.Generation()
	byState := map[roster.State]int{}
	byGen := map[uint64]int{}
	draining, drainingCli := 0, 0
	// Two workers can share a slot and generation (a drained worker beside its successor): their
	// values are summed per label set, as a registry refuses the same labels twice.
	type key struct {
		slot int
		gen  uint64
	}
	clients, capacity := map[key]int{}, map[key]int{}
	restarts := map[int]int{}
	for _, w := range ws {
		byState[w.State]++
		byGen[w.Generation] += w.Clients
		if w.State == roster.Draining {
			draining++
			drainingCli += w.Clients
		}
		if w.PID != 0 {
			k := key{w.Slot, w.Generation}
			clients[k] += w.Clients
			capacity[k] += w.Capacity
		}
		if w.Generation == gen {
			restarts[w.Slot] = max(restarts[w.Slot], w.Restarts)
		}
	}
	for k, n := range clients {
		slot, g := strconv.Itoa(k.slot), strconv.FormatUint(k.gen, 10)
		ch <- prometheus.MustNewConstMetric(dWorkerCli, prometheus.GaugeValue, float64(n), slot, g)
		ch <- prometheus.MustNewConstMetric(dWorkerCap, prometheus.GaugeValue, float64(capacity[k]), slot, g)
	}
	for slot, n := range restarts {
		ch <- prometheus.MustNewConstMetric(dRestarts, prometheus.CounterValue, float64(n), strconv.Itoa(slot))
	}
	for _, s := range states {
		ch <- prometheus.MustNewConstMetric(dWorkers, prometheus.GaugeValue, float64(byState[s]), string(s))
	}
	for g, n := range byGen {
		ch <- prometheus.MustNewConstMetric(dGenCli, prometheus.GaugeValue, float64(n), strconv.FormatUint(g, 10))
	}
	ch <- prometheus.MustNewConstMetric(dDraining, prometheus.GaugeValue, float64(draining))
	ch <- prometheus.MustNewConstMetric(dDrainingCli, prometheus.GaugeValue, float64(drainingCli))
}

func histogram(d *prometheus.Desc, h proxy.Histogram) prometheus.Metric {
	buckets := make(map[float64]uint64, len(h.Bounds))
	for i, b := range h.Bounds {
		buckets[b.Seconds()] = h.Counts[i]
	}
	return prometheus.MustNewConstHistogram(d, h.Count, h.Sum.Seconds(), buckets)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Handler serves /metrics for src: batond's own metrics, plus the Go runtime's and the
// process's (open fds and their limit among them).
func Handler(src Source) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collector{src}, collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}
