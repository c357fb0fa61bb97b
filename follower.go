package clusterclient

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
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
	deliver  func(key string, data []byte) // called by the reader for each pushed value
	dead     chan struct{}                 // closed when the reader has stopped
	closing  chan struct{}                 // closed when the leader sent leader_closing
	lastRecv atomic.Int64                  // unix nanoseconds when the last packet arrived

	mu       sync.Mutex
	pending  map[uint64]chan answer // guarded by mu: calls waiting for their answer, by request id
	err      error                  // guarded by mu: why the connection ended; nil while it serves
	draining bool                   // guarded by mu: the leader is closing; no new calls
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
	nc, err := (&net.Dialer{Timeout: cfg.ResponseTimeout}).DialContext(ctx, "tcp", loopback(cfg.Port))
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	f := &follower{name: name, cfg: cfg, nc: nc, deliver: deliver, dead: make(chan struct{}),
		closing: make(chan struct{}), pending: make(map[uint64]chan answer)}
	f.w = newSender(nc, cfg.MaxQueuedBytes, cfg.ResponseTimeout, func(err error) { f.fail(err) })
	r := NewReader(bufio.NewReaderSize(nc, followerReadBuffer), cfg.MaxPacketSize)
	id, timeout := nextID(), int32(cfg.ResponseTimeout/time.Millisecond)
	err = f.w.send(true, func(b []byte) ([]byte, error) {
		return appendPacket(b, false, id, timeout, registerChannel{ChannelName: name, Secret: cfg.Secret}, nil)
	})
	if err == nil {
		// Like the reference, wait one response timeout for the answer,
		// then try again: a leader still building its real client
		// answers a later attempt.
		nc.SetReadDeadline(time.Now().Add(cfg.ResponseTimeout))
		err = f.readRegistered(r, id)
	}
	stop() // should ctx have ended, the client closes f at once
	if err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetReadDeadline(time.Time{})
	f.lastRecv.Store(time.Now().UnixNano())
	go f.readLoop(r)
	go f.heartbeat()
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
func (f *follower) readRegistered(r *Reader, id uint64) error {
	addr := loopback(f.cfg.Port)
	var p Packet
	if err := r.ReadPacket(&p); err != nil {
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
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
	if e := res.Error; !res.Success && e != nil {
		return &RemoteError{Name: e.Name, Message: e.Message, Code: codeText(e.Code), Stack: e.Stack}
	} else if !res.Success {
		return &RemoteError{Name: "Error", Message: "register refused"}
	}
	return nil
}

// isProtocolError reports a packet that breaks the protocol, as opposed
// to a connection that ended.
func isProtocolError(err error) bool {
	return slices.ContainsFunc([]error{ErrBadVersion, ErrBadType, ErrNegativeLength, ErrPacketTooLarge, ErrBadConn, ErrArgCount, ErrArgOverrun},
		func(e error) bool { return errors.Is(err, e) })
}

// readLoop reads packets until the connection ends, then fails the
// pending calls. It is the only reader of r.
func (f *follower) readLoop(r *Reader) {
	defer close(f.dead)
	var err error
	for err == nil {
		var p Packet
		if err = r.ReadPacket(&p); err == nil {
			err = f.handle(&p)
		}
	}
	f.fail(err)
}

// handle handles one packet from the leader: an answer goes to its
// pending call, a pushed value is acknowledged and delivered, and
// leader_closing starts the drain. An error ends the connection.
func (f *follower) handle(p *Packet) error {
	f.lastRecv.Store(time.Now().UnixNano())
	if p.Response {
		if ch := f.take(p.ID); ch != nil {
			ch <- answer{p: *p}
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
		f.w.send(false, func(b []byte) ([]byte, error) {
			return appendPacket(b, true, p.ID, 0, subscribeResultRes{}, nil)
		})
		f.deliver(c.Key, p.App)
	case leaderClosing:
		f.mu.Lock()
		if !f.draining {
			close(f.closing)
		}
		f.draining = true
		leave := len(f.pending) == 0
		f.mu.Unlock()
		if leave {
			return errDraining
		}
	}
	return nil
}

// take removes the pending call id and returns its channel, nil if it
// was not pending. Once the leader is closing and no call is pending, the
// connection closes.
func (f *follower) take(id uint64) chan answer {
	f.mu.Lock()
	ch := f.pending[id]
	delete(f.pending, id)
	leave := f.draining && f.err == nil && len(f.pending) == 0
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
	if err == nil {
		err = ErrClosed
		if cause != ErrClosed {
			err = fmt.Errorf("%w: %v", ErrLeaderLost, cause)
		}
		f.err, f.pending = err, nil
	}
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
		if timeout = min(timeout, time.Until(dl)); timeout <= 0 {
			return Value{}, context.DeadlineExceeded
		}
	}
	id, ms, ch := nextID(), max(int32(timeout/time.Millisecond), 1), make(chan answer, 1)
	if oneway {
		ms, ch = f.timeoutMS(), nil
	}
	err := f.send(id, ch, func(b []byte) ([]byte, error) {
		n := len(b)
		b, err := appendInvoke(b, id, ms, method, oneway, args)
		if size := len(b) - n - HeaderSize; err == nil && size > f.cfg.MaxPacketSize {
			return b[:n], fmt.Errorf("%w: invoke %.64s has %d bytes, Config.MaxPacketSize is %d",
				ErrPacketTooLarge, method, size, f.cfg.MaxPacketSize)
		}
		return b, err
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
	if f.take(id) == nil {
		return f.result(<-ch) // answered meanwhile
	}
	return Value{}, err
}

// result reads the answer to an invoke.
func (f *follower) result(a answer) (Value, error) {
	if a.err != nil {
		return Value{}, a.err
	}
	c, typ, err := parseConn(a.p.Conn)
	res, ok := c.(invokeResult)
	switch {
	case err != nil:
		return Value{}, err
	case !ok:
		return Value{}, fmt.Errorf("%w: answer to invoke has type %.64q", ErrBadConn, typ)
	case res.Success:
		return Value{data: a.p.App, codec: f.cfg.Codec}, nil
	}
	var e invokeErrorObject
	if err := f.cfg.Codec.Unmarshal(a.p.App, &e); err != nil {
		return Value{}, fmt.Errorf("clusterclient: decode remote error: %w", err)
	}
	return Value{}, &RemoteError{Name: e.Name, Message: e.Message, Code: codeText(e.Code), Stack: e.Stack}
}

// routeSubscribe sends subscribe, or unSubscribe when on is false.
func (f *follower) routeSubscribe(key string, reg json.RawMessage, on bool) error {
	var c connObject = subscribe{Key: key, Reg: reg}
	if !on {
		c = unSubscribe{Key: key, Reg: reg}
	}
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
	err := errGone
	if f.draining {
		err = errDraining
	} else if f.err == nil {
		err = nil
		if ch != nil {
			f.pending[id] = ch
		}
	}
	f.mu.Unlock()
	if err != nil {
		return err
	}
	switch err = f.w.send(true, encode); {
	case errors.Is(err, ErrPacketTooLarge):
		f.take(id) // refused before anything was written
	case err != nil:
		err = f.fail(err)
	}
	return err
}

// heartbeat runs until the reader stops. Every interval, a follower that
// has heard nothing from its leader for about an interval sends a
// heartbeat; if nothing at all arrives by the next tick, it leaves the
// leader.
func (f *follower) heartbeat() {
	t := time.NewTicker(f.cfg.HeartbeatInterval)
	defer t.Stop()
	var sent int64 // unix nanoseconds when the last heartbeat went out
	for {
		select {
		case <-f.dead:
			return
		case <-t.C:
		}
		now, last := time.Now().UnixNano(), f.lastRecv.Load()
		switch {
		case sent != 0 && last < sent && !f.cfg.DisableHeartbeatCheck:
			f.cfg.Logger.Warn("clusterclient: leader did not answer a heartbeat; leaving it",
				"channel", f.name, "port", f.cfg.Port, "silent", time.Duration(now-last))
			f.fail(fmt.Errorf("leader on port %d silent for %v after a heartbeat", f.cfg.Port, time.Duration(now-sent)))
			return
		case time.Duration(now-last) >= f.cfg.HeartbeatInterval*9/10:
			f.w.send(true, func(b []byte) ([]byte, error) {
				return appendPacket(b, false, nextID(), int32(f.cfg.ResponseTimeout/time.Millisecond), heartbeat{}, nil)
			})
			sent = now
		}
	}
}

// close ends the connection on purpose.
func (f *follower) close() {
	f.fail(ErrClosed)
	<-f.dead
}
