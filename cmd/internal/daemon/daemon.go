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
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
	"github.com/hashicorp/go-hclog"

	"github.com/baton-gw/baton/cmd/internal/admin"
	"github.com/baton-gw/baton/cmd/internal/demo"
	"github.com/baton-gw/baton/handoff"
	"github.com/baton-gw/baton/proxy"
	"github.com/baton-gw/baton/supervisor"
)

// demoArg is the hidden first argument with which batond re-executes itself as a demo worker.
const demoArg = "demo-worker"

// Main runs batond with args (os.Args) and returns the exit code.
func Main(args []string, stderr io.Writer) int {
	if len(args) > 1 && args[1] == demoArg {
		return demo.Main()
	}
	cfg, err := ParseFlags(args[1:], stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "batond:", err)
		fmt.Fprintln(stderr, "run 'batond -h' for usage")
		return 2
	}
	log := hclog.New(&hclog.LoggerOptions{
		Name: "batond", Level: hclog.LevelFromString(cfg.LogLevel), JSONFormat: cfg.LogJSON,
		Output: stderr, TimeFormat: "15:04:05.000",
	})
	if err := run(cfg, log); err != nil {
		log.Error("batond failed", "error", err)
		return 1
	}
	return 0
}

// daemon is one running batond.
type daemon struct {
	cfg  *Config
	log  hclog.Logger
	upg  *tableflip.Upgrader
	gw   *proxy.Gateway
	sup  *supervisor.Supervisor
	gen  uint64
	lns  []*proxy.Listener
	regL *net.UnixListener
	admL *net.UnixListener
}

func run(cfg *Config, log hclog.Logger) (err error) {
	d := &daemon{cfg: cfg, log: log}
	upg, err := tableflip.New(tableflip.Options{PIDFile: cfg.PIDFile, UpgradeTimeout: cfg.ReadyTimeout + 10*time.Second})
	if err != nil {
		return fmt.Errorf("tableflip: %w", err)
	}
	d.upg = upg
	defer upg.Stop()

	if err := d.setup(); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		if err := admin.Serve(ctx, d.admL, d); err != nil {
			log.Error("admin socket", "error", err)
		}
	}()
	d.sup.Start()
	go func() {
		if err := d.sup.Serve(d.regL); err != nil {
			log.Error("registration socket", "error", err)
		}
	}()
	for _, l := range d.lns {
		go func() {
			if err := d.gw.Serve(l); err != nil {
				log.Error("listener stopped", "listener", l.Name(), "error", err)
			}
		}()
	}

	if err := d.waitServing(); err != nil {
		d.stop()
		return err
	}
	if err := upg.Ready(); err != nil {
		d.stop()
		return fmt.Errorf("ready (pid file %q): %w", cfg.PIDFile, err)
	}
	log.Info("serving", "listen", strings.Join(cfg.Listen, ","), "workers", cfg.Workers, "generation", d.gen, "pid", os.Getpid())

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	for {
		select {
		case s := <-sigs:
			if s == syscall.SIGHUP {
				log.Info("upgrading: starting the binary on disk")
				if err := upg.Upgrade(); err != nil {
					log.Error("upgrade failed; still serving", "error", err)
				}
				continue
			}
			log.Info("stopping", "signal", s)
			d.stop()
			return nil
		case <-upg.Exit():
			log.Info("the next batond is serving; handing over")
			d.handOver()
			return nil
		}
	}
}

// setup creates or inherits every socket, then builds the gateway and the supervisor.
func (d *daemon) setup() error {
	cfg := d.cfg
	for _, dir := range []string{filepath.Dir(cfg.Socket), filepath.Dir(cfg.Admin)} {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return err
		}
	}
	stateDir := cfg.StateDir
	if stateDir == "" {
		stateDir = filepath.Dir(cfg.Socket)
	}
	gen, err := nextGeneration(filepath.Join(stateDir, "generation"))
	if err != nil {
		return err
	}
	d.gen = gen
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

	for _, addr := range cfg.Listen {
		ln, err := d.upg.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("listen %s: %w", addr, err)
		}
		tl, ok := ln.(*net.TCPListener)
		if !ok {
			return fmt.Errorf("listen %s: not a TCP listener", addr)
		}
		if err := proxy.SetNoDelay(tl); err != nil {
			return fmt.Errorf("listen %s: %w", addr, err)
		}
		l, err := proxy.NewListener(addr, tl)
		if err != nil {
			return err
		}
		d.lns = append(d.lns, l)
	}
	if d.regL, err = d.unixListener("unixpacket", cfg.Socket, 0o600); err != nil {
		return fmt.Errorf("registration socket: %w", err)
	}
	if d.admL, err = d.unixListener("unix", cfg.Admin, os.FileMode(cfg.AdminMode)); err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}

	d.gw = proxy.New(proxy.Config{
		HandoffTimeout:  cfg.HandoffTimeout,
		QueueTimeout:    cfg.QueueTimeout,
		DefaultCapacity: cfg.Capacity,
		Logger:          d.log.Named("proxy"),
	})
	d.sup = supervisor.New(supervisor.Config{
		Command:      command,
		Workers:      cfg.Workers,
		Generation:   gen,
		Socket:       cfg.Socket,
		Key:          key,
		AllowUIDs:    cfg.AllowUIDs,
		StartTimeout: cfg.StartTimeout,
		DrainTimeout: cfg.DrainTimeout,
		Logger:       d.log.Named("supervisor"),
	}, d.gw)
	return nil
}

// unixListener inherits the socket from the previous batond or creates it.
func (d *daemon) unixListener(network, path string, mode os.FileMode) (*net.UnixListener, error) {
	ln, err := d.upg.Fds.Listener(network, path)
	if err != nil {
		return nil, err
	}
	if ln == nil {
		ul, err := handoff.ListenUnix(network, path, mode)
		if err != nil {
			return nil, err
		}
		if err := d.upg.Fds.AddListener(network, path, ul); err != nil {
			ul.Close()
			return nil, err
		}
		return ul, nil
	}
	ul, ok := ln.(*net.UnixListener)
	if !ok {
		ln.Close()
		return nil, fmt.Errorf("inherited %s is not a Unix listener", path)
	}
	return ul, nil
}

// waitServing waits until every worker of this generation is ready.
func (d *daemon) waitServing() error {
	deadline := time.Now().Add(d.cfg.ReadyTimeout)
	for d.sup.ReadyCount() < d.cfg.Workers {
		if time.Now().After(deadline) {
			return fmt.Errorf("only %d of %d workers ready after %v", d.sup.ReadyCount(), d.cfg.Workers, d.cfg.ReadyTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// stop is the graceful stop: no new clients, in-flight handoffs finish, workers drain.
func (d *daemon) stop() {
	d.gw.StopAccepting()
	ctx, cancel := context.WithTimeout(context.Background(), d.cfg.HandoffTimeout+time.Second)
	d.gw.WaitIdle(ctx)
	cancel()
	ctx, cancel = context.WithTimeout(context.Background(), d.cfg.StopTimeout)
	d.sup.Stop(ctx, d.cfg.StopTimeout)
	cancel()
	d.gw.Close()
	d.log.Info("stopped")
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

// Status implements admin.Source.
func (d *daemon) Status() admin.Status {
	s := admin.Status{PID: os.Getpid(), Generation: d.gen, Workers: d.sup.Status(), Gateway: d.gw.Stats()}
	for _, l := range d.lns {
		s.Listeners = append(s.Listeners, l.Addr().String())
	}
	for _, w := range s.Workers {
		s.Clients += w.Clients
		if w.State == supervisor.StateDraining {
			s.Draining++
		}
	}
	return s
}

// nextGeneration increments the generation counter in path. Every batond start is a new
// generation, so workers that outlive a batond are told apart from the ones it starts.
func nextGeneration(path string) (uint64, error) {
	var gen uint64
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		gen, err = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s:1: not a generation number: %q", path, strings.TrimSpace(string(b)))
		}
	case !errors.Is(err, os.ErrNotExist):
		return 0, err
	}
	gen++
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.FormatUint(gen, 10)+"\n"), 0o600); err != nil {
		os.Remove(tmp)
		return 0, fmt.Errorf("writing the generation counter: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return 0, err
	}
	return gen, nil
}
