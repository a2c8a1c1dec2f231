package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/baton-gw/baton/handoff"
	"github.com/baton-gw/baton/proxy"
	"github.com/baton-gw/baton/supervisor"
)

// Status is the answer to GET /v1/status.
type Status struct {
	PID        int                       `json:"pid"`
	Generation uint64                    `json:"generation"`
	Listeners  []string                  `json:"listeners"`
	Workers    []supervisor.WorkerStatus `json:"workers"`
	Gateway    proxy.Stats               `json:"gateway"`
	Clients    int                       `json:"clients"`
	Draining   int                       `json:"draining"`
	Runtime    Runtime                   `json:"runtime"`
}

// Source is what the server asks for data and actions.
type Source interface {
	Status() Status
	// Reload starts the next batond and returns once it serves, or why it does not.
	Reload(ctx context.Context) error
}

// ReloadResult is the answer to POST /v1/reload.
type ReloadResult struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// ErrNotRunning says nothing answers on the admin socket.
var ErrNotRunning = errors.New("batond is not running (nothing answers on the admin socket)")

// Listen creates the admin socket at path with mode (see handoff.ListenUnix).
func Listen(path string, mode os.FileMode) (*net.UnixListener, error) {
	return handoff.ListenUnix("unix", path, mode)
}

// Handler serves the admin API from src.
func Handler(src Source) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(src.Status())
	})
	mux.HandleFunc("POST /v1/reload", func(w http.ResponseWriter, r *http.Request) {
		res := ReloadResult{OK: true}
		if err := src.Reload(r.Context()); err != nil {
			res = ReloadResult{Error: err.Error()}
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(res)
	})
	return mux
}

// Server is the admin HTTP server on one listener.
type Server struct {
	srv     *http.Server
	l       net.Listener
	stopped atomic.Bool
}

// NewServer serves src's admin API on l (which it owns).
func NewServer(l net.Listener, src Source) *Server {
	return &Server{srv: &http.Server{Handler: Handler(src), ReadHeaderTimeout: 5 * time.Second}, l: l}
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

// Client speaks to batond's admin socket.
type Client struct {
	Path string
	hc   *http.Client
}

// NewClient returns a client for the admin socket at path.
func NewClient(path string) *Client {
	return &Client{Path: path, hc: &http.Client{Transport: &http.Transport{
		// A new connection per request: across a reload the socket is answered by another
		// process, and a kept-alive connection would still lead to the old one.
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}}
}

func (c *Client) do(ctx context.Context, method, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://batond"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) {
			return fmt.Errorf("%s: %w", c.Path, ErrNotRunning)
		}
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("batond: %s: %s", resp.Status, string(body))
	}
	return json.Unmarshal(body, out)
}

// Status fetches the status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	err := c.do(ctx, http.MethodGet, "/v1/status", &s)
	return s, err
}

// Reload asks batond to upgrade and waits for the outcome.
func (c *Client) Reload(ctx context.Context) error {
	var res ReloadResult
	if err := c.do(ctx, http.MethodPost, "/v1/reload", &res); err != nil {
		return err
	}
	if !res.OK {
		return fmt.Errorf("%w: %s", ErrReloadFailed, res.Error)
	}
	return nil
}

// ErrReloadFailed says the new batond did not take over; the old one still serves.
var ErrReloadFailed = errors.New("reload failed; the running batond keeps serving")
