package clusterclient

import (
	"cmp"
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
// write. Two buffers take turns: one is written while the other takes
// new packets.
type sender struct {
	nc       net.Conn
	maxQueue int           // bound on len(buf), Config.MaxQueuedBytes
	timeout  time.Duration // a write that takes longer fails
	onFail   func(error)   // run once, on its own goroutine, when a write fails or the queue overflows

	mu         sync.Mutex
	buf, spare []byte // guarded by mu: encoded packets not yet written; the other buffer, empty
	writing    bool   // guarded by mu: a goroutine is writing
	err        error  // guarded by mu: why the connection takes no more packets
}

func newSender(nc net.Conn, maxQueue int, timeout time.Duration, onFail func(error)) *sender {
	return &sender{nc: nc, maxQueue: maxQueue, timeout: timeout, onFail: onFail}
}

// send encodes a packet with encode and queues it. If no write is under
// way, the caller writes the queue itself (inline), or a new goroutine
// does, so that the caller never waits on the socket.
func (s *sender) send(inline bool, encode func(b []byte) ([]byte, error)) error {
	s.mu.Lock()
	b, err := encode(s.buf)
	err = cmp.Or(s.err, err) // a stopped sender drops the packet
	if err == nil && len(b) > s.maxQueue && len(s.buf) > 0 {
		s.err, err = errQueueFull, errQueueFull
		go s.onFail(err)
	}
	start := err == nil && !s.writing
	if err == nil {
		s.buf, s.writing = b, true
	}
	s.mu.Unlock()
	if start && !inline {
		go s.write()
	} else if start {
		return s.write()
	}
	return err
}

// write writes until the queue is empty; run by the one goroutine that
// set writing. It returns the error of a write that failed here.
func (s *sender) write() (failed error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.buf) > 0 && s.err == nil {
		b := s.buf
		s.buf, s.spare = s.spare[:0], nil
		s.mu.Unlock()
		s.nc.SetWriteDeadline(time.Now().Add(s.timeout))
		_, err := s.nc.Write(b)
		s.mu.Lock()
		if cap(b) <= keepBuffer {
			s.spare = b[:0]
		}
		if err != nil && s.err == nil {
			s.err = fmt.Errorf("clusterclient: write to %s failed or made no progress within %v: %w", s.nc.RemoteAddr(), s.timeout, err)
			failed = s.err
			go s.onFail(failed)
		}
	}
	s.writing = false
	return failed
}

// fail stops the sender: later sends return err, or the error that
// stopped it first.
func (s *sender) fail(err error) {
	s.mu.Lock()
	s.err = cmp.Or(s.err, err)
	s.mu.Unlock()
}
