package clusterclient

import (
	"bufio"
	"encoding/binary"
)

// The leader's reader still answers with sendLazy and flush; they go with
// the leader's own rewrite, and this file with them.

// packetBuffered reports whether br holds a whole packet, so that
// reading it will not wait on the socket.
func packetBuffered(br *bufio.Reader) bool {
	if br.Buffered() < HeaderSize {
		return false
	}
	h, _ := br.Peek(HeaderSize)
	n := int64(int32(binary.BigEndian.Uint32(h[16:]))) + int64(int32(binary.BigEndian.Uint32(h[20:])))
	return int64(br.Buffered())-HeaderSize >= n
}

// lazyFlush is the most that sendLazy leaves queued without a write.
const lazyFlush = 64 << 10

// sendLazy queues a packet and leaves the write to a later flush, unless
// lazyFlush bytes or more are queued.
func (s *sender) sendLazy(encode func(b []byte) ([]byte, error)) error {
	s.mu.Lock()
	if s.err != nil || s.writing || len(s.buf) >= lazyFlush {
		s.mu.Unlock()
		return s.send(true, encode)
	}
	n := len(s.buf)
	b, err := encode(s.buf)
	if err != nil {
		b = b[:n]
	}
	s.buf = b
	s.mu.Unlock()
	return err
}

// flush writes what is queued, unless another goroutine is writing it.
func (s *sender) flush() error {
	s.mu.Lock()
	start := !s.writing && s.err == nil && len(s.buf) > 0
	s.writing = s.writing || start
	s.mu.Unlock()
	if !start {
		return nil
	}
	return s.write()
}
