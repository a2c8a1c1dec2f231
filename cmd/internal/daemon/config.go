package daemon

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// ErrConfig marks a bad configuration file; the message names the file and line.
var ErrConfig = errors.New("bad configuration")

// fileConfig is the TOML configuration file. Every key mirrors a flag; a flag given on the
// command line wins over the file.
type fileConfig struct {
	Listen         []string  `toml:"listen"`
	Workers        *int      `toml:"workers"`
	Capacity       *int      `toml:"capacity"`
	Socket         *string   `toml:"socket"`
	Admin          *string   `toml:"admin"`
	State          *string   `toml:"state"`
	Key            *string   `toml:"key"`
	PIDFile        *string   `toml:"pidfile"`
	Command        []string  `toml:"command"`
	HandoffTimeout *duration `toml:"handoff_timeout"`
	AcceptCoalesce *interval `toml:"accept_coalesce"`
	QueueTimeout   *duration `toml:"queue_timeout"`
	StartTimeout   *duration `toml:"start_timeout"`
	ReadyTimeout   *duration `toml:"ready_timeout"`
	DrainTimeout   *duration `toml:"drain_timeout"`
	Migrate        *bool     `toml:"migrate"`
	MigrateTimeout *duration `toml:"migrate_timeout"`
	StopTimeout    *duration `toml:"stop_timeout"`
	AdoptWindow    *duration `toml:"adopt_window"`
	AllowUIDs      []uint32  `toml:"allow_uid"`
	LogLevel       *string   `toml:"log_level"`
	LogJSON        *bool     `toml:"log_json"`
	fileFleet
}

type duration struct{ time.Duration }

func (d *duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%q is not a duration (like \"5s\" or \"2m\")", b)
	}
	if v <= 0 {
		return fmt.Errorf("%q: must be positive", b)
	}
	d.Duration = v
	return nil
}

// interval is a duration that may be zero (a setting that 0 turns off).
type interval struct{ time.Duration }

func (d *interval) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%q is not a duration (like \"1ms\" or \"0s\")", b)
	}
	if v < 0 {
		return fmt.Errorf("%q: must not be negative", b)
	}
	d.Duration = v
	return nil
}

// loadFile applies the configuration file at path to c, skipping keys whose flag was set on
// the command line (set[flagName]).
func loadFile(path string, c *Config, set map[string]bool) error {
	text, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	var f fileConfig
	md, err := toml.Decode(string(text), &f)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return fmt.Errorf("%w: %s:%d: %s", ErrConfig, path, pe.Position.Line, pe.Message)
		}
		var ppe *toml.ParseError
		if errors.As(err, &ppe) {
			return fmt.Errorf("%w: %s:%d: %s", ErrConfig, path, ppe.Position.Line, ppe.Message)
		}
		// Type errors are plain errors that carry the line in their text.
		if m := typeErrRe.FindStringSubmatch(err.Error()); m != nil {
			return fmt.Errorf("%w: %s:%s: %s: %s", ErrConfig, path, m[1], m[2], m[3])
		}
		return fmt.Errorf("%w: %s: %v", ErrConfig, path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		key := und[0].String()
		return fmt.Errorf("%w: %s:%d: unknown key %q", ErrConfig, path, lineOf(text, und[0][len(und[0])-1]), key)
	}
	apply := func(flagName string, ok bool, do func()) {
		if ok && !set[flagName] {
			do()
		}
	}
	apply("listen", len(f.Listen) > 0, func() { c.Listen = f.Listen })
	apply("workers", f.Workers != nil, func() { c.Workers = *f.Workers })
	apply("capacity", f.Capacity != nil, func() { c.Capacity = *f.Capacity })
	apply("socket", f.Socket != nil, func() { c.Socket = *f.Socket })
	apply("admin", f.Admin != nil, func() { c.Admin = *f.Admin })
	apply("state", f.State != nil, func() { c.StateDir = *f.State })
	apply("key", f.Key != nil, func() { c.KeyFile = *f.Key })
	apply("pidfile", f.PIDFile != nil, func() { c.PIDFile = *f.PIDFile })
	apply("handoff-timeout", f.HandoffTimeout != nil, func() { c.HandoffTimeout = f.HandoffTimeout.Duration })
	apply("accept-coalesce", f.AcceptCoalesce != nil, func() { c.AcceptCoalesce = f.AcceptCoalesce.Duration })
	apply("queue-timeout", f.QueueTimeout != nil, func() { c.QueueTimeout = f.QueueTimeout.Duration })
	apply("start-timeout", f.StartTimeout != nil, func() { c.StartTimeout = f.StartTimeout.Duration })
	apply("ready-timeout", f.ReadyTimeout != nil, func() { c.ReadyTimeout = f.ReadyTimeout.Duration })
	apply("drain-timeout", f.DrainTimeout != nil, func() { c.DrainTimeout = f.DrainTimeout.Duration })
	apply("migrate", f.Migrate != nil, func() { c.Migrate = *f.Migrate })
	apply("migrate-timeout", f.MigrateTimeout != nil, func() { c.MigrateTimeout = f.MigrateTimeout.Duration })
	apply("stop-timeout", f.StopTimeout != nil, func() { c.StopTimeout = f.StopTimeout.Duration })
	apply("adopt-window", f.AdoptWindow != nil, func() { c.AdoptWindow = f.AdoptWindow.Duration })
	apply("allow-uid", len(f.AllowUIDs) > 0, func() { c.AllowUIDs = f.AllowUIDs })
	apply("log-level", f.LogLevel != nil, func() { c.LogLevel = *f.LogLevel })
	apply("log-json", f.LogJSON != nil, func() { c.LogJSON = *f.LogJSON })
	if err := f.fileFleet.apply(&c.Fleet, set, path, text); err != nil {
		return err
	}
	if len(c.Command) == 0 && len(f.Command) > 0 {
		c.Command = f.Command
	}
	for _, k := range []struct {
		key string
		bad bool
		msg string
	}{
		{"workers", f.Workers != nil && *f.Workers < 1, "must be at least 1"},
		{"capacity", f.Capacity != nil && *f.Capacity < 1, "must be at least 1"},
		{"accept_coalesce", f.AcceptCoalesce != nil && f.AcceptCoalesce.Duration > maxAcceptCoalesce, "must be at most " + maxAcceptCoalesce.String()},
	} {
		if k.bad {
			return fmt.Errorf("%w: %s:%d: %s %s", ErrConfig, path, lineOf(text, k.key), k.key, k.msg)
		}
	}
	return nil
}

// typeErrRe matches BurntSushi/toml's decode errors: toml: line N (last key "K"): message.
var typeErrRe = regexp.MustCompile(`^toml: line (\d+) \(last key "([^"]*)"\): (.*)$`)

// lineOf finds the line on which key is assigned (1 if it cannot tell).
func lineOf(text []byte, key string) int {
	sc := bufio.NewScanner(strings.NewReader(string(text)))
	for n := 1; sc.Scan(); n++ {
		l := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(l, key) && strings.HasPrefix(strings.TrimSpace(l[len(key):]), "=") {
			return n
		}
	}
	return 1
}
