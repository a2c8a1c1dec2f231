package admin

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/baton-gw/baton/supervisor"
)

// Steering a host from the admin socket: drains, and the metrics a console reads.

// Steerer is the part of a Source that drains and undrains.
type Steerer interface {
	// DrainSlot drains one slot's worker; replace starts its successor now.
	DrainSlot(slot int, replace bool) error
	// DrainAll drains every slot's worker and returns how many.
	DrainAll(replace bool) int
	// SetHostDrain drains the whole host (balancers are told) or ends that.
	SetHostDrain(on bool) error
	// Undrain gives drained slots fresh workers now and returns how many it started.
	Undrain() int
	// Metrics serves Prometheus's /metrics.
	Metrics() http.Handler
	// Migrate moves the sessions of the slots' workers (all, and older generations', if
	// slots is empty) to fresh workers (supervisor.Migrate).
	Migrate(ctx context.Context, slots []int) (supervisor.MigrateResult, error)
}

// DrainResult answers POST /v1/drain and /v1/undrain.
type DrainResult struct {
	Slots       int  `json:"slots,omitempty"` // workers drained (or given successors, undrain)
	HostDrained bool `json:"host_drained"`
}

// Latency summarises the handoff latency (accept to a worker's ACK) since batond started.
type Latency struct {
	Count uint64        `json:"count"`
	P50   time.Duration `json:"p50_ns"`
	P99   time.Duration `json:"p99_ns"`
}

// ErrBadRequest: batond refused what was asked (no such slot, nothing to drain).
var ErrBadRequest = errors.New("refused")

func fleetRoutes(mux *http.ServeMux, src Source) {
	migrateRoutes(mux, src)
	mux.Handle("GET /metrics", src.Metrics())
	mux.HandleFunc("POST /v1/drain", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		replace := q.Get("replace") == "1"
		var res DrainResult
		switch {
		case q.Get("host") == "1":
			if err := src.SetHostDrain(true); err != nil {
				writeJSON(w, http.StatusInternalServerError, refusal{Error: err.Error()})
				return
			}
		case q.Get("all") == "1":
			res.Slots = src.DrainAll(replace)
		default:
			slot, err := strconv.Atoi(q.Get("slot"))
			if err == nil {
				err = src.DrainSlot(slot, replace)
			}
			if err != nil {
				writeJSON(w, http.StatusBadRequest, refusal{Error: err.Error()})
				return
			}
			res.Slots = 1
		}
		res.HostDrained = src.Status().HostDrained
		writeJSON(w, http.StatusOK, res)
	})
	mux.HandleFunc("POST /v1/undrain", func(w http.ResponseWriter, r *http.Request) {
		if err := src.SetHostDrain(false); err != nil {
			writeJSON(w, http.StatusInternalServerError, refusal{Error: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, DrainResult{Slots: src.Undrain()})
	})
}

// Drain asks batond to drain: target is a slot number, "all" or "host".
func (c *Client) Drain(ctx context.Context, target string, replace bool) (DrainResult, error) {
	q := url.Values{}
	switch target {
	case "host", "all":
		q.Set(target, "1")
	default:
		q.Set("slot", target)
	}
	if replace {
		q.Set("replace", "1")
	}
	var res DrainResult
	err := c.post(ctx, "/v1/drain?"+q.Encode(), &res)
	return res, err
}

// Undrain ends a host drain and gives drained slots fresh workers.
func (c *Client) Undrain(ctx context.Context) (DrainResult, error) {
	var res DrainResult
	err := c.post(ctx, "/v1/undrain", &res)
	return res, err
}

func (c *Client) post(ctx context.Context, path string, out any) error {
	return c.do(ctx, http.MethodPost, path, out, &refusal{})
}
