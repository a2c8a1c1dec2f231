package procstat

import (
	"os"
	"os/exec"
	"slices"
	"testing"
)

func TestParseStat(t *testing.T) {
	line := "4242 (we(ird) name) S 17 4242 4242 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 100 1000 10\n"
	st, err := parseStat(4242, []byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if st.PPID != 17 || st.CPU != 13 {
		t.Fatalf("got %+v, want ppid 17, cpu 7+3+2+1", st)
	}
	if _, err := parseStat(1, []byte("1 (x) S 0")); err == nil {
		t.Fatal("short line accepted")
	}
}

func TestSelf(t *testing.T) {
	me := os.Getpid()
	cmd := exec.Command("sleep", "5")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	tree := Tree([]int{me})
	if len(tree) < 2 || tree[0] != me || !slices.Contains(tree, cmd.Process.Pid) {
		t.Fatalf("Tree(self) = %v, want self then the child %d", tree, cmd.Process.Pid)
	}
	if r, err := RSS(me); err != nil || r <= 0 {
		t.Fatalf("RSS = %d, %v", r, err)
	}
	if n, err := FDs(me); err != nil || n < 3 {
		t.Fatalf("FDs = %d, %v", n, err)
	}
	if u := Sum([]int{me, 1 << 30}); u.N != 1 {
		t.Fatalf("Sum counted %d processes", u.N)
	}
	_ = CPU(tree)
}
