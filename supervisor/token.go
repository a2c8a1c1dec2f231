package supervisor

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
)

// KeyLen is the size of the token key.
const KeyLen = 32

// Token is the BATON_TOKEN of a slot in a generation: HMAC-SHA256 of "baton/v1/<gen>/<slot>"
// under the host's key. Deriving it (instead of remembering random tokens) lets the next batond,
// after a reload or a crash, verify workers it did not start, as long as it has the same key.
func Token(key []byte, generation uint64, slot int) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("baton/v1/" + strconv.FormatUint(generation, 10) + "/" + strconv.Itoa(slot)))
	return hex.EncodeToString(m.Sum(nil))
}

// checkToken compares in constant time.
func checkToken(key []byte, generation uint64, slot int, token string) bool {
	return hmac.Equal([]byte(Token(key, generation, slot)), []byte(token))
}

// LoadOrCreateKey reads the key file, creating it (0600, random) if it does not exist. A key
// file readable by others is refused: whoever reads it can mint worker tokens.
func LoadOrCreateKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		key := make([]byte, KeyLen)
		if _, err := rand.Read(key); err != nil {
			return nil, err
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, fs.ErrExist) {
			return LoadOrCreateKey(path) // lost a race with another batond: use its key
		}
		if err != nil {
			return nil, fmt.Errorf("token key %s: %w", path, err)
		}
		if _, err := f.Write(key); err != nil {
			f.Close()
			os.Remove(path)
			return nil, fmt.Errorf("token key %s: %w", path, err)
		}
		if err := f.Close(); err != nil {
			os.Remove(path)
			return nil, fmt.Errorf("token key %s: %w", path, err)
		}
		return key, nil
	}
	if err != nil {
		return nil, fmt.Errorf("token key %s: %w", path, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("token key %s: mode %v lets others read it; chmod 600 it", path, st.Mode().Perm())
	}
	if len(b) != KeyLen {
		return nil, fmt.Errorf("token key %s: %d bytes, want %d", path, len(b), KeyLen)
	}
	return b, nil
}
