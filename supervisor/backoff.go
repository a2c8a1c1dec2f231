package supervisor

import "time"

// Backoff is the restart delay policy: Base × Factor^n, capped at Max, where n counts the
// failures since the worker last ran for at least Healthy.
type Backoff struct {
	Base    time.Duration
	Factor  float64
	Max     time.Duration
	Healthy time.Duration
	// CrashLoop is the number of consecutive quick failures after which the slot reports the
	// crash-loop state (it keeps retrying at the capped delay).
	CrashLoop int
}

// DefaultBackoff is 100 ms × 1.5^n, capped at 30 s, reset after 10 s of healthy running.
func DefaultBackoff() Backoff {
	return Backoff{Base: 100 * time.Millisecond, Factor: 1.5, Max: 30 * time.Second, Healthy: 10 * time.Second, CrashLoop: 5}
}

// Delay returns the wait before restart number n (0-based count of consecutive failures).
func (b Backoff) Delay(n int) time.Duration {
	d := float64(b.Base)
	for i := 0; i < n; i++ {
		d *= b.Factor
		if d >= float64(b.Max) {
			return b.Max
		}
	}
	return time.Duration(d)
}
