package load

import (
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-gw/baton/cmd/baton-bench/internal/procstat"
)

// cpuProbe reads the CPU time of the server side and of this process at the edges of a
// measurement window. The server side is the process trees under the given pids (read once,
// before the run, because scanning /proc takes milliseconds); its CPU is utime+stime summed
// over those processes and all their threads, plus the children they reaped.
type cpuProbe struct {
	pids []int
	srv  time.Duration
	self time.Duration
	all  time.Duration // busy time of every CPU (/proc/stat)
	wall time.Time
}

// newCPUProbe resolves the server-side trees under roots. With no roots, it measures only the
// client.
func newCPUProbe(roots []int) *cpuProbe {
	p := &cpuProbe{}
	if len(roots) > 0 {
		p.pids = procstat.Tree(roots)
	}
	return p
}

type cpuDelta struct {
	Server     time.Duration // server-side CPU in the window
	Client     time.Duration
	Others     time.Duration // every CPU's busy time minus Server and Client: other processes, interrupts
	Wall       time.Duration
	ServerPIDs int
}

func (p *cpuProbe) mark() {
	p.srv = procstat.CPU(p.pids)
	p.self = selfCPU()
	p.all = procstat.Busy()
	p.wall = time.Now()
}

func (p *cpuProbe) delta() cpuDelta {
	d := cpuDelta{
		Server:     procstat.CPU(p.pids) - p.srv,
		Client:     selfCPU() - p.self,
		Wall:       time.Since(p.wall),
		ServerPIDs: len(p.pids),
	}
	d.Others = max(procstat.Busy()-p.all-d.Server-d.Client, 0)
	return d
}

func selfCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
