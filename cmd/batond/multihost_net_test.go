package main

import (
	"crypto/rand"
	"encoding/csv"
	"encoding/hex"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The multi-host test's network (a bridge and a network namespace per host) and its HAProxy.

// The network: a bridge in the root namespace and one namespace per host on a veth pair.

type testNet struct {
	id       string // random suffix of every name, so that concurrent runs cannot collide
	bridge   string
	bridgeIP string
	hosts    []*nsHost
	inodes   map[uint64]string // network namespace inode -> host name (see hostOf)
	pidHost  sync.Map          // pid -> host name, cached
}

type nsHost struct {
	netns string // ip netns name
	veth  string // root end, on the bridge
	peer  string // namespace end
	ip    string
}

// ipCmd runs ip(8) and fails the test with its output.
func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// newTestNet makes the bridge 10.77.N.1/24 and n namespaces at 10.77.N.11, .12, ... on it,
// with N a /24 no route of this machine uses yet. Everything is deleted at cleanup.
func newTestNet(t *testing.T, n int) *testNet {
	t.Helper()
	b := make([]byte, 3)
	rand.Read(b)
	id := hex.EncodeToString(b)
	subnet := freeSubnet(t)
	tn := &testNet{id: id, bridge: "btb" + id, bridgeIP: fmt.Sprintf("10.77.%d.1", subnet), inodes: map[uint64]string{}}
	t.Cleanup(tn.remove)
	ipCmd(t, "link", "add", tn.bridge, "type", "bridge")
	ipCmd(t, "addr", "add", tn.bridgeIP+"/24", "dev", tn.bridge)
	ipCmd(t, "link", "set", tn.bridge, "up")
	for i := 1; i <= n; i++ {
		h := &nsHost{
			netns: fmt.Sprintf("baton-%s-h%d", id, i),
			veth:  fmt.Sprintf("btv%sh%d", id, i),
			peer:  fmt.Sprintf("btp%sh%d", id, i),
			ip:    fmt.Sprintf("10.77.%d.%d", subnet, 10+i),
		}
		tn.hosts = append(tn.hosts, h)
		ipCmd(t, "netns", "add", h.netns)
		ipCmd(t, "link", "add", h.veth, "type", "veth", "peer", "name", h.peer, "netns", h.netns)
		ipCmd(t, "link", "set", h.veth, "master", tn.bridge, "up")
		ipCmd(t, "-n", h.netns, "addr", "add", h.ip+"/24", "dev", h.peer)
		ipCmd(t, "-n", h.netns, "link", "set", h.peer, "up")
		ipCmd(t, "-n", h.netns, "link", "set", "lo", "up")
		var st syscall.Stat_t
		if err := syscall.Stat("/run/netns/"+h.netns, &st); err != nil {
			t.Fatal(err)
		}
		tn.inodes[st.Ino] = fmt.Sprintf("h%d", i)
	}
	return tn
}

// freeSubnet picks N for 10.77.N.0/24 that no address or route of this machine uses.
func freeSubnet(t *testing.T) int {
	t.Helper()
	out, err := exec.Command("ip", "-4", "route", "show", "table", "all").CombinedOutput()
	if err != nil {
		t.Fatalf("ip route: %v\n%s", err, out)
	}
	for i := 0; i < 50; i++ {
		r, _ := rand.Int(rand.Reader, big.NewInt(250))
		n := int(r.Int64()) + 2
		if !strings.Contains(string(out), fmt.Sprintf("10.77.%d.", n)) {
			return n
		}
	}
	t.Fatal("no free 10.77.N.0/24 after 50 tries")
	return 0
}

// remove deletes what newTestNet made (deleting a namespace deletes the veth pair in it).
func (tn *testNet) remove() {
	for _, h := range tn.hosts {
		exec.Command("ip", "netns", "delete", h.netns).Run()
		exec.Command("ip", "link", "delete", h.veth).Run() // gone already, unless the move failed
	}
	exec.Command("ip", "link", "delete", tn.bridge).Run()
}

// hostOf names the host whose namespace pid runs in ("?" if it is gone or none of ours).
func (tn *testNet) hostOf(pid int) string {
	if v, ok := tn.pidHost.Load(pid); ok {
		return v.(string)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err != nil {
		return "?"
	}
	name, ok := tn.inodes[st.Ino]
	if !ok {
		return "?"
	}
	tn.pidHost.Store(pid, name)
	return name
}

// HAProxy, in the root namespace.

type haproxy struct {
	addr   string // where clients connect (127.0.0.1)
	sock   string // stats socket
	cmd    *exec.Cmd
	log    logFile
	exited chan struct{}
}

// haproxyConfig is the configuration the README shows. Weights are relative: an agent reply
// "N%" scales the server's configured weight, so each host's weight is its total capacity
// (workers x capacity / 8) and the agent's percentage of free capacity steers from there.
// option redispatch with retries sends a client whose connect to a dead host fails to
// another host at once, instead of failing it, during the check interval in which HAProxy
// does not know yet.
func haproxyConfig(listen, sock string, hosts []*host) string {
	var b strings.Builder
	fmt.Fprintf(&b, `global
    maxconn 4000
    stats socket %s mode 600 level admin

defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    retries 3
    option redispatch 1

listen baton
    bind %s
    balance leastconn
    default-server send-proxy-v2 check inter %dms fall 2 rise 2 agent-check agent-port %d agent-inter %dms
`, sock, listen, checkEvery.Milliseconds(), agentPort, checkEvery.Milliseconds())
	for _, h := range hosts {
		fmt.Fprintf(&b, "    server %s %s weight %d\n", h.name, h.addr(gamePort), h.workers*200/8)
	}
	return b.String()
}

func startHAProxy(t *testing.T, bridgeIP string, hosts []*host) *haproxy {
	t.Helper()
	dir := t.TempDir()
	hp := &haproxy{addr: freeLoopbackAddr(t), sock: filepath.Join(dir, "haproxy.sock"), log: logFile{filepath.Join(dir, "haproxy.log")}}
	cfg := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(haproxyConfig(hp.addr, hp.sock, hosts)), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(hp.log.path)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	hp.cmd = exec.Command("haproxy", "-db", "-f", cfg)
	hp.cmd.Stdout, hp.cmd.Stderr = logf, logf
	if err := hp.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	hp.exited = make(chan struct{})
	go func() { hp.cmd.Wait(); close(hp.exited) }()
	t.Cleanup(func() {
		hp.cmd.Process.Kill()
		<-hp.exited
		if t.Failed() {
			t.Logf("haproxy config:\n%s\nhaproxy log:\n%s", haproxyConfig(hp.addr, hp.sock, hosts), hp.log)
		}
	})
	waitFor(t, "HAProxy's stats socket", 10*time.Second, func() (bool, string) {
		select {
		case <-hp.exited:
			t.Fatalf("haproxy exited:\n%s", hp.log)
		default:
		}
		_, err := hp.stats()
		return err == nil, fmt.Sprint(err)
	})
	return hp
}

// freeLoopbackAddr returns 127.0.0.1:PORT with a port free a moment ago.
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// serverStat is one server's row of HAProxy's "show stat".
type serverStat struct {
	status string // UP, DOWN, DRAIN, MAINT, "UP 1/2", ...
	weight int
	total  int // sessions HAProxy sent it (stot)
}

// stats asks HAProxy's stats socket for its servers.
func (hp *haproxy) stats() (map[string]serverStat, error) {
	c, err := net.DialTimeout("unix", hp.sock, 2*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "show stat\n"); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return nil, err
	}
	rows, err := csv.NewReader(strings.NewReader(strings.TrimPrefix(string(b), "# "))).ReadAll()
	if err != nil || len(rows) == 0 {
		return nil, fmt.Errorf("show stat: %v: %q", err, b)
	}
	col := map[string]int{}
	for i, name := range rows[0] {
		col[name] = i
	}
	out := map[string]serverStat{}
	for _, r := range rows[1:] {
		if len(r) < len(rows[0]) || r[col["svname"]] == "FRONTEND" || r[col["svname"]] == "BACKEND" {
			continue
		}
		w, _ := strconv.Atoi(r[col["weight"]])
		n, _ := strconv.Atoi(r[col["stot"]])
		out[r[col["svname"]]] = serverStat{status: r[col["status"]], weight: w, total: n}
	}
	return out, nil
}

// waitStatus waits until HAProxy shows server name with a status that starts with want.
func (hp *haproxy) waitStatus(t *testing.T, name, want string, d time.Duration) {
	t.Helper()
	waitFor(t, fmt.Sprintf("HAProxy to see %s %s", name, want), d, func() (bool, string) {
		st, err := hp.stats()
		if err != nil {
			return false, err.Error()
		}
		return strings.HasPrefix(st[name].status, want), fmt.Sprintf("%+v", st)
	})
}
