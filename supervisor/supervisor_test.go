package supervisor

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	b := DefaultBackoff()
	want := []time.Duration{100 * time.Millisecond, 150 * time.Millisecond, 225 * time.Millisecond, 337500 * time.Microsecond}
	for n, w := range want {
		if got := b.Delay(n); got != w {
			t.Errorf("Delay(%d) = %v, want %v", n, got, w)
		}
	}
	if got := b.Delay(100); got != 30*time.Second {
		t.Errorf("Delay(100) = %v, want the 30s cap", got)
	}
	if b.Delay(12) >= b.Delay(13) && b.Delay(12) != 30*time.Second {
		t.Error("delay must grow until the cap")
	}
}

func TestToken(t *testing.T) {
	key := make([]byte, KeyLen)
	tok := Token(key, 3, 1)
	if len(tok) != 64 || strings.ToLower(tok) != tok {
		t.Fatalf("token %q is not 64 lowercase hex", tok)
	}
	if !checkToken(key, 3, 1, tok) || checkToken(key, 3, 2, tok) || checkToken(key, 4, 1, tok) {
		t.Fatal("token must bind generation and slot")
	}
	other := append([]byte(nil), key...)
	other[0] = 1
	if checkToken(other, 3, 1, tok) {
		t.Fatal("token must depend on the key")
	}
}

func TestKeyFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "k")
	k1, err := LoadOrCreateKey(p)
	if err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(p)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("key mode %v", st.Mode().Perm())
	}
	k2, err := LoadOrCreateKey(p)
	if err != nil || string(k1) != string(k2) {
		t.Fatal("key not stable across loads")
	}
	os.Chmod(p, 0o644)
	if _, err := LoadOrCreateKey(p); err == nil {
		t.Fatal("a world-readable key must be refused")
	}
}

func TestResolveCommandFollowsSymlinks(t *testing.T) {
	dir := t.TempDir()
	v1 := filepath.Join(dir, "v1")
	os.MkdirAll(v1, 0o755)
	os.WriteFile(filepath.Join(v1, "game.py"), nil, 0o644)
	cur := filepath.Join(dir, "current")
	os.Symlink(v1, cur)
	got, err := ResolveCommand([]string{"sh", filepath.Join(cur, "game.py"), "-x", "word"})
	if err != nil {
		t.Fatal(err)
	}
	if got[1] != filepath.Join(v1, "game.py") || got[2] != "-x" || got[3] != "word" || !filepath.IsAbs(got[0]) {
		t.Fatalf("resolved %q", got)
	}
	if _, err := ResolveCommand([]string{"/no/such/program"}); err == nil {
		t.Fatal("missing program must fail")
	}
}

func TestProcessKillAndExit(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	reaped := make(chan struct{})
	go func() { cmd.Wait(); close(reaped) }()
	p, err := OpenProcess(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	select {
	case <-p.Exited():
		t.Fatal("exited before it was killed")
	case <-time.After(50 * time.Millisecond):
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.KillAndWait(ctx); err != nil {
		t.Fatal(err)
	}
	<-reaped // until reaped, a zombie still accepts signals
	if err := p.Signal(syscall.SIGTERM); !errors.Is(err, ErrGone) {
		t.Fatalf("signal after exit: %v, want ErrGone", err)
	}
}

func TestOpenProcessNonChild(t *testing.T) {
	// A process that is not our child: sh starts sleep in the background and exits.
	out, err := exec.Command("sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!").Output()
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	for _, c := range strings.TrimSpace(string(out)) {
		pid = pid*10 + int(c-'0')
	}
	p, err := OpenProcess(pid)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.KillAndWait(ctx); err != nil {
		t.Fatal(err)
	}
}
