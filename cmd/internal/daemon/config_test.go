package daemon

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/baton-gw/baton/proxy"
)

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "baton.toml")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigFile(t *testing.T) {
	p := writeConfig(t, `
# a comment
listen = ["127.0.0.1:7100", "127.0.0.1:7101"]
workers = 6
command = ["python3", "game.py"]
drain_timeout = "90s"
accept_coalesce = "0s"
migrate = true
migrate_timeout = "3s"
`)
	c, err := ParseFlags([]string{"-config", p, "-workers", "3"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.Workers != 3 {
		t.Errorf("workers %d: the flag must win over the file", c.Workers)
	}
	if !c.Migrate || c.MigrateTimeout != 3*time.Second {
		t.Errorf("migrate keys not applied: %v %v", c.Migrate, c.MigrateTimeout)
	}
	if len(c.Listen) != 2 || c.DrainTimeout != 90*time.Second || strings.Join(c.Command, " ") != "python3 game.py" || c.AcceptCoalesce != 0 {
		t.Errorf("config not applied: %+v", c)
	}
	c, err = ParseFlags([]string{"-config", p, "--", "./other"}, io.Discard)
	if err != nil || strings.Join(c.Command, " ") != "./other" {
		t.Errorf("a command line command must win: %v %v", c.Command, err)
	}
}

func TestConfigErrorsNameFileAndLine(t *testing.T) {
	for name, c := range map[string]struct{ text, want string }{
		"syntax":       {"workers = 2\nlisten = [\"a\"\nbad", ":3:"},
		"unknown key":  {"workers = 2\n\nworkerz = 3\n", ":3: unknown key \"workerz\""},
		"bad duration": {"workers = 2\ndrain_timeout = \"soon\"\n", ":2"},
		"bad workers":  {"\n\nworkers = 0\n", ":3: workers must be at least 1"},
		"wrong type":   {"workers = \"two\"\n", ":1"},
		"coalesce":     {"workers = 2\naccept_coalesce = \"1s\"\n", ":2: accept_coalesce must be at most 100ms"},
		"negative":     {"accept_coalesce = \"-1ms\"\n", ":1"},
		"migrate type": {"workers = 2\nmigrate = \"yes\"\n", ":2"},
	} {
		t.Run(name, func(t *testing.T) {
			p := writeConfig(t, c.text)
			_, err := ParseFlags([]string{"-config", p}, io.Discard)
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), p+c.want) {
				t.Errorf("got %v, want %s%s", err, p, c.want)
			}
		})
	}
	_, err := ParseFlags([]string{"-config", "/no/such/file.toml"}, io.Discard)
	if !errors.Is(err, ErrConfig) {
		t.Errorf("missing file: %v", err)
	}
}

func TestFleetConfig(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.toml")
	os.WriteFile(good, []byte("proxy_listen = [\"127.0.0.1:7000\"]\nproxy_from = [\"10.0.0.1\", \"192.0.2.0/24\"]\nagent = \"127.0.0.1:7001\"\nmetrics = \"127.0.0.1:7002\"\n"), 0o600)
	c, err := ParseFlags([]string{"-config", good}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	f := c.Fleet
	if f.ProxyProtocol || len(f.ProxyListen) != 1 || len(f.ProxyFrom) != 2 || f.ProxyFrom[0].String() != "10.0.0.1/32" || f.Agent != "127.0.0.1:7001" || f.Metrics != "127.0.0.1:7002" || f.ProxyTimeout != 3*time.Second {
		t.Fatalf("fleet config %+v", f)
	}
	bad := filepath.Join(dir, "bad.toml")
	os.WriteFile(bad, []byte("workers = 2\nproxy_from = [\"nonsense\"]\n"), 0o600)
	if _, err := ParseFlags([]string{"-config", bad}, io.Discard); err == nil || !strings.Contains(err.Error(), bad+":2:") {
		t.Fatalf("bad proxy_from: %v, want the file and line 2", err)
	}
	if _, err := ParseFlags([]string{"-proxy-from", "10.0.0.300"}, io.Discard); err == nil {
		t.Fatal("a bad -proxy-from must be refused")
	}
}

// proxy_listen names listeners by address, however written; an entry that names none is an
// error with the file and line, not silently ignored.
func TestProxyListenMatching(t *testing.T) {
	tl, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	port := tl.Addr().(*net.TCPAddr).Port
	l1, err := proxy.NewListener(fmt.Sprintf("127.0.0.1:%d", port), tl)
	if err != nil {
		t.Fatal(err)
	}
	defer l1.Close()
	tl2, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	l2, err := proxy.NewListener("127.0.0.1:0", tl2) // as -listen 127.0.0.1:0 names it
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	lns := []*proxy.Listener{l1, l2}
	dir := t.TempDir()
	load := func(entries string) (FleetConfig, string) {
		p := filepath.Join(dir, "baton.toml")
		os.WriteFile(p, []byte("workers = 2\n\nproxy_listen = "+entries+"\n"), 0o600)
		c, err := ParseFlags([]string{"-config", p}, io.Discard)
		if err != nil {
			t.Fatalf("%s: %v", entries, err)
		}
		return c.Fleet, p
	}
	for _, e := range []string{
		fmt.Sprintf(`["localhost:%d"]`, port),
		fmt.Sprintf(`["[::ffff:127.0.0.1]:%d"]`, port),
		fmt.Sprintf(`["127.0.0.1:%d"]`, port),
	} {
		c, _ := load(e)
		got, err := proxyListeners(c, lns)
		if err != nil || !got[0] || got[1] {
			t.Errorf("proxy_listen = %s: %v, %v; want only the first listener", e, got, err)
		}
	}
	c, _ := load(fmt.Sprintf(`["%s"]`, l2.Addr()))
	if got, err := proxyListeners(c, lns); err != nil || got[0] || !got[1] {
		t.Errorf("by its bound address: %v, %v; want only the second listener", got, err)
	}
	c, p := load(`["127.0.0.1:1"]`)
	_, err = proxyListeners(c, lns)
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), p+":3:") || !strings.Contains(err.Error(), "127.0.0.1:1") {
		t.Errorf("an entry that matches no listener: %v, want a config error at %s:3", err, p)
	}
	os.WriteFile(p, []byte("proxy_listen = [\"nonsense\"]\n"), 0o600)
	if _, err := ParseFlags([]string{"-config", p}, io.Discard); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), p+":1:") {
		t.Errorf("a malformed entry: %v, want a config error at %s:1", err, p)
	}
}
