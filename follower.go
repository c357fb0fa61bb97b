package clusterclient

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// errDraining: the leader announced a planned close; the call waits for
// the next leader and is sent there.
var errDraining = errors.New("clusterclient: leader is closing")

// errGone: the connection to the leader had already ended when the call
// came; the call was not sent, and waits for the next leader.
var errGone = errors.New("clusterclient: connection to the leader is gone")

// followerReadBuffer is the read buffer of a follower's connection. A
// client has one, so it can be larger than a leader's per connection
// (readBufferSize) and take a burst of answers in fewer reads.
const followerReadBuffer = 64 << 10

// follower is a client's connection to the leader of its channel. One
// reader goroutine reads the connection for its whole life: it hands each
// answer to its pending call, and each pushed value to the client at
// once. A call is registered in pending before it is written, and fails
// at once when the reader stops. Callers never read the socket.
type follower struct {
	name     string
	cfg      *Config
	nc       net.Conn
	w        *sender
	deliver  func(key string, data []byte, err error) // called by the reader for each pushed value and refusal
	dead     chan struct{}                            // closed when the reader has stopped
	closing  chan struct{}                            // closed when the leader sent leader_closing
	lastRecv atomic.Int64                             // unix nanoseconds when the last packet arrived

	mu      sync.Mutex
	pending map[uint64]chan answer // guarded by mu: calls waiting for their answer, by request id
	err     error                  // guarded by mu: why the connection ended; nil while it serves
	refusal error                  // guarded by mu: errDraining once the leader is closing, else errGone once err is set
}

// answer is the outcome of a call: its response, or why it has none.
type answer struct {
	p   Packet
	err error
}

// dialLeader connects to the leader on cfg.Port and registers the channel
// name. The leader answers only once its real client is ready. ctx ends
// when the client closes, which closes the connection.
func dialLeader(ctx context.Context, name string, cfg *Config, deliver func(key string, data []byte, err error)) (*follower, error) {
	nc, err := (&net.Dialer{Timeout: cfg.ResponseTimeout}).DialContext(ctx, "tcp", loopback(cfg.Port))
	if err != nil {
		return nil, err
	}
	if uid, ok := peerAllowed(cfg, nc.RemoteAddr(), nc.LocalAddr()); !ok {
		nc.Close()
		if uid < 0 { // gone: the listener closed it, as a dying leader's does; the next attempt finds the new one
			return nil, fmt.Errorf("clusterclient: connection to the leader on port %d closed before register_channel", cfg.Port)
		}
		return nil, &errNotLeader{fmt.Errorf("clusterclient: the leader on port %d runs as uid %d, not as this process's user: "+
			"set Config.AllowUIDs or AllowAnyUser to follow it", cfg.Port, uid)}
	}
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	f := &follower{name: name, cfg: cfg, nc: nc, deliver: deliver, dead: make(chan struct{}), closing: make(chan struct{}), pending: make(map[uint64]chan answer)}
	f.w = newSender(nc, cfg.MaxQueuedBytes, cfg.ResponseTimeout, func(err error) { f.fail(err) }, func(int) {})
	r := NewReader(bufio.NewReaderSize(nc, followerReadBuffer), cfg.MaxPacketSize)
	err = f.register(r)
	stop() // should ctx have ended, the client closes f at once
	if err != nil {
		nc.Close()
		return nil, err
	}
	f.lastRecv.Store(time.Now().UnixNano())
	go f.readLoop(r)
	go f.heartbeat()
	return f, nil
}

// errNotLeader: what answers on the port does not speak the protocol, or
// did not answer register_channel in time.
type errNotLeader struct{ error }

func (e *errNotLeader) Unwrap() error { return e.error }

// register sends register_channel and reads the answer. Like the
// reference, it waits one response timeout for it: a leader still
// building its real client answers a later attempt. A connection that
// ends first is no errNotLeader: a leader that is closing has a successor.
func (f *follower) register(r *Reader) error {
	id, addr := nextID(), loopback(f.cfg.Port)
	err := f.w.send(true, func(b []byte) ([]byte, error) {
		return appendPacket(b, false, id, f.timeoutMS(), registerChannel{ChannelName: f.name, Secret: f.cfg.Secret}, nil)
	})
	f.nc.SetReadDeadline(time.Now().Add(f.cfg.ResponseTimeout))
	defer f.nc.SetReadDeadline(time.Time{})
	var p Packet
	var ne net.Error
	if err == nil {
		err = r.ReadPacket(&p)
	}
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		err = fmt.Errorf("%w: no answer to register_channel within %v", ErrTimeout, f.cfg.ResponseTimeout)
	case ne != nil || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("clusterclient: connection to %s closed before the leader answered: %w", addr, err)
	case err == nil:
		err = registerAnswer(&p, id, f.cfg.Codec)
	}
	if _, refused := err.(*RemoteError); err == nil || refused || err == errDraining {
		return err
	}
	return &errNotLeader{fmt.Errorf("clusterclient: %s is not a cluster-client leader, or not yet: what answers there "+
		"does not speak the protocol or did not answer; if another program holds the port, choose another Config.Port or %s: %w", addr, EnvPort, err)}
}

// registerAnswer checks that p answers the register_channel request id,
// and returns the leader's refusal if it refused.
func registerAnswer(p *Packet, id uint64, codec Codec) error {
	c, typ, err := parseConn(p.Conn)
	_, ok := c.(registerChannelRes)
	var res registerResult
	switch {
	case err != nil:
		return err
	case c == connObject(leaderClosing{}):
		return errDraining // a leader closing before it answered: its successor answers the next attempt
	case !ok || !p.Response || p.ID != id:
		return fmt.Errorf("answered register_channel with %q", typ)
	case codec.Unmarshal(p.App, &res) != nil:
		return fmt.Errorf("register_channel_res app object %.64q does not decode", p.App)
	case !res.Success:
		e := cmp.Or(res.Error, &registerErrorObject{Name: "Error", Message: "register refused"})
		return &RemoteError{Name: e.Name, Message: e.Message, Code: string(e.Code), Stack: e.Stack}
	}
	return nil
}

// readLoop reads packets until the connection ends, then fails the
// pending calls. It is the only reader of r. An answer goes to its
// pending call, a pushed value is acknowledged and delivered, so is a
// subscribe_failed refusal (not acknowledged), and leader_closing starts
// the drain. A packet that does not parse ends the connection.
func (f *follower) readLoop(r *Reader) {
	defer close(f.dead)
	var err error
	for err == nil {
		var p Packet
		if err = r.ReadPacket(&p); err != nil {
			break
		}
		f.lastRecv.Store(time.Now().UnixNano())
		var c connObject
		if !p.Response {
			c, _, err = parseConn(p.Conn)
		} else if ch := f.take(p.ID); ch != nil {
			ch <- answer{p: p}
		}
		switch c := c.(type) {
		case subscribeResult:
			// The reference follower writes timeout 0 here: its decoded
			// request has no timeout to repeat.
			f.w.send(false, func(b []byte) ([]byte, error) { return appendPacket(b, true, p.ID, 0, subscribeResultRes{}, nil) })
			f.deliver(c.Key, p.App, nil)
		case subscribeFailed: // a Go leader refused to subscribe c.Key
			e := invokeErrorObject{Name: "Error", Message: "subscription refused"}
			f.cfg.Codec.Unmarshal(p.App, &e) // the leader's error object, or what decodes of it
			f.deliver(c.Key, nil, &RemoteError{Name: e.Name, Message: e.Message, Code: string(e.Code), Stack: e.Stack})
		case leaderClosing:
			if f.mu.Lock(); f.refusal != errDraining {
				close(f.closing)
			}
			f.refusal = errDraining
			f.mu.Unlock()
			f.take(0) // no call has id 0: this leaves now if no call is pending
		}
	}
	f.fail(err)
}

// take removes the pending call id and returns its channel, nil if it
// was not pending. Once the leader is closing and no call is pending, the
// connection closes.
func (f *follower) take(id uint64) chan answer {
	f.mu.Lock()
	ch := f.pending[id]
	delete(f.pending, id)
	leave := f.refusal == errDraining && f.err == nil && len(f.pending) == 0
	f.mu.Unlock()
	if leave {
		f.fail(errDraining)
	}
	return ch
}

// fail ends the connection: every pending call fails with an error
// wrapping ErrLeaderLost, or with ErrClosed when the client closed it. It
// returns the error of the first failure.
func (f *follower) fail(cause error) error {
	f.mu.Lock()
	err, pending := f.err, f.pending
	if err == nil && cause == ErrClosed {
		err = ErrClosed
	} else if err == nil {
		err = fmt.Errorf("%w: %v", ErrLeaderLost, cause)
	}
	f.err, f.pending, f.refusal = err, nil, cmp.Or(f.refusal, errGone) // pending is already nil if err was set
	f.mu.Unlock()
	f.w.fail(err)
	f.nc.Close()
	for _, ch := range pending {
		ch <- answer{err: err}
	}
	return err
}

// routeInvoke sends an invoke of method and, unless oneway, waits for
// its answer, bounded by Config.ResponseTimeout and ctx. An invoke larger
// than Config.MaxPacketSize is refused here, as the leader would refuse
// it.
func (f *follower) routeInvoke(ctx context.Context, method string, args [][]byte, oneway bool) (Value, error) {
	timeout := f.cfg.ResponseTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(dl))
	}
	if timeout <= 0 {
		return Value{}, context.DeadlineExceeded
	}
	id, ms, ch := nextID(), max(int32(timeout/time.Millisecond), 1), make(chan answer, 1)
	if oneway {
		ms, ch = f.timeoutMS(), nil
	}
	err := f.send(id, ch, func(b []byte) ([]byte, error) {
		return appendInvoke(b, id, ms, method, oneway, args, f.cfg.MaxPacketSize)
	})
	if err != nil || oneway {
		return Value{}, err
	}
	select {
	case a := <-ch:
		return f.result(a)
	case <-time.After(timeout): // collected once the call returns
		err = fmt.Errorf("%w: %.64s: no answer from the leader on port %d within %v", ErrTimeout, method, f.cfg.Port, timeout)
	case <-ctx.Done():
		err = ctx.Err()
	}
	f.take(id) // an answer that comes now is dropped
	return Value{}, err
}

// result reads the answer to an invoke.
func (f *follower) result(a answer) (Value, error) {
	c, typ, err := parseConn(a.p.Conn)
	res, ok := c.(invokeResult)
	var e invokeErrorObject
	switch {
	case a.err != nil || err != nil: // a.err first: then there is no packet
		return Value{}, cmp.Or(a.err, err)
	case !ok:
		return Value{}, fmt.Errorf("%w: answer to invoke has type %.64q", ErrBadConn, typ)
	case res.Success:
		return Value{data: a.p.App, codec: f.cfg.Codec}, nil
	case f.cfg.Codec.Unmarshal(a.p.App, &e) != nil:
		return Value{}, fmt.Errorf("clusterclient: remote error %.64q does not decode", a.p.App)
	}
	return Value{}, &RemoteError{Name: e.Name, Message: e.Message, Code: string(e.Code), Stack: e.Stack}
}

// routeSubscribe sends subscribe.
func (f *follower) routeSubscribe(key string, reg json.RawMessage) { f.post(subscribe{key, reg}) }

// routeUnsubscribe sends unSubscribe.
func (f *follower) routeUnsubscribe(key string, reg json.RawMessage) { f.post(unSubscribe{key, reg}) }

// post sends a request that waits for no answer.
func (f *follower) post(c connObject) error {
	return f.send(0, nil, func(b []byte) ([]byte, error) { return appendPacket(b, false, nextID(), f.timeoutMS(), c, nil) })
}

// timeoutMS is the timeout carried by requests that wait for no answer.
func (f *follower) timeoutMS() int32 { return int32(f.cfg.ResponseTimeout / time.Millisecond) }

// send writes a request, registered first as pending under id if ch is
// not nil. errDraining and errGone say that it was not sent, and waits for
// the next leader. A write that failed fails the connection: the request
// may have reached the leader.
func (f *follower) send(id uint64, ch chan answer, encode func(b []byte) ([]byte, error)) error {
	f.mu.Lock()
	err := f.refusal
	if err == nil && ch != nil {
		f.pending[id] = ch
	}
	f.mu.Unlock()
	if err != nil {
		return err
	}
	err = f.w.send(true, encode)
	if errors.Is(err, ErrPacketTooLarge) || err == errGone {
		f.take(id) // refused, or dropped by a sender already stopped: nothing was written
	} else if err != nil {
		err = f.fail(err)
	}
	return err
}

// heartbeat runs until the reader stops. Every interval, a follower that
// has heard nothing from its leader for about an interval sends a
// heartbeat; if nothing at all arrives by the next tick, it leaves the
// leader. A leader that is closing gets none: the calls still pending on
// it are bounded by their own timeouts.
func (f *follower) heartbeat() {
	t := time.NewTicker(f.cfg.HeartbeatInterval)
	defer t.Stop()
	for sent := int64(0); ; { // sent: unix nanoseconds when the last heartbeat went out
		select {
		case <-f.dead:
			return
		case <-t.C:
		}
		now := time.Now().UnixNano()
		if sent > f.lastRecv.Load() && !f.cfg.DisableHeartbeatCheck {
			err := fmt.Errorf("leader on port %d silent for %v after a heartbeat", f.cfg.Port, time.Duration(now-sent))
			f.cfg.Logger.Warn("clusterclient: leaving the leader", "channel", f.name, "err", err)
			f.fail(err)
			return
		}
		if now-f.lastRecv.Load() >= int64(f.cfg.HeartbeatInterval*9/10) && f.post(heartbeat{}) == nil {
			sent = now
		}
	}
}

// The sender below writes the packets of every connection, a leader's as
// well as a follower's.

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
	charge   func(n int)   // told of bytes queued (n > 0) and written or dropped (n < 0), twice: see newSender

	mu         sync.Mutex
	buf, spare []byte // guarded by mu: encoded packets not yet written; the other buffer, empty
	writing    bool   // guarded by mu: a goroutine is writing
	err        error  // guarded by mu: why the connection takes no more packets
}

// newSender returns the sender of nc. charge is told of each byte queued
// and written twice over: the buffer that holds queued packets grows by
// doubling, so a queue may take twice its length in memory.
func newSender(nc net.Conn, maxQueue int, timeout time.Duration, onFail func(error), charge func(n int)) *sender {
	return &sender{nc: nc, maxQueue: maxQueue, timeout: timeout, onFail: onFail, charge: charge}
}

// send encodes a packet with encode and queues it. If no write is under
// way, the caller writes the queue itself (inline), or a new goroutine
// does, so that the caller never waits on the socket.
func (s *sender) send(inline bool, encode func(b []byte) ([]byte, error)) error {
	s.mu.Lock()
	b, err := encode(s.buf)
	start := false // whether this send starts a write
	if s.err != nil {
		err = errGone // a stopped sender drops the packet
	} else if err == nil && len(b) > s.maxQueue && len(s.buf) > 0 {
		s.err, err = errQueueFull, errQueueFull
		go s.onFail(err)
	} else if err == nil {
		s.charge(2 * (len(b) - len(s.buf)))
		s.buf, s.writing, start = b, true, !s.writing
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
		s.charge(-2 * len(b))
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
	defer s.mu.Unlock()
	s.err = cmp.Or(s.err, err)
	s.charge(-2 * len(s.buf)) // never written
	s.buf = s.buf[:0]
}
