package admin

import (
	"context"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/baton-gw/baton/supervisor"
)

// Migrating sessions without a reload: POST /v1/migrate?slot=N (or all=1) drains the worker(s),
// starts their successors and, once those are ready, asks the drained ones to hand every
// session over. It answers when the request went out, not when the sessions have moved:
// GET /v1/status counts them (Status.Migration).

// migrateWait bounds how long POST /v1/migrate waits for the successors to be ready before it
// asks anyway (sessions then wait for a worker, up to the queue timeout).
const migrateWait = 30 * time.Second

func migrateRoutes(mux *http.ServeMux, src Source) {
	mux.HandleFunc("POST /v1/migrate", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		var slots []int
		if q.Get("all") != "1" {
			n, err := strconv.Atoi(q.Get("slot"))
			if err != nil {
				writeJSON(w, http.StatusBadRequest, refusal{Error: "give slot=N or all=1"})
				return
			}
			slots = []int{n}
		}
		ctx, cancel := context.WithTimeout(r.Context(), migrateWait)
		defer cancel()
		res, err := src.Migrate(ctx, slots)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, refusal{Error: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, res)
	})
}

// Migrate asks batond to move the sessions of a slot's worker (target a slot number) or of
// every worker ("all") to fresh workers.
func (c *Client) Migrate(ctx context.Context, target string) (supervisor.MigrateResult, error) {
	q := url.Values{}
	if target == "all" {
		q.Set("all", "1")
	} else {
		q.Set("slot", target)
	}
	var res supervisor.MigrateResult
	err := c.post(ctx, "/v1/migrate?"+q.Encode(), &res)
	return res, err
}
