package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// generationFile, in the state directory, records the generation that last served and whether
// its batond stopped cleanly. Only serving counts: a start or reload that fails writes nothing,
// so it consumes no number.
const generationFile = "generation"

// ErrDiskFull: a state file could not be written because the file system is full.
var ErrDiskFull = errors.New("no space left on the state directory's file system")

// genState is the content of generationFile.
type genState struct {
	Generation uint64    `json:"generation"`
	PID        int       `json:"pid"` // the batond that served it
	Since      time.Time `json:"serving_since,omitzero"`
	Stopped    bool      `json:"stopped"` // its batond stopped cleanly, with its workers
	StoppedAt  time.Time `json:"stopped_at,omitzero"`
}

// readGenState reads path; ok is false when there is none yet. A bare number (the counter of
// earlier versions) reads as a generation that stopped cleanly.
func readGenState(path string) (st genState, ok bool, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return genState{}, false, nil
	}
	if err != nil {
		return genState{}, false, err
	}
	text := strings.TrimSpace(string(b))
	if n, perr := strconv.ParseUint(text, 10, 64); perr == nil {
		return genState{Generation: n, Stopped: true}, true, nil
	}
	if err := json.Unmarshal(b, &st); err != nil || st.Generation == 0 {
		return genState{}, false, fmt.Errorf("%s: not a generation record (%q); remove it to start over at generation 1", path, text)
	}
	return st, true, nil
}

// genChoice is the generation a starting batond takes, and why.
type genChoice struct {
	gen   uint64
	adopt bool   // the last generation did not stop cleanly: adopt its workers
	why   string // for the log
	prev  genState
}

// chooseGeneration: an upgrade takes the next number; a fresh start after a clean stop the
// next one too (resuming); a fresh start after a crash keeps the generation that was serving,
// whose workers may still run, and adopts them.
func chooseGeneration(st genState, ok, upgrade bool) genChoice {
	switch {
	case !ok:
		return genChoice{gen: 1, why: "first start"}
	case upgrade:
		return genChoice{gen: st.Generation + 1, why: "reload", prev: st}
	case st.Stopped:
		return genChoice{gen: st.Generation + 1, why: "resuming after a clean stop", prev: st}
	default:
		return genChoice{gen: st.Generation, adopt: true, why: "the last batond did not stop cleanly", prev: st}
	}
}

// writeFileAtomic replaces path with data: a temporary file in the same directory, written and
// synced, renamed over path, then the directory synced. A reader sees the old or the new
// content, never part of one, even across a power cut.
func writeFileAtomic(path string, data []byte) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return diskError(path, err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		return diskError(path, err)
	}
	if _, err := f.Write(data); err != nil {
		return diskError(path, err)
	}
	if err := f.Sync(); err != nil {
		return diskError(path, err)
	}
	if err := f.Close(); err != nil {
		return diskError(path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return diskError(path, err)
	}
	if d, derr := os.Open(dir); derr == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

func diskError(path string, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("writing %s: %w (%v)", path, ErrDiskFull, err)
	}
	return fmt.Errorf("writing %s: %w", path, err)
}

func writeGenState(path string, st genState) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	return writeFileAtomic(path, append(b, '\n'))
}

// pickGeneration chooses this batond's generation from the state file and says why in the log.
func (d *daemon) pickGeneration() error {
	path := filepath.Join(d.cfg.stateDir(), generationFile)
	d.rl.path = filepath.Join(d.cfg.stateDir(), reloadFile)
	st, ok, err := readGenState(path)
	if err != nil {
		return err
	}
	c := chooseGeneration(st, ok, d.upg.HasParent())
	d.gen, d.adopt = c.gen, c.adopt
	d.log = d.log.With("gen", c.gen)
	switch {
	case c.adopt:
		d.log.Warn("the last batond did not stop cleanly: keeping its generation and adopting its workers",
			"generation", c.gen, "last_pid", c.prev.PID, "serving_since", c.prev.Since, "adopt_window", d.cfg.AdoptWindow)
	case d.upg.HasParent():
		d.beginAsChild(c.prev.Generation)
	case ok:
		d.log.Info("resuming after a clean stop", "generation", c.gen, "resumes_from", c.prev.Generation, "stopped_at", c.prev.StoppedAt)
	}
	return nil
}

// markServing records, once this batond serves, that its generation is the one serving.
func (d *daemon) markServing() {
	st := genState{Generation: d.gen, PID: os.Getpid(), Since: time.Now()}
	if err := writeGenState(filepath.Join(d.cfg.stateDir(), generationFile), st); err != nil {
		d.log.Error("generation state not saved: the next start may pick the wrong generation", "error", err)
	}
}

// markStopped records a clean stop of this batond's generation (its workers are gone). It
// leaves a record written by another batond alone.
func (d *daemon) markStopped() {
	path := filepath.Join(d.cfg.stateDir(), generationFile)
	st, ok, err := readGenState(path)
	if err != nil || !ok || st.Generation != d.gen || st.PID != os.Getpid() {
		return
	}
	st.Stopped, st.StoppedAt = true, time.Now()
	if err := writeGenState(path, st); err != nil {
		d.log.Error("clean stop not recorded: the next start will look for workers to adopt", "error", err)
	}
}
