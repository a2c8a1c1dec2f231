// Package procstat owns what the benchmark reads about other processes from /proc: CPU time
// (utime+stime, with the children already reaped), resident memory, open file descriptors, and
// the descendants of a process. Nothing here writes or signals.
package procstat

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// ClockTick is USER_HZ, the unit of the times in /proc/<pid>/stat: 100 on every Linux
// architecture Go runs on.
const ClockTick = 10 * time.Millisecond

// Stat is the part of /proc/<pid>/stat the benchmark uses.
type Stat struct {
	PID, PPID int
	// CPU is utime+stime of every thread of the process, live or exited, plus cutime+cstime
	// (children it has waited for), in clock ticks.
	CPU int64
}

// ReadStat reads /proc/<pid>/stat.
func ReadStat(pid int) (Stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return Stat{}, err
	}
	return parseStat(pid, b)
}

func parseStat(pid int, b []byte) (Stat, error) {
	// The command name (field 2) is in parentheses and may hold spaces or parentheses: the
	// fields after it start after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return Stat{}, fmt.Errorf("procstat: /proc/%d/stat: no ')'", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): field n is f[n-3].
	if len(f) < 15 {
		return Stat{}, fmt.Errorf("procstat: /proc/%d/stat: %d fields", pid, len(f)+2)
	}
	num := func(n int) int64 {
		v, _ := strconv.ParseInt(f[n-3], 10, 64)
		return v
	}
	return Stat{PID: pid, PPID: int(num(4)), CPU: num(14) + num(15) + num(16) + num(17)}, nil
}

// Tree returns roots and all their live descendants (each pid once, roots first). Roots that no
// longer exist are left out.
func Tree(roots []int) []int {
	children := map[int][]int{}
	if ents, err := os.ReadDir("/proc"); err == nil {
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			if st, err := ReadStat(pid); err == nil {
				children[st.PPID] = append(children[st.PPID], pid)
			}
		}
	}
	seen := map[int]bool{}
	var out []int
	var walk func(pid int, depth int)
	walk = func(pid int, depth int) {
		if seen[pid] || depth > 64 {
			return
		}
		seen[pid] = true
		out = append(out, pid)
		for _, c := range children[pid] {
			walk(c, depth+1)
		}
	}
	for _, r := range roots {
		if _, err := os.Stat("/proc/" + strconv.Itoa(r)); err == nil {
			walk(r, 0)
		}
	}
	return out
}

// CPU returns the summed CPU time of pids (see Stat.CPU). Processes gone since the list was made
// count as zero.
func CPU(pids []int) time.Duration {
	var ticks int64
	for _, p := range pids {
		if st, err := ReadStat(p); err == nil {
			ticks += st.CPU
		}
	}
	return time.Duration(ticks) * ClockTick
}

// RSS returns the resident set size of pid in bytes (VmRSS of /proc/<pid>/status).
func RSS(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) == 0 {
				break
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("procstat: VmRSS of %d: %w", pid, err)
			}
			return kb * 1024, nil
		}
	}
	return 0, fmt.Errorf("procstat: no VmRSS for pid %d (a zombie?)", pid)
}

// FDs returns the number of open file descriptors of pid.
func FDs(pid int) (int, error) {
	ents, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "fd"))
	return len(ents), err
}

// Usage is the memory and descriptors of a set of processes at one moment.
type Usage struct {
	RSS int64 // bytes
	FDs int
	N   int // processes read
}

// Sum reads RSS and FDs of every pid; unreadable ones are skipped (N counts the others).
func Sum(pids []int) Usage {
	var u Usage
	for _, p := range pids {
		r, err1 := RSS(p)
		f, err2 := FDs(p)
		if err1 != nil || err2 != nil {
			continue
		}
		u.RSS += r
		u.FDs += f
		u.N++
	}
	return u
}

// Busy returns the busy time of all CPUs together since boot (/proc/stat: user, nice, system,
// irq, softirq and steal), or 0 if it cannot be read.
func Busy() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0
	}
	var ticks int64
	for _, i := range []int{1, 2, 3, 6, 7, 8} { // user nice system (idle iowait) irq softirq steal
		v, _ := strconv.ParseInt(f[i], 10, 64)
		ticks += v
	}
	return time.Duration(ticks) * ClockTick
}
