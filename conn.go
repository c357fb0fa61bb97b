package clusterclient

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// keepBuffer is the largest write buffer a sender keeps between writes; a
// larger one, left by a large packet, goes back to the garbage collector.
const keepBuffer = 64 << 10

// errQueueFull: a peer is not reading fast enough to keep its queue under
// Config.MaxQueuedBytes.
var errQueueFull = errors.New("clusterclient: peer is not reading: write queue over Config.MaxQueuedBytes")

// lastID hands out request ids for the whole process, as the reference
// does.
var lastID atomic.Uint64

func nextID() uint64 { return lastID.Add(1) }

// sender writes packets to one connection. Packets are encoded into buf
// under mu; the goroutine that finds no write under way becomes the
// writer and writes everything queued, releasing mu around each write, so
// the packets that others queue meanwhile go out together in the next
// write.
type sender struct {
	nc       net.Conn
	maxQueue int           // bound on len(buf), Config.MaxQueuedBytes
	timeout  time.Duration // a write that takes longer fails
	onFail   func(error)   // called once, outside mu, when a write fails or the queue overflows

	mu      sync.Mutex
	buf     []byte // guarded by mu: encoded packets not yet written
	spare   []byte // guarded by mu: the other buffer, empty
	writing bool   // guarded by mu: a goroutine is writing
	err     error  // guarded by mu: why the connection takes no more packets
}

func newSender(nc net.Conn, maxQueue int, timeout time.Duration, onFail func(error)) *sender {
	return &sender{nc: nc, maxQueue: maxQueue, timeout: timeout, onFail: onFail}
}

// send encodes a packet with encode and queues it. If no write is under
// way, the caller writes the queue itself (inline), or a new goroutine
// does, so that the caller never waits on the socket.
func (s *sender) send(inline bool, encode func(b []byte) ([]byte, error)) error {
	s.mu.Lock()
	if s.err != nil {
		defer s.mu.Unlock()
		return s.err
	}
	n := len(s.buf)
	b, err := encode(s.buf)
	if err == nil && len(b) > s.maxQueue && n > 0 {
		s.err, err = errQueueFull, errQueueFull
		defer s.onFail(err) // runs after the unlock below
	}
	if err != nil {
		s.buf = b[:n]
		s.mu.Unlock()
		return err
	}
	s.buf = b
	start := !s.writing
	s.writing = true
	s.mu.Unlock()
	switch {
	case !start:
		return nil
	case !inline:
		go s.write()
		return nil
	}
	return s.write()
}

// write writes until the queue is empty; called by the one goroutine that
// set writing.
func (s *sender) write() error {
	s.mu.Lock()
	for len(s.buf) > 0 && s.err == nil {
		b := s.buf
		s.buf = s.spare[:0]
		s.mu.Unlock()
		s.nc.SetWriteDeadline(time.Now().Add(s.timeout))
		_, err := s.nc.Write(b)
		s.mu.Lock()
		s.spare = b[:0]
		if cap(b) > keepBuffer {
			s.spare = nil
		}
		if err != nil && s.err == nil {
			if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
				err = fmt.Errorf("peer is not reading: a write made no progress within %v: %w", s.timeout, err)
			}
			s.err = fmt.Errorf("clusterclient: write to %s: %w", s.nc.RemoteAddr(), err)
			s.writing, s.buf = false, nil
			err = s.err
			s.mu.Unlock()
			s.onFail(err)
			return err
		}
	}
	s.writing = false
	if cap(s.buf) > keepBuffer {
		s.buf = nil
	}
	s.mu.Unlock()
	return nil
}

// fail stops the sender: later sends return err.
func (s *sender) fail(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
}
