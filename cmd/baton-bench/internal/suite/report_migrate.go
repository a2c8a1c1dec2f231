package suite

import (
	"fmt"
	"math"
	"strings"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/load"
)

// migrateLevel returns the level of a migrate result for n sessions and the kind of reload.
func migrateLevel(r *load.Result, n int, mig bool) *load.MigrateLevel {
	if r.Migrate == nil {
		return nil
	}
	for i := range r.Migrate.Levels {
		l := &r.Migrate.Levels[i]
		if l.Sessions == n && l.Migrate == mig && l.Error == "" {
			return l
		}
	}
	return nil
}

// migrateMetrics are the figures of the migrate scenario (configuration DM), per count.
func migrateMetrics(pl plan) []metric {
	var m []metric
	for _, n := range pl.MigCounts {
		c := count(n)
		get := func(mig bool, f func(l *load.MigrateLevel) float64) func(r *load.Result) float64 {
			return func(r *load.Result) float64 {
				if l := migrateLevel(r, n, mig); l != nil {
					return f(l)
				}
				return math.NaN()
			}
		}
		m = append(m,
			metric{Key: fmt.Sprintf("mig_%d_total", n), Label: fmt.Sprintf("migrate %s idle sessions: reload -migrate, request → old generation gone and every session resumed (batonctl returns)", c), Unit: "s", sc: scMigrate,
				get: get(true, func(l *load.MigrateLevel) float64 { return l.CommandSeconds })},
			metric{Key: fmt.Sprintf("mig_%d_gone", n), Label: fmt.Sprintf("migrate %s: request → last old worker exited (pidfd)", c), Unit: "s", sc: scMigrate,
				get: get(true, func(l *load.MigrateLevel) float64 { return nanIfZero(l.GoneSeconds) })},
			metric{Key: fmt.Sprintf("mig_%d_pause_p50", n), Label: fmt.Sprintf("migrate %s: pause a session sees (answer gap across the move, %d sampled), p50", c, pl.MigSample), Unit: "ms", sc: scMigrate,
				get: get(true, func(l *load.MigrateLevel) float64 { return nanIfZero(l.PauseP50) })},
			metric{Key: fmt.Sprintf("mig_%d_pause_p99", n), Label: fmt.Sprintf("migrate %s: pause, p99", c), Unit: "ms", sc: scMigrate,
				get: get(true, func(l *load.MigrateLevel) float64 { return nanIfZero(l.PauseP99) })},
			metric{Key: fmt.Sprintf("mig_%d_failed", n), Label: fmt.Sprintf("migrate %s: sessions without an answer after the move (held − answered the check)", c), Unit: "sessions", sc: scMigrate,
				get: get(true, func(l *load.MigrateLevel) float64 { return float64(l.Held - l.Checked) })},
			metric{Key: fmt.Sprintf("mig_%d_plain_cmd", n), Label: fmt.Sprintf("plain reload with %s idle sessions: batonctl reload returns", c), Unit: "s", sc: scMigrate,
				get: get(false, func(l *load.MigrateLevel) float64 { return l.CommandSeconds })},
			metric{Key: fmt.Sprintf("mig_%d_plain_gone", n), Label: fmt.Sprintf("plain reload with %s: request → last old worker exited (the drain deadline, %v here)", c, pl.MigDrain), Unit: "s", sc: scMigrate,
				get: get(false, func(l *load.MigrateLevel) float64 { return nanIfZero(l.GoneSeconds) })},
			metric{Key: fmt.Sprintf("mig_%d_plain_cut", n), Label: fmt.Sprintf("plain reload with %s: sessions cut at the drain deadline", c), Unit: "sessions", sc: scMigrate,
				get: get(false, func(l *load.MigrateLevel) float64 { return float64(l.Cut) })},
		)
	}
	return m
}

func nanIfZero(v float64) float64 {
	if v == 0 {
		return math.NaN()
	}
	return v
}

// migrateMarkdown writes the migration section: the medians, then every reload measured.
func (r *report) migrateMarkdown(b *strings.Builder) {
	var rows []string
	for _, x := range r.Runs {
		if x.Scenario != scMigrate || x.Result == nil || x.Result.Migrate == nil {
			continue
		}
		for _, l := range x.Result.Migrate.Levels {
			kind := "plain"
			if l.Migrate {
				kind = "-migrate"
			}
			if l.Error != "" {
				rows = append(rows, fmt.Sprintf("| %d | %s | %s | FAILED: %s |||||||", x.Round, commas(float64(l.Sessions)), kind, oneLine(l.Error)))
				continue
			}
			moved := "–"
			if l.Migrate {
				moved = fmt.Sprintf("%s / %s / %s / %s", commas(float64(l.Migrated)), commas(float64(l.HandedBack)), commas(float64(l.Declined)), commas(float64(l.Lost)))
			}
			rows = append(rows, fmt.Sprintf("| %d | %s | %s | %s | %s | %s | %s / %s / %s (normal %s) | %s | %s of %s | %s |",
				x.Round, commas(float64(l.Sessions)), kind, f2(l.CommandSeconds), f2(nanIfZero(l.GoneSeconds)), moved,
				f1(nanIfZero(l.PauseP50)), f1(nanIfZero(l.PauseP99)), f1(nanIfZero(l.PauseMax)), f1(nanIfZero(l.NormalGap)),
				f1(nanIfZero(l.StallP99)), commas(float64(l.Checked)), commas(float64(l.Held)), commas(float64(l.Cut))))
		}
	}
	if len(rows) == 0 {
		return
	}
	b.WriteString("### Live session migration (DM)\n\n")
	fmt.Fprintf(b, "Idle echo sessions held through one reload: `batonctl reload -migrate`, then the same count again through a plain `batonctl reload` "+
		"(batond's drain deadline %v). %d sessions per reload keep a request/answer loop going (one byte, the next %v after the answer); "+
		"a session's pause is the longest gap between two consecutive answers of which the later came after the reload request "+
		"(the normal gap is the pacing plus one round trip); the stall is the longest single round trip in that window. "+
		"After batonctl returned, every session sends one more byte and must get it back. Times from the reload request.\n\n",
		r.Plan.MigDrain, r.Plan.MigSample, r.Plan.MigInterval)
	var med []string
	for _, mt := range r.Metrics {
		if mt.sc != scMigrate {
			continue
		}
		if c, ok := r.Table[mt.Key]["DM"]; ok {
			var rounds []string
			for _, v := range c.Rounds {
				rounds = append(rounds, format(mt, v))
			}
			med = append(med, fmt.Sprintf("| %s | %s | %s | %s |", mt.Label, mt.Unit, format(mt, c.Median), strings.Join(rounds, ", ")))
		}
	}
	if len(med) > 0 {
		b.WriteString("| migration (DM) | unit | median | rounds |\n|---|---|---:|---|\n")
		b.WriteString(strings.Join(med, "\n"))
		b.WriteString("\n\n")
	}
	b.WriteString("| round | sessions | reload | batonctl returned (s) | old generation gone (s) | moved / handed back / declined / lost | pause p50 / p99 / max ms | stall p99 ms | answered after | cut |\n")
	b.WriteString("|---|---:|---|---:|---:|---|---|---:|---|---:|\n")
	b.WriteString(strings.Join(rows, "\n"))
	b.WriteString("\n\n")
}
