package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/baton-gw/baton/cmd/internal/admin"
)

// reloadFile, in the state directory, carries the latest reload's record between the two
// batonds of a reload: the old one writes it when the reload starts, the new one adds its pid
// and generation as soon as it has chosen them (the old one shows them while it waits) and
// marks the reload succeeded once it serves: after a successful reload only the new batond is
// left to say so.
const reloadFile = "reload.json"

// reloads owns the latest reload's record in this batond.
type reloads struct {
	mu   sync.Mutex
	rec  admin.ReloadRecord
	path string
	wg   sync.WaitGroup // the running reload's goroutine
}

func (r *reloads) readFile() (admin.ReloadRecord, bool) {
	b, err := os.ReadFile(r.path)
	if err != nil {
		return admin.ReloadRecord{}, false
	}
	var rec admin.ReloadRecord
	if json.Unmarshal(b, &rec) != nil {
		return admin.ReloadRecord{}, false
	}
	return rec, true
}

// setLocked records rec here and in the file. A reload's outcome does not depend on the file:
// failing to write it is logged, not fatal.
func (d *daemon) setReloadLocked(rec admin.ReloadRecord) {
	d.rl.rec = rec
	b, _ := json.Marshal(rec)
	if err := writeFileAtomic(d.rl.path, append(b, '\n')); err != nil {
		d.log.Warn("reload record not saved", "error", err)
	}
}

// LastReload implements admin.Source. While a reload runs, the next batond's pid and
// generation come from the record it writes.
func (d *daemon) LastReload() admin.ReloadRecord {
	d.rl.mu.Lock()
	defer d.rl.mu.Unlock()
	rec := d.rl.rec
	if rec.State == "" {
		return admin.ReloadRecord{State: admin.ReloadNone}
	}
	if rec.State == admin.ReloadRunning && rec.FromPID == os.Getpid() {
		if f, ok := d.rl.readFile(); ok && f.FromPID == rec.FromPID && f.Started.Equal(rec.Started) {
			rec.ToPID, rec.ToGeneration = f.ToPID, f.ToGeneration
		}
	}
	return rec
}

// reloadingDetail says who is starting: "batond pid 812 starting generation 8".
func reloadingDetail(rec admin.ReloadRecord) string {
	if rec.ToPID == 0 {
		return "the next batond is starting"
	}
	return fmt.Sprintf("batond pid %d starting generation %d", rec.ToPID, rec.ToGeneration)
}

// StartReload implements admin.Source: one reload at a time, only while serving.
func (d *daemon) StartReload(migrate bool) (<-chan struct{}, error) {
	if p, _ := d.life.get(); p != admin.PhaseServing {
		return nil, fmt.Errorf("%w: batond is %s, not serving", admin.ErrReloadRefused, p)
	}
	if rec := d.LastReload(); rec.State == admin.ReloadRunning {
		return nil, fmt.Errorf("%w: a reload is already running since %s (%s)", admin.ErrReloadRefused,
			rec.Started.Format("15:04:05"), reloadingDetail(rec))
	}
	d.rl.mu.Lock()
	defer d.rl.mu.Unlock()
	if d.rl.rec.State == admin.ReloadRunning { // lost a race with another request
		return nil, fmt.Errorf("%w: a reload is already running", admin.ErrReloadRefused)
	}
	d.setReloadLocked(admin.ReloadRecord{State: admin.ReloadRunning, Started: time.Now(), FromGeneration: d.gen, FromPID: os.Getpid(),
		Migrate: migrate || d.cfg.Migrate})
	done := make(chan struct{})
	d.rl.wg.Add(1)
	go func() {
		defer d.rl.wg.Done()
		defer close(done)
		d.reload()
	}()
	return done, nil
}

// reload starts the binary on disk as the next batond and records the outcome.
func (d *daemon) reload() {
	err := d.upgrade()
	rec := d.LastReload() // with the next batond's pid and generation, if it got that far
	rec.Finished = time.Now()
	if err == nil {
		rec.State = admin.ReloadSucceeded
		d.log.Info("reload succeeded: the new batond serves", "pid", rec.ToPID, "generation", rec.ToGeneration)
		d.adm.StopAccepting() // before the answer goes out: the client's next request is the new batond's
	} else {
		rec.State, rec.Error = admin.ReloadFailed, err.Error()
		d.notify.ready(os.Getpid(), d.statusLine())
		d.log.Error("reload failed; still serving", "error", err)
	}
	d.countReload(err, rec.Finished.Sub(rec.Started))
	d.rl.mu.Lock()
	if err == nil {
		d.rl.rec = rec // the file is the new batond's now
	} else {
		d.setReloadLocked(rec)
	}
	d.rl.mu.Unlock()
}

// upgrade runs tableflip's upgrade and returns nil once the next batond serves.
func (d *daemon) upgrade() error {
	// After a reload, tableflip refuses the next one until our own parent has exited; it
	// exits within seconds of handing over.
	wctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	err := d.upg.WaitForParent(wctx)
	cancel()
	if err != nil {
		return fmt.Errorf("the previous batond has not exited yet: %w", err)
	}
	errFile := filepath.Join(d.cfg.stateDir(), reloadErrFile)
	os.Remove(errFile)
	d.log.Info("reloading: starting the binary on disk")
	d.notify.reloading()
	d.sup.PauseRegistrations()
	if err = d.upg.Upgrade(); err == nil {
		return nil
	}
	d.sup.ResumeRegistrations()
	if why, rerr := os.ReadFile(errFile); rerr == nil && len(why) > 0 {
		err = fmt.Errorf("%s (%v)", strings.TrimSpace(string(why)), err)
	}
	return err
}

// reloadOnSIGHUP is `kill -HUP`: a reload whose outcome goes to the log.
func (d *daemon) reloadOnSIGHUP() {
	if _, err := d.StartReload(false); err != nil {
		d.log.Warn("SIGHUP: no reload", "reason", err)
	}
}

// beginAsChild, in an upgrade child, takes over the reload record the old batond started and
// adds this batond's pid and generation.
func (d *daemon) beginAsChild(prevGen uint64) {
	d.rl.mu.Lock()
	defer d.rl.mu.Unlock()
	rec, ok := d.rl.readFile()
	if !ok || rec.FromPID != os.Getppid() || rec.State != admin.ReloadRunning {
		// An old batond that keeps no record: what we know ourselves.
		rec = admin.ReloadRecord{State: admin.ReloadRunning, Started: time.Now(), FromPID: os.Getppid(), FromGeneration: prevGen}
	}
	rec.ToPID, rec.ToGeneration = os.Getpid(), d.gen
	d.setReloadLocked(rec)
}

// succeededAsChild records, in the new batond once it serves, that the reload succeeded.
func (d *daemon) succeededAsChild() {
	d.rl.mu.Lock()
	defer d.rl.mu.Unlock()
	rec := d.rl.rec
	rec.State, rec.Finished = admin.ReloadSucceeded, time.Now()
	d.setReloadLocked(rec)
	d.countReload(nil, rec.Finished.Sub(rec.Started)) // the reload that made this batond
}
