package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/user"
	"syscall"
	"time"
)

// Errors of the admin client, to be told apart with errors.Is. Each comes wrapped with what
// was found (the path, its owner and mode, the time waited).
var (
	// ErrNotRunning: no batond answers: there is no socket at the path (ENOENT), or a stale
	// one that nothing listens on (ECONNREFUSED).
	ErrNotRunning = errors.New("batond is not running")
	// ErrPermission: the socket exists but this user may not connect to it.
	ErrPermission = errors.New("permission denied")
	// ErrNotSocket: something other than a socket is at the path.
	ErrNotSocket = errors.New("not a socket")
	// ErrTimeout: batond did not answer in time.
	ErrTimeout = errors.New("timed out")
	// ErrAnswerLost: the connection broke after the request went out, before the answer came.
	// For a reload the outcome is then unknown to this request: ask GET /v1/reload.
	ErrAnswerLost = errors.New("connection lost before the answer")
	// ErrReloadRefused: another reload runs (or batond is stopping); nothing was started.
	ErrReloadRefused = errors.New("reload refused")
	// ErrReloadFailed: the new batond did not take over; the old one still serves.
	ErrReloadFailed = errors.New("reload failed; the running batond keeps serving")
)

// Client speaks to batond's admin socket.
type Client struct {
	Path string
	hc   *http.Client
}

// dialError marks a failure to connect, as opposed to one after the request went out.
type dialError struct{ err error }

func (e *dialError) Error() string { return e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// NewClient returns a client for the admin socket at path.
func NewClient(path string) *Client {
	return &Client{Path: path, hc: &http.Client{Transport: &http.Transport{
		// A new connection per request: across a reload the socket is answered by another
		// process, and a kept-alive connection would still lead to the old one.
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", path)
			if err != nil {
				return nil, &dialError{err}
			}
			return c, nil
		},
	}}}
}

// do sends one request and decodes a JSON answer with status want into out. Any other status
// returns the body as an error (decoded into refused when that is non-nil and the status 409).
func (c *Client) do(ctx context.Context, method, path string, out any, refused *refusal) error {
	var waited time.Duration
	if dl, ok := ctx.Deadline(); ok {
		waited = time.Until(dl).Round(10 * time.Millisecond)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://batond"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return c.classify(err, waited)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return c.classify(err, waited)
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		return json.Unmarshal(body, out)
	case resp.StatusCode == http.StatusConflict && refused != nil && json.Unmarshal(body, refused) == nil:
		return fmt.Errorf("%w: %s", ErrReloadRefused, refused.Error)
	case resp.StatusCode == http.StatusBadRequest && refused != nil && json.Unmarshal(body, refused) == nil:
		return fmt.Errorf("%w: %s", ErrBadRequest, refused.Error)
	default:
		return fmt.Errorf("batond: %s: %s", resp.Status, body)
	}
}

// classify turns a transport error into one of the sentinel errors, saying what it found.
func (c *Client) classify(err error, waited time.Duration) error {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%s: %w: no answer within %v", c.Path, ErrTimeout, waited)
	}
	var de *dialError
	if !errors.As(err, &de) {
		return fmt.Errorf("%s: %w: %v", c.Path, ErrAnswerLost, err)
	}
	fi, serr := os.Stat(c.Path)
	switch {
	case errors.Is(err, syscall.EACCES) || errors.Is(serr, fs.ErrPermission):
		return fmt.Errorf("%s: %w: %s", c.Path, ErrPermission, whoMayConnect(c.Path, fi, serr))
	case errors.Is(serr, fs.ErrNotExist) || errors.Is(err, syscall.ENOENT):
		return fmt.Errorf("%w: no socket at %s (is batond running, and with this -admin path?)", ErrNotRunning, c.Path)
	case serr == nil && fi.Mode().Type() != fs.ModeSocket:
		// (On Linux, connect(2) to a path that is not a socket fails with ECONNREFUSED.)
		return fmt.Errorf("%s: %w: it is a %s", c.Path, ErrNotSocket, typeName(fi.Mode()))
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("%w: stale socket at %s: nothing listens on it (batond exited without removing it)", ErrNotRunning, c.Path)
	}
	return fmt.Errorf("%s: %w", c.Path, err)
}

// whoMayConnect explains a permission error: the socket's owner and mode, and who may connect.
func whoMayConnect(path string, fi os.FileInfo, serr error) string {
	me := fmt.Sprintf("uid %d", os.Getuid())
	if serr != nil {
		return fmt.Sprintf("%s cannot reach the socket (a directory on the way is not searchable by it)", me)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Sprintf("mode %v", fi.Mode())
	}
	owner, group := fmt.Sprint(st.Uid), fmt.Sprint(st.Gid)
	if u, err := user.LookupId(owner); err == nil {
		owner += " (" + u.Username + ")"
	}
	if g, err := user.LookupGroupId(group); err == nil {
		group += " (" + g.Name + ")"
	}
	return fmt.Sprintf("the socket is owned by uid %s, gid %s, mode %04o, and %s may not connect: run batonctl as uid %s, "+
		"or start batond with -admin-mode 0660 and use a member of gid %s", owner, group, fi.Mode().Perm(), me, owner, group)
}

func typeName(m fs.FileMode) string {
	switch {
	case m.IsRegular():
		return "regular file"
	case m.IsDir():
		return "directory"
	case m&fs.ModeNamedPipe != 0:
		return "named pipe"
	case m&fs.ModeSymlink != 0:
		return "symbolic link"
	case m&fs.ModeDevice != 0:
		return "device"
	}
	return "file of mode " + m.String()
}

// Status fetches the status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	err := c.do(ctx, http.MethodGet, "/v1/status", &s, nil)
	return s, err
}

// LastReload fetches the record of the latest reload.
func (c *Client) LastReload(ctx context.Context) (ReloadRecord, error) {
	var r ReloadRecord
	err := c.do(ctx, http.MethodGet, "/v1/reload", &r, nil)
	return r, err
}

// Reload asks batond to upgrade and waits for the outcome. A failed reload returns its record
// and an error wrapping ErrReloadFailed; a refused one the running reload's record and
// ErrReloadRefused. With ErrTimeout or ErrAnswerLost the outcome is unknown: ask LastReload.
func (c *Client) Reload(ctx context.Context, migrate bool) (ReloadRecord, error) {
	var rec ReloadRecord
	var ref refusal
	path := "/v1/reload"
	if migrate {
		path += "?migrate=1"
	}
	if err := c.do(ctx, http.MethodPost, path, &rec, &ref); err != nil {
		if errors.Is(err, ErrReloadRefused) {
			return ref.Reload, err
		}
		return rec, err
	}
	if rec.State == ReloadFailed {
		return rec, fmt.Errorf("%w: %s", ErrReloadFailed, rec.Error)
	}
	return rec, nil
}
