package ctl

import (
	"strings"
	"testing"
	"time"

	"github.com/baton-gw/baton/cmd/internal/admin"
	"github.com/baton-gw/baton/proxy"
)

// Rates are the change of the counters over the interval; across a reload (a new batond, its
// counters from zero) a decrease is a reset, shown as "—", never a wrapped difference.
func TestTopRates(t *testing.T) {
	at := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	snap := func(pid int, accepted, acked uint64, dt time.Duration) sample {
		return sample{at: at.Add(dt), st: admin.Status{PID: pid, Gateway: proxy.Stats{Accepted: accepted, Acked: acked, Closed: map[string]uint64{}}}}
	}
	for _, c := range []struct {
		name      string
		prev, cur sample
		want      string
	}{
		{"steady", snap(10, 100, 90, 0), snap(10, 300, 290, 2*time.Second), "accepted 300 (100.0/s) · handed off 290 (100.0/s)"},
		{"reset by a reload", snap(10, 5000, 4990, 0), snap(11, 40, 38, time.Second), "accepted 40 (—) · handed off 38 (—)"},
		{"new batond, counters already past the old", snap(10, 5, 5, 0), snap(11, 40, 38, time.Second), "accepted 40 (—) · handed off 38 (—)"},
		{"decrease, same pid", snap(10, 5000, 4990, 0), snap(10, 40, 38, time.Second), "accepted 40 (—) · handed off 38 (—)"},
	} {
		out := render(&c.prev, c.cur)
		if !strings.Contains(out, c.want) {
			t.Errorf("%s: got\n%s\nwant it to contain %q", c.name, out, c.want)
		}
	}
	if out := render(nil, snap(10, 1, 1, 0)); !strings.Contains(out, "accepted 1 (—)") {
		t.Errorf("first screen: %s", out)
	}
}
