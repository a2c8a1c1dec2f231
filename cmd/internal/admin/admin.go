package admin

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/baton-gw/baton/handoff"
	"github.com/baton-gw/baton/proxy"
	"github.com/baton-gw/baton/supervisor"
)

// Phase names what batond is doing as a whole.
type Phase string

const (
	PhaseStarting  Phase = "starting"  // workers starting, not serving yet
	PhaseServing   Phase = "serving"   // serving clients
	PhaseReloading Phase = "reloading" // serving, while the next batond starts
	PhaseStopping  Phase = "stopping"  // no new clients; draining the workers
)

// Status is the answer to GET /v1/status.
type Status struct {
	PID        int    `json:"pid"`
	Generation uint64 `json:"generation"`
	Version    string `json:"version"`
	Phase      Phase  `json:"phase"`
	// PhaseDetail is the phase as a sentence: "starting: 2 of 4 workers ready, waiting up to
	// 30s", "reloading: batond pid 812 starting generation 8", "stopping: draining 3 workers,
	// 41 clients, 12s left".
	PhaseDetail string                    `json:"phase_detail"`
	Listeners   []string                  `json:"listeners"`
	Workers     []supervisor.WorkerStatus `json:"workers"`
	Gateway     proxy.Stats               `json:"gateway"`
	Clients     int                       `json:"clients"`
	Draining    int                       `json:"draining"`
	Runtime     Runtime                   `json:"runtime"`
	HostDrained bool                      `json:"host_drained"` // balancers are told to send no new clients
	Handoff     Latency                   `json:"handoff_latency"`
	Migration   proxy.MigrationStats      `json:"migration"`
}

// Source is what the server asks for data and actions.
type Source interface {
	Status() Status
	// StartReload starts a reload that runs on whatever happens to the request, and returns
	// a channel closed when its outcome is known (then read LastReload). It fails at once,
	// with an error wrapping ErrReloadRefused, when a reload runs or batond is stopping.
	// With migrate, the next batond asks the old workers to hand their sessions over.
	StartReload(migrate bool) (<-chan struct{}, error)
	// LastReload is the record of the latest reload (State ReloadNone if there was none).
	LastReload() ReloadRecord
	Steerer
}

// ReloadState is where a reload stands.
type ReloadState string

const (
	ReloadNone      ReloadState = "none"
	ReloadRunning   ReloadState = "running"
	ReloadSucceeded ReloadState = "succeeded"
	ReloadFailed    ReloadState = "failed"
)

// ReloadRecord is the latest reload, as GET /v1/reload and POST /v1/reload answer it. After a
// successful reload the batond that answers is the new one (To), which reports it.
type ReloadRecord struct {
	State          ReloadState `json:"state"`
	Started        time.Time   `json:"started,omitzero"`
	Finished       time.Time   `json:"finished,omitzero"`
	Error          string      `json:"error,omitempty"`
	FromGeneration uint64      `json:"from_generation,omitempty"`
	FromPID        int         `json:"from_pid,omitempty"`
	ToGeneration   uint64      `json:"to_generation,omitempty"` // known once the next batond has chosen it
	ToPID          int         `json:"to_pid,omitempty"`
	Migrate        bool        `json:"migrate,omitempty"` // the old workers hand their sessions to the new ones
}

// Done says the outcome is known.
func (r ReloadRecord) Done() bool { return r.State == ReloadSucceeded || r.State == ReloadFailed }

// refusal is the body of a 409 answer to POST /v1/reload.
type refusal struct {
	Error  string       `json:"error"`
	Reload ReloadRecord `json:"reload"`
}

// Listen creates the admin socket at path with mode (see handoff.ListenUnix).
func Listen(path string, mode os.FileMode) (*net.UnixListener, error) {
	return handoff.ListenUnix("unix", path, mode)
}

// Handler serves the admin API from src.
func Handler(src Source) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, src.Status())
	})
	mux.HandleFunc("GET /v1/reload", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, src.LastReload())
	})
	mux.HandleFunc("POST /v1/reload", func(w http.ResponseWriter, r *http.Request) {
		done, err := src.StartReload(r.URL.Query().Get("migrate") == "1")
		if err != nil {
			writeJSON(w, http.StatusConflict, refusal{Error: err.Error(), Reload: src.LastReload()})
			return
		}
		select {
		case <-done:
		case <-r.Context().Done():
			return // the client left; the reload goes on (GET /v1/reload tells its outcome)
		}
		writeJSON(w, http.StatusOK, src.LastReload())
	})
	fleetRoutes(mux, src)
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// Server is the admin HTTP server on one listener.
type Server struct {
	srv     *http.Server
	l       *reserveListener
	stopped atomic.Bool
}

// NewServer serves src's admin API on l (which it owns). The HTTP server's own errors go to
// log. It sets aside one file descriptor so that the admin socket still answers when batond
// has run out of them.
func NewServer(l *net.UnixListener, src Source, log hclog.Logger) *Server {
	return &Server{
		srv: &http.Server{
			Handler: Handler(src), ReadHeaderTimeout: 5 * time.Second,
			ErrorLog: log.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true}),
		},
		l: newReserveListener(l),
	}
}

// StopAccepting closes the listener now; requests under way still get their answers. After a
// reload the admin socket is the next batond's: a client's next connection must reach it, not
// this process on its way out.
func (s *Server) StopAccepting() {
	s.stopped.Store(true)
	_ = s.l.Close()
}

// Run serves until ctx ends or StopAccepting, then returns once the requests under way have
// been answered (at most 5 s). (http.Server.Serve itself returns as soon as its listener
// closes, before its handlers finish; the process must not exit under them.)
func (s *Server) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, s.StopAccepting)
	defer stop()
	err := s.srv.Serve(s.l)
	if s.stopped.Load() || errors.Is(err, http.ErrServerClosed) {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.srv.Shutdown(sctx)
		return nil
	}
	return err
}
