package supervisor

import (
	"context"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	for _, c := range []struct {
		stat string
		pg   int
		live bool
	}{
		{"42 (sleep) S 1 42 42 0 -1", 42, true},
		{"43 (a (weird) name) R 1 77 77 0", 77, true},
		{"44 (zombie) Z 1 42 42 0", 42, false},
		{"45 (dead) X 1 42 42", 42, false},
		{"46 (short) S", 0, false},
		{"garbage", 0, false},
	} {
		pg, live := parseStat([]byte(c.stat))
		if pg != c.pg && c.live || live != c.live {
			t.Errorf("parseStat(%q) = %d, %v; want %d, %v", c.stat, pg, live, c.pg, c.live)
		}
	}
}

func TestFdinfoReadOnly(t *testing.T) {
	if !fdinfoReadOnly([]byte("pos:\t0\nflags:\t02000000\nmnt_id:\t15\n")) {
		t.Error("O_RDONLY|O_CLOEXEC is read-only")
	}
	if fdinfoReadOnly([]byte("pos:\t0\nflags:\t02000001\n")) {
		t.Error("O_WRONLY is not read-only")
	}
	if fdinfoReadOnly([]byte("pos:\t0\n")) {
		t.Error("no flags line")
	}
}

func TestKillableGroup(t *testing.T) {
	if killableGroup(syscall.Getpgrp()) {
		t.Error("batond's own group must never be killed")
	}
	if killableGroup(1) || killableGroup(0) {
		t.Error("init's group, or none")
	}
}

// A group leader and a child it forked are both killed and waited for; a zombie left for a
// parent that does not reap does not hold killGroup up.
func TestKillGroupWaitsForEveryMember(t *testing.T) {
	cmd := exec.Command("sh", "-c", "sleep 600 & echo $!; wait")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	reaped := make(chan struct{})
	buf := make([]byte, 32)
	n, _ := out.Read(buf)
	child, _ := strconv.Atoi(strings.TrimSpace(string(buf[:n])))
	go func() { cmd.Wait(); close(reaped) }()
	if pg, live := statPgrp(child); !live || pg != cmd.Process.Pid {
		t.Fatalf("child %d: group %d live %v, want group %d", child, pg, live, cmd.Process.Pid)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	if err := killGroup(ctx, cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if _, live := statPgrp(child); live {
		t.Errorf("child %d still running", child)
	}
	<-reaped
	t.Logf("group killed in %v", time.Since(start))
}
