package handoff

import (
	"fmt"
	"io"
	"os"
	"testing"
)

func TestRecvErrorCode(t *testing.T) {
	for _, c := range []struct {
		err  error
		want ErrorCode
	}{
		{nil, 0},
		{io.EOF, 0},
		{fmt.Errorf("read: %w", os.ErrDeadlineExceeded), CodeStalled},
		{fmt.Errorf("x: %w", ErrTruncated), CodeTooBig},
		{fmt.Errorf("x: %w", ErrFDs), CodeFDs},
		{fmt.Errorf("hello: %w", ErrMalformed), CodeMalformed},
	} {
		if got := RecvErrorCode(c.err); got != c.want {
			t.Errorf("RecvErrorCode(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

func TestFinalCodes(t *testing.T) {
	final := map[ErrorCode]bool{CodeVersion: true, CodeToken: true, CodePeer: true, CodeSlot: true}
	for c := ErrorCode(1); c <= CodeStalled; c++ {
		if c.Final() != final[c] {
			t.Errorf("%v.Final() = %v", c, c.Final())
		}
	}
}
