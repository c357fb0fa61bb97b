package clusterclient

import (
	"bufio"
	"context"
	"errors"
	"fmt"
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
// at once when the reader stops.
type follower struct {
	name    string
	cfg     *Config
	nc      net.Conn
	w       *sender
	r       *Reader
	deliver func(key string, data []byte) // called by the reader for each pushed value
	dead    chan struct{}                 // closed when the reader has stopped
	closing chan struct{}                 // closed when the leader sent leader_closing

	lastRecv atomic.Int64 // unix nanoseconds when the last packet arrived
	hbSent   int64        // touched only by beat: when the last heartbeat went out

	mu       sync.Mutex
	pending  map[uint64]chan answer // guarded by mu: calls waiting for their answer, by request id
	err      error                  // guarded by mu: why the connection ended; nil while it serves
	draining bool                   // guarded by mu: the leader is closing; no new calls
	hb       *time.Timer            // guarded by mu: the heartbeat tick, re-armed by beat while err is nil
}

// answer is the outcome of a call: its response, or why it has none.
type answer struct {
	p   Packet
	err error
}

// dialLeader connects to the leader on cfg.Port and registers the channel
// name. The leader answers only once its real client is ready. ctx ends
// when the client closes, which closes the connection.
func dialLeader(ctx context.Context, name string, cfg *Config, deliver func(key string, data []byte)) (*follower, error) {
	d := net.Dialer{Timeout: cfg.ResponseTimeout}
	nc, err := d.DialContext(ctx, "tcp", loopback(cfg.Port))
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	f := &follower{name: name, cfg: cfg, nc: nc, deliver: deliver, dead: make(chan struct{}),
		closing: make(chan struct{}), pending: make(map[uint64]chan answer)}
	f.w = newSender(nc, cfg.MaxQueuedBytes, cfg.ResponseTimeout, f.fail)
	f.r = NewReader(bufio.NewReaderSize(nc, followerReadBuffer), cfg.MaxPacketSize)
	id, timeout := nextID(), int32(cfg.ResponseTimeout/time.Millisecond)
	err = f.w.send(true, func(b []byte) ([]byte, error) {
		return appendPacket(b, false, id, timeout, registerChannel{ChannelName: name, Secret: cfg.Secret}, nil)
	})
	if err == nil {
		// Like the reference, wait one response timeout for the answer,
		// then try again: a leader still building its real client
		// answers a later attempt.
		nc.SetReadDeadline(time.Now().Add(cfg.ResponseTimeout))
		err = f.readRegistered(id)
	}
	if !stop() && err == nil {
		err = ErrClosed
	}
	if err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetReadDeadline(time.Time{})
	f.lastRecv.Store(time.Now().UnixNano())
	f.mu.Lock()
	f.hb = time.AfterFunc(cfg.HeartbeatInterval, f.beat)
	f.mu.Unlock()
	go f.readLoop()
	return f, nil
}

// errNotLeader says that what answers on the port does not speak the
// protocol.
type errNotLeader struct {
	addr string
	err  error
}

func (e *errNotLeader) Error() string {
	return "what answers on " + e.addr + " is not a cluster-client leader: " + e.err.Error()
}

func (e *errNotLeader) Unwrap() error { return e.err }

// readRegistered reads the answer to register_channel.
func (f *follower) readRegistered(id uint64) error {
	addr := loopback(f.cfg.Port)
	var p Packet
	if err := f.r.ReadPacket(&p); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return fmt.Errorf("%w: %s accepted the connection but did not answer register_channel within %v: "+
				"the leader is stopped or overloaded, its real client is still being built, or it is not a cluster-client leader",
				ErrTimeout, addr, f.cfg.ResponseTimeout)
		}
		if isProtocolError(err) {
			return &errNotLeader{addr, err}
		}
		return fmt.Errorf("connection to %s closed before the leader answered: %w", addr, err)
	}
	c, typ, err := parseConn(p.Conn)
	if err != nil {
		return &errNotLeader{addr, err}
	}
	if _, ok := c.(registerChannelRes); !ok || !p.Response || p.ID != id {
		return &errNotLeader{addr, fmt.Errorf("answered register_channel with %q", typ)}
	}
	var res registerResult
	if err := f.cfg.Codec.Unmarshal(p.App, &res); err != nil {
		return &errNotLeader{addr, fmt.Errorf("register_channel_res app object: %w", err)}
	}
	if !res.Success {
		re := &RemoteError{Name: "Error", Message: "register refused"}
		if e := res.Error; e != nil {
			re = &RemoteError{Name: e.Name, Message: e.Message, Code: codeText(e.Code), Stack: e.Stack}
		}
		return re
	}
	return nil
}

// isProtocolError reports a packet that breaks the protocol, as opposed
// to a connection that ended.
func isProtocolError(err error) bool {
	for _, e := range []error{ErrBadVersion, ErrBadType, ErrNegativeLength, ErrPacketTooLarge, ErrBadConn, ErrArgCount, ErrArgOverrun} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// readLoop reads packets until the connection ends, then fails the
// pending calls.
func (f *follower) readLoop() {
	defer close(f.dead)
	for {
		var p Packet
		err := f.r.ReadPacket(&p)
		if err == nil {
			err = f.handle(&p)
		}
		if err != nil {
			f.fail(err)
			return
		}
	}
}

// handle handles one packet from the leader: an answer goes to its
// pending call, a pushed value is acknowledged and delivered, and
// leader_closing starts the drain. An error ends the connection.
func (f *follower) handle(p *Packet) error {
	f.lastRecv.Store(time.Now().UnixNano())
	if p.Response {
		f.mu.Lock()
		ch := f.pending[p.ID]
		delete(f.pending, p.ID)
		leave := f.draining && len(f.pending) == 0
		f.mu.Unlock()
		if ch != nil {
			ch <- answer{p: *p}
		}
		if leave {
			return errDraining
		}
		return nil
	}
	c, _, err := parseConn(p.Conn)
	if err != nil {
		return err
	}
	switch c := c.(type) {
	case subscribeResult:
		// The reference follower writes timeout 0 here: its decoded
		// request has no timeout to repeat.
		id := p.ID
		f.w.send(false, func(b []byte) ([]byte, error) {
			return appendPacket(b, true, id, 0, subscribeResultRes{}, nil)
		})
		f.deliver(c.Key, p.App)
	case leaderClosing:
		f.mu.Lock()
		if !f.draining {
			f.draining = true
			close(f.closing)
		}
		leave := len(f.pending) == 0
		f.mu.Unlock()
		if leave {
			return errDraining
		}
	}
	return nil
}

// fail ends the connection: every pending call fails with an error
// wrapping ErrLeaderLost, or with ErrClosed when the client closed it.
func (f *follower) fail(cause error) {
	f.mu.Lock()
	if f.err != nil {
		f.mu.Unlock()
		return
	}
	err := ErrClosed
	if cause != ErrClosed {
		err = fmt.Errorf("%w: %v", ErrLeaderLost, cause)
	}
	f.err = err
	pending, hb := f.pending, f.hb
	f.pending = nil
	f.mu.Unlock()
	if hb != nil {
		hb.Stop() // beat re-arms it no more: err is set
	}
	f.w.fail(err)
	f.nc.Close()
	for _, ch := range pending {
		ch <- answer{err: err}
	}
}

// forget drops a pending call that gave up waiting. It reports false if
// the call was no longer pending: its answer is on the way.
func (f *follower) forget(id uint64) bool {
	f.mu.Lock()
	_, ok := f.pending[id]
	delete(f.pending, id)
	leave := ok && f.draining && len(f.pending) == 0
	f.mu.Unlock()
	if leave {
		f.fail(errDraining)
	}
	return ok
}

// request sends a request built by encode and waits for its answer,
// bounded by Config.ResponseTimeout and ctx.
func (f *follower) request(ctx context.Context, what string, encode func(b []byte, id uint64, timeout int32) ([]byte, error)) (Packet, error) {
	timeout := f.cfg.ResponseTimeout
	dl, byCtx := ctx.Deadline()
	if byCtx = byCtx && time.Until(dl) < timeout; byCtx {
		if timeout = time.Until(dl); timeout <= 0 {
			return Packet{}, context.DeadlineExceeded
		}
	}
	id, ms := nextID(), max(int32(timeout/time.Millisecond), 1)
	ch := make(chan answer, 1)
	f.mu.Lock()
	err := f.usable()
	if err == nil {
		f.pending[id] = ch
	}
	f.mu.Unlock()
	if err != nil {
		return Packet{}, err
	}
	if err := f.w.send(true, func(b []byte) ([]byte, error) { return encode(b, id, ms) }); err != nil {
		f.forget(id)
		return Packet{}, f.sendError(err)
	}
	var expired <-chan time.Time
	if !byCtx {
		t := time.NewTimer(timeout)
		defer t.Stop()
		expired = t.C
	}
	select {
	case a := <-ch:
		return a.p, a.err
	case <-expired:
	case <-ctx.Done():
		err = ctx.Err()
	}
	if !f.forget(id) {
		a := <-ch // answered meanwhile
		return a.p, a.err
	}
	if err == nil || err == context.DeadlineExceeded {
		err = fmt.Errorf("%w: %s: no answer from the leader on port %d within %v", ErrTimeout, what, f.cfg.Port, timeout)
	}
	return Packet{}, err
}

// oneway sends a request that gets no response.
func (f *follower) oneway(encode func(b []byte) ([]byte, error)) error {
	f.mu.Lock()
	err := f.usable()
	f.mu.Unlock()
	if err != nil {
		return err
	}
	if err := f.w.send(true, encode); err != nil {
		return f.sendError(err)
	}
	return nil
}

// usable says why no new request may go out: errDraining or errGone, on
// which the call waits for the next leader. Called with mu held.
func (f *follower) usable() error {
	if f.draining {
		return errDraining
	}
	if f.err != nil {
		return errGone
	}
	return nil
}

// sendError tells a refusal of the packet itself from a broken
// connection, which fails the call with ErrLeaderLost: the packet may
// have reached the leader.
func (f *follower) sendError(err error) error {
	if errors.Is(err, ErrPacketTooLarge) {
		return err
	}
	f.fail(err)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.draining {
		return errDraining
	}
	return f.err
}

// beat runs every heartbeat interval. A follower that has heard nothing
// from its leader for an interval sends a heartbeat; if nothing at all
// arrives by the next tick, the leader is taken for dead.
func (f *follower) beat() {
	f.mu.Lock()
	dead := f.err != nil
	f.mu.Unlock()
	if dead {
		return
	}
	now, last := time.Now().UnixNano(), f.lastRecv.Load()
	interval := f.cfg.HeartbeatInterval
	switch {
	case f.hbSent != 0 && last < f.hbSent:
		if !f.cfg.DisableHeartbeatCheck {
			f.cfg.Logger.Warn("clusterclient: leader did not answer a heartbeat; leaving it",
				"channel", f.name, "port", f.cfg.Port, "silent", time.Duration(now-last))
			f.fail(fmt.Errorf("leader on port %d silent for %v after a heartbeat", f.cfg.Port, time.Duration(now-f.hbSent)))
			return
		}
	case time.Duration(now-last) >= interval*9/10:
		id, timeout := nextID(), int32(f.cfg.ResponseTimeout/time.Millisecond)
		f.w.send(false, func(b []byte) ([]byte, error) {
			return appendPacket(b, false, id, timeout, heartbeat{}, nil)
		})
		f.hbSent = now
	}
	f.mu.Lock()
	if f.err == nil {
		f.hb.Reset(interval)
	}
	f.mu.Unlock()
}

// close ends the connection on purpose.
func (f *follower) close() {
	f.fail(ErrClosed)
	<-f.dead
}
