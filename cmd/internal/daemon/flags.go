package daemon

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// ErrUsage marks errors in the command line; Main prints usage and exits 2.
var ErrUsage = errors.New("usage")

// Config is batond's configuration.
type Config struct {
	ConfigFile     string
	Listen         []string
	Workers        int
	Capacity       int
	Socket         string
	Admin          string
	AdminMode      uint32
	KeyFile        string
	StateDir       string
	PIDFile        string
	HandoffTimeout time.Duration
	AcceptCoalesce time.Duration
	QueueTimeout   time.Duration
	StartTimeout   time.Duration
	ReadyTimeout   time.Duration
	DrainTimeout   time.Duration
	// Migrate: on every reload the old workers hand their sessions to the new ones (those
	// whose library takes part); MigrateTimeout is how long a worker has to answer.
	Migrate        bool
	MigrateTimeout time.Duration
	StopTimeout    time.Duration
	AdoptWindow    time.Duration
	AllowUIDs      []uint32
	LogLevel       string
	LogJSON        bool
	Command        []string // empty: built-in demo workers
	Fleet          FleetConfig
	Version        bool // -version: print the version and exit
}

// maxAcceptCoalesce bounds -accept-coalesce: it is added to a connection's handoff at high
// rates, and past a few milliseconds the wake-ups it saves are not worth the wait.
const maxAcceptCoalesce = 100 * time.Millisecond

type listFlag struct{ v *[]string }

func (l listFlag) String() string {
	if l.v == nil {
		return ""
	}
	return strings.Join(*l.v, ",")
}
func (l listFlag) Set(s string) error { *l.v = append(*l.v, s); return nil }

type uidFlag struct{ v *[]uint32 }

func (u uidFlag) String() string { return "" }
func (u uidFlag) Set(s string) error {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return fmt.Errorf("not a uid: %q", s)
	}
	*u.v = append(*u.v, uint32(n))
	return nil
}

// ParseFlags parses batond's command line (without the program name).
func ParseFlags(args []string, stderr io.Writer) (*Config, error) {
	c := &Config{}
	fs := flag.NewFlagSet("batond", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.ConfigFile, "config", "", "TOML configuration `file` (flags given on the command line win over it)")
	fs.Var(listFlag{&c.Listen}, "listen", "public `address` to accept clients on (repeatable) (default 127.0.0.1:7000)")
	fs.IntVar(&c.Workers, "workers", 2, "worker processes to run")
	fs.IntVar(&c.Capacity, "capacity", 1000, "most clients per worker, for workers that do not declare their own")
	fs.StringVar(&c.Socket, "socket", "/run/baton/workers.sock", "registration socket `path` (workers connect here)")
	fs.StringVar(&c.Admin, "admin", "/run/baton/admin.sock", "admin socket `path` (batonctl connects here)")
	adminMode := fs.String("admin-mode", "0600", "file mode of the admin socket")
	fs.StringVar(&c.KeyFile, "key", "", "token key `file` (default: next to -socket, created 0600 if missing)")
	fs.StringVar(&c.StateDir, "state", "", "state `dir` (generation counter; default: the directory of -socket)")
	fs.StringVar(&c.PIDFile, "pidfile", "", "write the serving batond's pid to this `file`")
	fs.DurationVar(&c.HandoffTimeout, "handoff-timeout", 2*time.Second, "a worker must ACK a connection within this")
	fs.DurationVar(&c.AcceptCoalesce, "accept-coalesce", time.Millisecond, "while clients keep arriving, wake to accept at most once per this interval and hand over what arrived in one go (0: wake for every client; at most 100ms)")
	fs.DurationVar(&c.QueueTimeout, "queue-timeout", 5*time.Second, "a client waits this long for a free worker before it is closed")
	fs.DurationVar(&c.StartTimeout, "start-timeout", 10*time.Second, "a worker must report READY within this after start")
	fs.DurationVar(&c.ReadyTimeout, "ready-timeout", 30*time.Second, "batond must be serving within this after start or upgrade")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", 5*time.Minute, "draining workers get this long before SIGTERM")
	fs.BoolVar(&c.Migrate, "migrate", false, "on every reload, old workers hand their live sessions (socket and state) to the new ones instead of keeping them until they end (workers must take part: see README \"Upgrading without waiting\")")
	fs.DurationVar(&c.MigrateTimeout, "migrate-timeout", 10*time.Second, "a worker asked for its sessions must answer within this; what it has not handed back by then stays with it and drains")
	fs.DurationVar(&c.StopTimeout, "stop-timeout", 20*time.Second, "on SIGTERM, workers get this long to finish before SIGTERM, then SIGKILL")
	fs.DurationVar(&c.AdoptWindow, "adopt-window", 5*time.Second, "after a crash of batond, each slot waits this long for its surviving worker to re-register and be adopted before starting a new one")
	fs.BoolVar(&c.Version, "version", false, "print the version and exit")
	fs.Var(uidFlag{&c.AllowUIDs}, "allow-uid", "also allow workers running as this `uid` to register (repeatable)")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: trace, debug, info, warn, error")
	fs.BoolVar(&c.LogJSON, "log-json", false, "log JSON lines")
	c.Fleet.flags(fs)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: batond [flags] [-- worker-command args...]\n\n"+
			"With no worker command, batond runs built-in demo workers (a small echo lobby).\n\nflags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %v", ErrUsage, err)
	}
	if c.Version {
		return c, nil
	}
	c.Command = fs.Args()
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if c.ConfigFile != "" {
		if err := loadFile(c.ConfigFile, c, set); err != nil {
			return nil, err
		}
	}
	if len(c.Listen) == 0 {
		c.Listen = []string{"127.0.0.1:7000"}
	}
	m, err := strconv.ParseUint(*adminMode, 8, 32)
	if err != nil || m > 0o777 {
		return nil, fmt.Errorf("%w: -admin-mode %q is not an octal file mode", ErrUsage, *adminMode)
	}
	c.AdminMode = uint32(m)
	switch {
	case c.Workers < 1:
		return nil, fmt.Errorf("%w: -workers must be at least 1, not %d", ErrUsage, c.Workers)
	case c.Capacity < 1:
		return nil, fmt.Errorf("%w: -capacity must be at least 1, not %d", ErrUsage, c.Capacity)
	case c.HandoffTimeout <= 0 || c.QueueTimeout <= 0 || c.StartTimeout <= 0 || c.ReadyTimeout <= 0 || c.DrainTimeout <= 0 || c.MigrateTimeout <= 0 || c.StopTimeout <= 0 || c.AdoptWindow <= 0:
		return nil, fmt.Errorf("%w: timeouts must be positive", ErrUsage)
	case c.Fleet.ProxyTimeout <= 0:
		return nil, fmt.Errorf("%w: -proxy-timeout must be positive", ErrUsage)
	case c.AcceptCoalesce < 0 || c.AcceptCoalesce > maxAcceptCoalesce:
		return nil, fmt.Errorf("%w: -accept-coalesce must be between 0 and %v, not %v", ErrUsage, maxAcceptCoalesce, c.AcceptCoalesce)
	}
	switch strings.ToLower(c.LogLevel) {
	case "trace", "debug", "info", "warn", "error":
	default:
		return nil, fmt.Errorf("%w: -log-level %q is not one of trace, debug, info, warn, error", ErrUsage, c.LogLevel)
	}
	return c, nil
}
