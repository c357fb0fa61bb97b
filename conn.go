package clusterclient

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// keepBuffer is the largest write buffer a sender keeps between flushes;
// a larger one, left by a large packet, goes back to the garbage
// collector.
const keepBuffer = 64 << 10

// errQueueFull: a peer is not reading fast enough to keep its queue under
// Config.MaxQueuedBytes.
var errQueueFull = errors.New("clusterclient: peer is not reading: write queue over Config.MaxQueuedBytes")

// lastID hands out request ids for the whole process, as the reference
// does.
var lastID atomic.Uint64

func nextID() uint64 { return lastID.Add(1) }

// sender writes packets to one connection. Packets are encoded into buf
// under mu; the goroutine that finds no flush under way becomes the
// flusher and writes everything queued, so concurrent senders are batched
// into one write and no lock is held while the socket is written. A
// sequential caller writes in its own goroutine, with no hand-off.
type sender struct {
	nc       net.Conn
	maxQueue int           // bound on len(buf), Config.MaxQueuedBytes
	timeout  time.Duration // a write that makes no progress for between timeout/2 and timeout fails
	onFail   func(error)   // called once, outside mu, when a write fails

	mu       sync.Mutex
	buf      []byte // guarded by mu: encoded packets not yet written
	spare    []byte // guarded by mu: the other buffer, empty
	flushing bool   // guarded by mu: a goroutine is writing
	err      error  // guarded by mu: why the connection can take no more
	deadline int64  // touched only by the flusher: unix nanoseconds of the write deadline set, 0 if none
}

func newSender(nc net.Conn, maxQueue int, timeout time.Duration, onFail func(error)) *sender {
	return &sender{nc: nc, maxQueue: maxQueue, timeout: timeout, onFail: onFail}
}

// send encodes a packet with encode and queues it. With inline set the
// caller may do the write itself; otherwise a flush that is needed runs
// in a new goroutine, so the caller never waits on the socket.
func (s *sender) send(inline bool, encode func(b []byte) ([]byte, error)) error {
	if inline {
		return s.queue(sendNow, encode)
	}
	return s.queue(sendAsync, encode)
}

// sendMode says who writes a queued packet, and when.
type sendMode int

const (
	// sendNow: the caller writes, unless another goroutine is writing.
	sendNow sendMode = iota
	// sendAsync: a new goroutine writes, unless another one is writing.
	sendAsync
	// sendLazy: a later flush writes, unless lazyFlush bytes are queued.
	sendLazy
	// sendBatch: like sendNow, but the caller first yields the
	// processor once, so that goroutines ready to send now queue their
	// packets for the same write. For callers that have company.
	sendBatch
)

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
// the queue holds lazyFlush bytes or more. The caller must call flush
// before it waits for anything.
func (s *sender) sendLazy(encode func(b []byte) ([]byte, error)) error {
	return s.queue(sendLazy, encode)
}

// flush writes what is queued, unless another goroutine is writing
// already: that one writes it.
func (s *sender) flush() error {
	s.mu.Lock()
	if s.flushing || s.err != nil || len(s.buf) == 0 {
		s.mu.Unlock()
		return nil
	}
	s.flushing = true
	err := s.flushLocked()
	s.mu.Unlock()
	if err != nil {
		s.onFail(err)
	}
	return err
}

// queue encodes a packet with encode into the queue; mode says who
// writes it.
func (s *sender) queue(mode sendMode, encode func(b []byte) ([]byte, error)) error {
	s.mu.Lock()
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return err
	}
	n := len(s.buf)
	b, err := encode(s.buf)
	if err != nil {
		s.buf = b[:n]
		s.mu.Unlock()
		return err
	}
	s.buf = b
	if len(s.buf) > s.maxQueue && n > 0 {
		s.buf = s.buf[:n]
		s.err = errQueueFull
		s.mu.Unlock()
		s.onFail(errQueueFull)
		return errQueueFull
	}
	if s.flushing || (mode == sendLazy && len(s.buf) < lazyFlush) {
		s.mu.Unlock()
		return nil
	}
	s.flushing = true
	switch mode {
	case sendAsync:
		s.mu.Unlock()
		go s.flushLoop()
		return nil
	case sendBatch:
		s.mu.Unlock()
		runtime.Gosched()
		s.mu.Lock()
	}
	err = s.flushLocked()
	s.mu.Unlock()
	if err != nil {
		s.onFail(err)
	}
	return err
}

func (s *sender) flushLoop() {
	s.mu.Lock()
	err := s.flushLocked()
	s.mu.Unlock()
	if err != nil {
		s.onFail(err)
	}
}

// flushLocked writes until the queue is empty. It is called with mu held
// and flushing set, and releases mu around each write.
func (s *sender) flushLocked() error {
	for len(s.buf) > 0 && s.err == nil {
		b := s.buf
		s.buf = s.spare[:0]
		s.mu.Unlock()
		if s.timeout > 0 {
			// The deadline is moved only once less than half the
			// timeout is left, not for every write: moving it
			// costs a timer update.
			if now := time.Now().UnixNano(); s.deadline-now < int64(s.timeout/2) {
				s.deadline = now + int64(s.timeout)
				s.nc.SetWriteDeadline(time.Unix(0, s.deadline))
			}
		}
		_, err := s.nc.Write(b)
		s.mu.Lock()
		if cap(b) <= keepBuffer {
			s.spare = b[:0]
		} else {
			// Start the next at the largest size kept, rather than
			// regrow it from nothing for the next burst.
			s.spare = make([]byte, 0, keepBuffer)
		}
		if err != nil && s.err == nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				err = fmt.Errorf("peer is not reading: a write made no progress within %v to %v: %w", s.timeout/2, s.timeout, err)
			}
			s.err = fmt.Errorf("clusterclient: write to %s: %w", s.nc.RemoteAddr(), err)
			s.buf = nil
			s.flushing = false
			return s.err
		}
	}
	s.flushing = false
	if cap(s.buf) > keepBuffer {
		s.buf = nil
	}
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
