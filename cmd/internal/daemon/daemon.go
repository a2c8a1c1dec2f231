package daemon

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
	"github.com/hashicorp/go-hclog"

	"github.com/baton-gw/baton/cmd/internal/admin"
	"github.com/baton-gw/baton/cmd/internal/demo"
	"github.com/baton-gw/baton/proxy"
	"github.com/baton-gw/baton/supervisor"
)

// demoArg is the hidden first argument with which batond re-executes itself as a demo worker.
const demoArg = "demo-worker"

// reloadErrFile, in the state directory, is where a batond that fails to start after an
// upgrade leaves its reason, for the old batond to return to `batonctl reload`.
const reloadErrFile = "reload-error"

// Main runs batond with args (os.Args) and returns the exit code.
func Main(args []string, stderr io.Writer) int {
	if len(args) > 1 && args[1] == demoArg {
		label := ""
		if len(args) > 2 {
			label = args[2]
		}
		return demo.Main(label)
	}
	cfg, err := ParseFlags(args[1:], stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err == nil && cfg.Version {
		fmt.Fprintln(stderr, "batond", admin.Version())
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "batond:", err)
		if errors.Is(err, ErrUsage) {
			fmt.Fprintln(stderr, "run 'batond -h' for usage")
			return 2
		}
		reportStartFailure(cfg, args[1:], err)
		return 1
	}
	log := hclog.New(&hclog.LoggerOptions{
		Name: "batond", Level: hclog.LevelFromString(cfg.LogLevel), JSONFormat: cfg.LogJSON,
		Output: stderr, TimeFormat: hclog.TimeFormat, // with the date: a log outlives a day
	})
	if err := run(cfg, log); err != nil {
		log.Error("batond failed", "error", err)
		reportStartFailure(cfg, args[1:], err)
		return 1
	}
	return 0
}

// reportStartFailure leaves the reason for the old batond when this process is an upgrade.
// With a bad configuration cfg is nil, so the state directory is found from the flags alone.
func reportStartFailure(cfg *Config, args []string, err error) {
	if os.Getenv("TABLEFLIP_HAS_PARENT_7DIU3") == "" {
		return
	}
	dir := ""
	if cfg != nil {
		dir = cfg.stateDir()
	} else if c, perr := ParseFlags(stripConfig(args), io.Discard); perr == nil {
		dir = c.stateDir()
	}
	if dir != "" {
		_ = os.WriteFile(filepath.Join(dir, reloadErrFile), []byte(err.Error()), 0o600)
	}
}

// stripConfig drops -config so that flags can be parsed when the file itself is the problem.
func stripConfig(args []string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			return append(out, args[i:]...)
		}
		if a == "-config" || a == "--config" {
			i++
			continue
		}
		if strings.HasPrefix(a, "-config=") || strings.HasPrefix(a, "--config=") {
			continue
		}
		out = append(out, a)
	}
	return out
}

func (c *Config) stateDir() string {
	if c.StateDir != "" {
		return c.StateDir
	}
	return filepath.Dir(c.Socket)
}

// daemon is one running batond.
type daemon struct {
	cfg    *Config
	log    hclog.Logger
	upg    *tableflip.Upgrader
	notify notifier
	gw     *proxy.Gateway
	sup    *supervisor.Supervisor
	gen    uint64
	lns    []*proxy.Listener
	regL   *net.UnixListener
	admL   *net.UnixListener
	adm    *admin.Server
	adopt  bool // the last generation did not stop cleanly: its workers are adopted
	fleet  fleet
	// hostDrainAtReady: the host was drained when the last batond left (a file in the state
	// directory); the drain resumes once this one serves (its own probe must get through).
	hostDrainAtReady bool

	life      lifecycle
	rl        reloads
	admCancel context.CancelFunc
	admDone   chan struct{} // nil until the admin server runs

	statusCancel context.CancelFunc
	statusDone   chan struct{} // nil unless the systemd STATUS= loop runs
}

func run(cfg *Config, log hclog.Logger) error {
	d := &daemon{cfg: cfg, log: log, notify: notifier{log: log}}
	upg, err := tableflip.New(tableflip.Options{PIDFile: cfg.PIDFile, UpgradeTimeout: cfg.ReadyTimeout + 15*time.Second})
	if err != nil {
		return fmt.Errorf("tableflip: %w", err)
	}
	d.upg = upg
	defer upg.Stop()
	// Signals from the very start: a SIGTERM while the workers start must stop them too (the
	// default action would orphan them), and a SIGHUP must not kill a batond still starting.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	d.life.set(admin.PhaseStarting, time.Now().Add(cfg.ReadyTimeout))
	act := takeActivation()
	err = d.setup(act)
	act.close() // anything systemd passed that we did not take
	if err != nil {
		return err
	}
	defer d.closeAdmin()
	// A fresh batond answers on the admin socket from now on, so an operator sees it start.
	// An upgrade child must not: the socket is shared with the old batond, which answers (that
	// it is reloading) until this one serves.
	if !upg.HasParent() {
		d.serveAdmin()
	}
	if err := d.start(sigs); err != nil {
		return err
	}
	// Fed from here on, while the gateway works; the next batond feeds it after a reload.
	stopWatchdog := d.startWatchdog()
	defer stopWatchdog()
	for {
		select {
		case s := <-sigs:
			if s == syscall.SIGHUP {
				d.reloadOnSIGHUP()
				continue
			}
			d.shutdown(s, sigs)
			d.closeAdmin()
			d.rl.wg.Wait()
			return nil
		case <-upg.Exit():
			log.Info("the next batond is serving; handing over")
			stopWatchdog() // the next batond feeds it now
			// Stop taking admin connections at once (the next batond answers them now); the
			// reload request that brought us here still gets its answer.
			d.adm.StopAccepting()
			d.handOver()
			d.closeAdmin()
			d.rl.wg.Wait()
			return nil
		}
	}
}

// start runs the workers, passes the health gate, tells tableflip (and so the old batond, and
// systemd) that this batond serves, and starts accepting clients.
func (d *daemon) start(sigs <-chan os.Signal) error {
	d.sup.Start()
	go func() {
		if err := d.sup.Serve(d.regL); err != nil {
			d.log.Error("registration socket", "error", err)
		}
	}()
	// The health gate: every worker ready, then one real handoff end to end.
	if err := d.healthGate(sigs); err != nil {
		d.abort()
		return err
	}
	if err := d.upg.Ready(); err != nil {
		d.abort()
		return fmt.Errorf("ready (pid file %q): %w", d.cfg.PIDFile, err)
	}
	d.markServing()
	if d.upg.HasParent() {
		d.succeededAsChild()
		d.serveAdmin()
	}
	d.life.set(admin.PhaseServing, time.Time{})
	for _, l := range d.lns {
		go func() {
			if err := d.gw.Serve(l); err != nil {
				d.log.Error("listener stopped", "listener", l.Name(), "error", err)
			}
		}()
	}
	if d.hostDrainAtReady {
		d.gw.SetHostDrain(true)
		d.log.Info("the host is drained (batonctl undrain ends it)")
	}
	d.notify.ready(os.Getpid(), d.statusLine())
	ctx, cancel := context.WithCancel(context.Background())
	d.statusCancel, d.statusDone = cancel, make(chan struct{})
	waitFleet := d.serveFleet(ctx)
	go func() {
		defer close(d.statusDone)
		defer waitFleet()
		d.statusLoop(ctx)
	}()
	d.log.Info("serving", "listen", d.listenerNames(), "workers", d.cfg.Workers, "generation", d.gen, "pid", os.Getpid())
	return nil
}

// serveAdmin starts the admin server; closeAdmin stops it and waits for the answers under way.
func (d *daemon) serveAdmin() {
	ctx, cancel := context.WithCancel(context.Background())
	d.admCancel, d.admDone = cancel, make(chan struct{})
	go func() {
		defer close(d.admDone)
		if err := d.adm.Run(ctx); err != nil {
			d.log.Error("admin socket", "error", err)
		}
	}()
}

func (d *daemon) closeAdmin() {
	if d.statusDone != nil {
		d.statusCancel()
		<-d.statusDone
		d.statusDone = nil
	}
	if d.admDone == nil {
		d.adm.StopAccepting() // never served: just close it
		return
	}
	d.admCancel()
	<-d.admDone
}

// setup creates or inherits every socket, then builds the gateway and the supervisor.
func (d *daemon) setup(act activated) error {
	cfg := d.cfg
	for _, dir := range []string{filepath.Dir(cfg.Socket), filepath.Dir(cfg.Admin), cfg.stateDir()} {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return err
		}
	}
	if err := d.pickGeneration(); err != nil {
		return err
	}
	keyFile := cfg.KeyFile
	if keyFile == "" {
		keyFile = cfg.Socket + ".key"
	}
	key, err := supervisor.LoadOrCreateKey(keyFile)
	if err != nil {
		return err
	}
	command := cfg.Command
	if len(command) == 0 {
		self, err := os.Executable()
		if err != nil {
			return fmt.Errorf("finding batond's own binary for the demo workers: %w", err)
		}
		command = []string{self, demoArg}
	}
	if command, err = supervisor.ResolveCommand(command); err != nil {
		return err
	}
	if d.lns, err = publicListeners(d.upg, act, cfg.Listen); err != nil {
		return err
	}
	if d.regL, err = unixListener(d.upg, act, fdNameWorkers, fdNameWorkers, "unixpacket", cfg.Socket, 0o600); err != nil {
		return fmt.Errorf("registration socket: %w", err)
	}
	if d.admL, err = unixListener(d.upg, act, fdKeyAdmin, "", "unix", cfg.Admin, os.FileMode(cfg.AdminMode)); err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	d.adm = admin.NewServer(d.admL, d, d.log.Named("admin"))
	if err := d.openFleet(); err != nil {
		return err
	}
	d.gw = proxy.New(proxy.Config{
		HandoffTimeout:  cfg.HandoffTimeout,
		AcceptCoalesce:  cfg.AcceptCoalesce,
		QueueTimeout:    cfg.QueueTimeout,
		DefaultCapacity: cfg.Capacity,
		Logger:          d.log.Named("proxy"),
	})
	d.sup = supervisor.New(supervisor.Config{
		Command:      command,
		Workers:      cfg.Workers,
		Generation:   d.gen,
		Adopt:        d.adopt,
		AdoptWindow:  cfg.AdoptWindow,
		Socket:       cfg.Socket,
		Key:          key,
		AllowUIDs:    cfg.AllowUIDs,
		StartTimeout: cfg.StartTimeout,
		DrainTimeout: cfg.DrainTimeout,
		// A migrating reload: the record the old batond started says so (batonctl reload
		// -migrate), or the configuration does for every reload.
		MigrateOthers:  cfg.Migrate || d.rl.rec.Migrate,
		MigrateTimeout: cfg.MigrateTimeout,
		Logger:         d.log.Named("supervisor"),
		// systemd sets JOURNAL_STREAM when our stderr is the journal: workers write there
		// directly, so their logs survive a reload or a batond crash with them.
		PassOutput: os.Getenv("JOURNAL_STREAM") != "",
	}, d.gw)
	return nil
}

// errStoppedStarting: SIGTERM or SIGINT came before batond served.
var errStoppedStarting = errors.New("stopped by a signal before serving")

// healthGate waits (up to -ready-timeout) until every worker of this generation is ready and
// one handoff has gone end to end.
func (d *daemon) healthGate(sigs <-chan os.Signal) error {
	ctx, cancel := context.WithTimeout(context.Background(), d.cfg.ReadyTimeout)
	defer cancel()
	for {
		// The roster wakes us at each change of any worker's state: no polling.
		ws, changed := d.sup.Roster().Watch()
		if supervisor.ReadyIn(ws, d.gen) >= d.cfg.Workers {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not serving after -ready-timeout %v: %d of %d workers ready (%s)",
				d.cfg.ReadyTimeout, d.sup.ReadyCount(), d.cfg.Workers, d.sup.LastExits())
		case s := <-sigs:
			if s == syscall.SIGHUP {
				d.log.Warn("SIGHUP while starting: ignored (not serving yet)")
				continue
			}
			d.log.Info("stopping before serving", "signal", s)
			return errStoppedStarting
		case <-changed:
		}
	}
	// (A signal during these milliseconds waits in the channel for the main loop.)
	return d.gw.SelfCheck(ctx)
}

// abort undoes a start that failed its health gate: the new workers go, nothing else is
// touched (the listeners stay open in the old batond, or in systemd).
func (d *daemon) abort() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	d.sup.Stop(ctx, time.Second)
	cancel()
	d.gw.Close()
}

// handOver ends this batond after a successful upgrade: finish in-flight handoffs, tell the
// workers to drain (they re-register with the next batond and keep their sessions), exit.
func (d *daemon) handOver() {
	d.gw.StopAccepting()
	ctx, cancel := context.WithTimeout(context.Background(), d.cfg.HandoffTimeout+time.Second)
	d.gw.WaitIdle(ctx)
	cancel()
	d.sup.Detach(d.cfg.DrainTimeout)
	d.gw.Close()
}

func (d *daemon) listenerNames() string {
	var s []string
	for _, l := range d.lns {
		s = append(s, l.Addr().String())
	}
	return strings.Join(s, ",")
}

// Status implements admin.Source.
func (d *daemon) Status() admin.Status {
	s := admin.Status{PID: os.Getpid(), Generation: d.gen, Version: admin.Version(), Workers: d.sup.Status(), Gateway: d.gw.Stats(), Runtime: admin.ReadRuntime()}
	for _, l := range d.lns {
		s.Listeners = append(s.Listeners, l.Addr().String())
	}
	for _, w := range s.Workers {
		s.Clients += w.Clients
		if w.State == supervisor.StateDraining {
			s.Draining++
		}
	}
	s.HostDrained, s.Handoff, s.Migration = d.gw.HostDrained(), d.handoffLatency(), d.gw.MigrationStats()
	d.setPhase(&s)
	return s
}

// statusLine is systemd's STATUS=: generation 7 · 8 workers · 1532 clients · 2 draining.
func (d *daemon) statusLine() string {
	st := d.Status()
	return fmt.Sprintf("generation %d · %d workers · %d clients · %d draining", st.Generation, d.sup.ReadyCount(), st.Clients, st.Draining)
}

func (d *daemon) statusLoop(ctx context.Context) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	last := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if s := d.statusLine(); s != last {
				d.notify.status(s)
				last = s
			}
		}
	}
}
