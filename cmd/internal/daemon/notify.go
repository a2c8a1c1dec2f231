package daemon

import (
	"fmt"

	sd "github.com/coreos/go-systemd/v22/daemon"
	"github.com/hashicorp/go-hclog"
)

// notifier speaks sd_notify when batond runs under systemd (NOTIFY_SOCKET set); otherwise it
// does nothing.
type notifier struct {
	log hclog.Logger
}

func (n notifier) send(state string) {
	if _, err := sd.SdNotify(false, state); err != nil {
		n.log.Warn("sd_notify failed", "state", state, "error", err)
	}
}

// ready says this process is the service's main process and serving: after an upgrade the new
// batond names itself (the unit uses NotifyAccess=all for this).
func (n notifier) ready(pid int, status string) {
	n.send(fmt.Sprintf("MAINPID=%d\nREADY=1\nSTATUS=%s", pid, status))
}

func (n notifier) reloading() { n.send("RELOADING=1\nSTATUS=reloading") }

func (n notifier) status(s string) { n.send("STATUS=" + s) }

// stopping only updates STATUS: systemd sent the SIGTERM and knows. (Sending STOPPING=1 as
// well was followed, in the systemd test, by systemd SIGKILLing a batond that was no longer
// its child 2 ms later, cutting the drain short.)
func (n notifier) stopping() { n.send("STATUS=stopping: draining workers") }
