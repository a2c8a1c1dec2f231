package handoff

import (
	"errors"
	"os"
)

// RecvErrorCode maps an error from Recv, RecvFDs or a decoder to the ERROR code that tells the
// peer what it did wrong, or 0 when the error is not the peer's protocol fault (the channel
// closed, a deadline passed): then no ERROR is owed, only a close. It is the one place that
// decides this, for batond's admission, batond's reader of each worker and the worker library.
func RecvErrorCode(err error) ErrorCode {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, os.ErrDeadlineExceeded):
		return CodeStalled
	case errors.Is(err, ErrTruncated):
		return CodeTooBig
	case errors.Is(err, ErrFDs):
		return CodeFDs
	case errors.Is(err, ErrMalformed):
		return CodeMalformed
	}
	return 0
}

// Final says whether a rejection carrying code is final for a worker: re-sending the same HELLO
// cannot succeed (wrong protocol version, token, peer, or a slot that belongs to another
// process), so a worker that receives it must give up instead of retrying (PROTOCOL.md,
// "Errors"). Every other code ends only the current channel.
func (c ErrorCode) Final() bool {
	switch c {
	case CodeVersion, CodeToken, CodePeer, CodeSlot:
		return true
	}
	return false
}

// SendError tells the peer why its channel is about to end, best effort: it never blocks (a
// peer that does not read does not get the reason) and its failure is nobody's business, since
// the caller closes the channel next either way.
func (ch *Channel) SendError(code ErrorCode, reason string) {
	_ = ch.TrySend(AppendError(nil, &Error{Code: code, Reason: reason}), -1)
}
