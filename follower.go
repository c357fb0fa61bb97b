package clusterclient

import (
	"bufio"
	"context"
	"encoding/binary"
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

// follower is a client's connection to the leader of its channel: a
// background reader goroutine, and a map of pending requests by id, each
// registered before it is written and failed at once when reading stops.
//
// One goroutine at a time reads the connection: the background reader,
// or a call that is the only one in flight, which takes the reading over
// and reads its own answer, so no goroutine has to wake it. The call
// holds the reading only while it waits for its answer; it reads a packet
// only once the packet is whole in br, so it never leaves one half read,
// and gives the reading back to the background reader when it is done.
type follower struct {
	c    *Client
	cfg  *Config
	nc   net.Conn
	w    *sender
	br   *bufio.Reader // under r; read only by the goroutine that holds the reading
	r    *Reader
	dead chan struct{} // closed when the background reader has stopped
	wake chan struct{} // capacity 1: a call gave the reading back

	lastRecv atomic.Int64 // unix nanoseconds of the last packet read
	hbSent   int64        // touched only by beat: when the last heartbeat went out

	mu       sync.Mutex
	hb       *time.Timer      // guarded by mu: heartbeat tick, re-armed by beat while err is nil
	pending  map[uint64]*call // guarded by mu
	err      error            // guarded by mu: why the connection is dead
	draining bool             // guarded by mu: the leader is closing on purpose
	expiry   *time.Timer      // guarded by mu: fails calls past their deadline; nil until needed
	expireAt int64            // guarded by mu: unix nanoseconds when expiry fires, 0 if not armed
	reader   *call            // guarded by mu: the call that holds the reading; nil: the background reader does
	want     *call            // guarded by mu: a call waiting to be handed the reading
	bgReads  bool             // guarded by mu: the background reader holds the reading
	idle     bool             // guarded by mu: the background reader waits for a packet and may be interrupted
	deadline bool             // guarded by mu: nc has a read deadline, set to interrupt a read
	resumer  *time.Timer      // guarded by mu: runs resume; nil until needed
	resuming bool             // guarded by mu: resumer is armed
	freedAt  int64            // guarded by mu: unix nanoseconds when a call last left the reading free
}

// longAgo is a read deadline in the past: it interrupts a wait for a
// packet.
var longAgo = time.Unix(1, 0)

// call is one request waiting for its response. The goroutine that takes
// a call out of pending sends its outcome with finish; calls are reused.
type call struct {
	done     chan struct{} // capacity 1: receives one value once resp or err is set
	grant    chan struct{} // capacity 1: the call was handed the reading
	resp     Packet
	err      error
	sent     int64 // unix nanoseconds when the call was made
	deadline int64 // unix nanoseconds when the call times out
}

var callPool = sync.Pool{New: func() any { return &call{done: make(chan struct{}, 1), grant: make(chan struct{}, 1)} }}

func (cl *call) finish(resp Packet, err error) {
	cl.resp, cl.err = resp, err
	cl.done <- struct{}{}
}

// errExpired marks a call that expire failed; request turns it into a
// timeout error that names the call.
var errExpired = errors.New("call expired")

// dialLeader connects to the leader on the port and registers the
// channel. The leader answers only once its real client is ready.
func dialLeader(c *Client) (*follower, error) {
	cfg := &c.cfg
	addr := loopback(cfg.Port)
	// Close does not wait for the dial or the answer: ctx ends with the
	// client, which closes the connection.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-c.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	d := net.Dialer{Timeout: cfg.ResponseTimeout}
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	f := &follower{c: c, cfg: cfg, nc: nc, dead: make(chan struct{}), wake: make(chan struct{}, 1), pending: make(map[uint64]*call)}
	f.w = newSender(nc, cfg.MaxQueuedBytes, cfg.ResponseTimeout, f.fail)
	id, timeout := nextID(), int32(cfg.ResponseTimeout/time.Millisecond)
	err = f.w.send(true, func(b []byte) ([]byte, error) {
		return appendPacket(b, false, id, timeout, registerChannel{ChannelName: c.name, Secret: cfg.Secret}, nil)
	})
	if err != nil {
		nc.Close()
		return nil, err
	}
	// Like the reference, wait one response timeout for the answer, then
	// try again: a leader still building its real client answers a later
	// attempt.
	nc.SetReadDeadline(time.Now().Add(cfg.ResponseTimeout))
	f.br = bufio.NewReaderSize(nc, followerReadBuffer)
	f.r = NewReader(f.br, cfg.MaxPacketSize)
	if err := f.readRegistered(id); err != nil {
		nc.Close()
		return nil, err
	}
	if !stop() {
		return nil, ErrClosed
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

// readLoop reads packets from the leader while no call holds the
// reading, hands the reading to a call that asks for it, and ends once
// the connection has failed.
func (f *follower) readLoop() {
	defer close(f.dead)
	var p Packet
	for {
		f.mu.Lock()
		if cl := f.want; cl != nil && f.reader == nil {
			f.reader, f.want = cl, nil
			cl.grant <- struct{}{}
		}
		f.bgReads = f.err == nil && f.reader == nil
		if !f.bgReads {
			stop := f.err != nil
			f.mu.Unlock()
			if stop {
				return
			}
			<-f.wake
			continue
		}
		buffered := packetBuffered(f.br)
		if !buffered {
			if f.deadline {
				f.nc.SetReadDeadline(time.Time{})
				f.deadline = false
			}
			f.idle = true
		}
		f.mu.Unlock()
		if !buffered {
			f.await()
			f.mu.Lock()
			f.idle = false
			again := f.want != nil || f.deadline
			f.mu.Unlock()
			if again {
				// Interrupted by a call that wants the reading, or
				// one that no longer does: the read deadline is
				// cleared before a packet is read.
				continue
			}
		}
		// No read deadline is set: ReadPacket reads a whole packet or
		// one larger than br, or reports the error await saw.
		if err := f.next(&p); err != nil {
			f.fail(err) // the loop hands the reading to a call that asked, and ends
		}
	}
}

// await waits, without consuming anything, until the next packet is
// whole in br. Acknowledgements queued for the packets read so far go
// out in one write before it waits. It reports false, with a nil error,
// for a packet larger than br can hold.
func (f *follower) await() (bool, error) {
	if packetBuffered(f.br) {
		return true, nil
	}
	f.w.flush()
	h, err := f.br.Peek(HeaderSize)
	if err != nil {
		return false, err
	}
	f.lastRecv.Store(time.Now().UnixNano())
	n := int64(HeaderSize) + int64(int32(binary.BigEndian.Uint32(h[16:]))) + int64(int32(binary.BigEndian.Uint32(h[20:])))
	if n > int64(f.br.Size()) {
		return false, nil
	}
	_, err = f.br.Peek(int(max(n, HeaderSize)))
	return err == nil, err
}

// next reads one packet and handles it: a response goes to its pending
// call, a push is acknowledged and delivered, a leader_closing notice
// starts the drain. Called by the goroutine that holds the reading.
func (f *follower) next(p *Packet) error {
	if err := f.r.ReadPacket(p); err != nil {
		return err
	}
	if p.Response {
		f.mu.Lock()
		cl := f.pending[p.ID]
		delete(f.pending, p.ID)
		leave := f.draining && len(f.pending) == 0
		f.mu.Unlock()
		if cl != nil {
			cl.finish(*p, nil)
		}
		if leave {
			f.fail(errDraining)
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
		f.w.sendLazy(func(b []byte) ([]byte, error) {
			return appendPacket(b, true, id, 0, subscribeResultRes{}, nil)
		})
		f.c.deliver(c.Key, p.App)
	case leaderClosing:
		f.drain()
	}
	return nil
}

// readOwn lets a call that ask accepted read its own answer. It waits
// to be handed the reading, then reads whole packets until the call has
// its outcome, ctx ends, the call expires (expire interrupts the read),
// or a packet is not whole (too large, or the connection failed): the
// background reader reads those. Then it gives the reading back. It
// reports true if it took the call's outcome from done.
func (f *follower) readOwn(ctx context.Context, cl *call) bool {
	granted, got := false, false
	select {
	case <-cl.grant:
		granted = true
	case <-cl.done:
		got = true
	case <-ctx.Done():
	}
	if !granted {
		f.unask(cl)
		return got
	}
	f.mu.Lock()
	if f.reader == cl && f.deadline {
		// An interruption meant for the background reader or for an
		// earlier call. Should cl expire meanwhile, expire finishes it
		// before it interrupts the read, so the loop below sees done.
		f.nc.SetReadDeadline(time.Time{})
		f.deadline = false
	}
	f.mu.Unlock()
	if ctx.Done() != nil {
		// A late run of this, once cl is reused by a later call that
		// reads, only makes that call give the reading back early.
		stop := context.AfterFunc(ctx, func() {
			f.mu.Lock()
			if f.reader == cl {
				f.nc.SetReadDeadline(longAgo)
				f.deadline = true
			}
			f.mu.Unlock()
		})
		defer stop()
	}
	var p Packet
	for len(cl.done) == 0 && ctx.Err() == nil {
		if whole, err := f.await(); !whole || err != nil {
			break
		}
		if err := f.next(&p); err != nil {
			f.fail(err)
			break
		}
	}
	var answered int64
	if len(cl.done) == 1 {
		answered = cl.sent
	}
	f.giveBack(answered)
	return false
}

// ask gives the reading to cl if no one holds it, or else asks the
// background reader to hand it over, interrupting its wait for a packet.
// Either way cl.grant receives a value once cl holds the reading. Called
// with mu held, before cl's request is written, so that the hand-over
// overlaps the round trip. It reports false if another call reads or
// asked first.
func (f *follower) ask(cl *call) bool {
	if f.reader != nil || f.want != nil {
		return false
	}
	if !f.bgReads {
		f.reader = cl
		cl.grant <- struct{}{}
		return true
	}
	f.want = cl
	if f.idle {
		f.nc.SetReadDeadline(longAgo)
		f.deadline = true
	}
	return true
}

// unask withdraws a call's ask; if the reading was handed over already,
// it gives it back.
func (f *follower) unask(cl *call) {
	f.mu.Lock()
	handed := f.want != cl
	if !handed {
		f.want = nil
	}
	f.mu.Unlock()
	if handed {
		<-cl.grant
		f.giveBack(0)
	}
}

// resumeAfter is how long the reading stays free after a call that read
// its own answer, with no call left in flight, before the background
// reader takes it back: a caller that calls again within it reads its
// next answer with no goroutine woken. Meanwhile values pushed and the
// end of the connection wait in the socket, for at most about twice
// this, unless a call or a heartbeat tick comes first. It is not shorter
// because a timer due within about 100 ms makes every wait of the
// process for the network slower on virtual machines (measured: 20 ms
// cost 2 to 3 µs per round trip on loopback, 200 ms none).
const resumeAfter = 250 * time.Millisecond

// giveBack gives up the reading. After a call that has its answer
// (answered: when that call was made, in unix nanoseconds; 0 for none),
// with no other call pending, the reading is left free and the
// background reader takes it back about resumeAfter later (resume);
// otherwise it is woken now.
func (f *follower) giveBack(answered int64) {
	f.w.flush()
	f.mu.Lock()
	f.reader = nil
	free := answered != 0 && f.err == nil && f.want == nil && len(f.pending) == 0
	if free {
		f.freedAt = answered
		if !f.resuming {
			f.resuming = true
			if f.resumer == nil {
				f.resumer = time.AfterFunc(resumeAfter, f.resume)
			} else {
				f.resumer.Reset(resumeAfter)
			}
		}
	}
	f.mu.Unlock()
	if !free {
		f.wakeReader()
	}
}

// resume wakes the background reader once the reading has been free for
// resumeAfter.
func (f *follower) resume() {
	f.mu.Lock()
	f.resuming = false
	wake := false
	if f.err == nil && f.reader == nil && !f.bgReads {
		if left := resumeAfter - time.Duration(time.Now().UnixNano()-f.freedAt); left > 0 {
			f.resuming = true
			f.resumer.Reset(left)
		} else {
			wake = true
		}
	}
	f.mu.Unlock()
	if wake {
		f.wakeReader()
	}
}

// wakeReader wakes the background reader if it waits for the reading.
func (f *follower) wakeReader() {
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// drain stops new calls on this connection; once the calls in flight
// have their answers the connection closes and the client elects again.
func (f *follower) drain() {
	f.mu.Lock()
	if f.draining || f.err != nil {
		f.mu.Unlock()
		return
	}
	f.draining = true
	leave := len(f.pending) == 0
	f.mu.Unlock()
	f.c.unroute(f)
	if leave {
		f.fail(errDraining)
	}
}

// fail ends the connection: every pending call fails with ErrLeaderLost,
// or with ErrClosed when the client closed it.
func (f *follower) fail(cause error) {
	f.mu.Lock()
	if f.err != nil {
		f.mu.Unlock()
		return
	}
	if cause == ErrClosed {
		f.err = ErrClosed
	} else {
		f.err = fmt.Errorf("%w: %v", ErrLeaderLost, cause)
	}
	pending := f.pending
	f.pending = nil
	hb := f.hb
	if f.expiry != nil {
		f.expiry.Stop()
	}
	if f.resumer != nil {
		f.resumer.Stop()
	}
	f.mu.Unlock()
	f.w.fail(f.err)
	f.nc.Close()
	if hb != nil {
		hb.Stop() // beat re-arms it no more: err is set
	}
	for _, cl := range pending {
		cl.finish(Packet{}, f.err)
	}
	f.wakeReader()
}

// forget drops a pending call that gave up waiting. It reports false if
// the call was no longer pending: its outcome is on the way.
func (f *follower) forget(id uint64) bool {
	f.mu.Lock()
	_, ok := f.pending[id]
	delete(f.pending, id)
	leave := f.draining && f.err == nil && len(f.pending) == 0
	f.mu.Unlock()
	if leave {
		f.fail(errDraining)
	}
	return ok
}

// armExpiry makes expire run at the unix nanosecond at. Called with mu
// held. One timer serves every call of the connection: it is moved only
// when a call has an earlier deadline than the one it waits for.
func (f *follower) armExpiry(at, now int64) {
	f.expireAt = at
	d := time.Duration(at - now)
	if f.expiry == nil {
		f.expiry = time.AfterFunc(d, f.expire)
	} else {
		f.expiry.Reset(d)
	}
}

// expire fails the calls past their deadline and waits for the next.
func (f *follower) expire() {
	now := time.Now().UnixNano()
	var expired []*call
	f.mu.Lock()
	f.expireAt = 0
	var next int64
	for id, cl := range f.pending {
		switch {
		case cl.deadline <= now:
			delete(f.pending, id)
			expired = append(expired, cl)
		case next == 0 || cl.deadline < next:
			next = cl.deadline
		}
	}
	if next != 0 && f.err == nil {
		f.armExpiry(next, now)
	}
	leave := len(expired) > 0 && f.draining && f.err == nil && len(f.pending) == 0
	f.mu.Unlock()
	for _, cl := range expired {
		cl.finish(Packet{}, errExpired)
	}
	if len(expired) > 0 {
		// A call that reads its own answer stops reading once it has
		// its outcome: interrupt its wait for a packet. Done after
		// finish, so that a call taking the reading now either sees
		// its outcome or is interrupted. A call record reused since
		// has a later deadline and is left alone.
		f.mu.Lock()
		if cl := f.reader; cl != nil && cl.deadline <= now && slices.Contains(expired, cl) {
			f.nc.SetReadDeadline(longAgo)
			f.deadline = true
		}
		f.mu.Unlock()
	}
	if leave {
		f.fail(errDraining)
	}
}

// request sends a request built by encode and waits for its response,
// bounded by Config.ResponseTimeout and ctx.
func (f *follower) request(ctx context.Context, what string, encode func(b []byte, id uint64, timeout int32) ([]byte, error)) (Packet, error) {
	timeout := f.cfg.ResponseTimeout
	if dl, ok := ctx.Deadline(); ok {
		if d := time.Until(dl); d < timeout {
			if d <= 0 {
				return Packet{}, ctx.Err()
			}
			timeout = d
		}
	}
	id := nextID()
	ms := max(int32(timeout/time.Millisecond), 1)
	now := time.Now().UnixNano()
	cl := callPool.Get().(*call)
	cl.sent, cl.deadline = now, now+int64(timeout)
	f.mu.Lock()
	if err := f.usable(); err != nil {
		f.mu.Unlock()
		callPool.Put(cl)
		return Packet{}, err
	}
	f.pending[id] = cl
	if f.expireAt == 0 || cl.deadline < f.expireAt {
		f.armExpiry(cl.deadline, now)
	}
	mode := sendNow
	if len(f.pending) > 1 {
		mode = sendBatch
	}
	// The only call in flight reads its own answer.
	own := mode == sendNow && f.ask(cl)
	f.mu.Unlock()
	if err := f.w.queue(mode, func(b []byte) ([]byte, error) { return encode(b, id, ms) }); err != nil {
		if own {
			f.unask(cl)
		}
		if !f.forget(id) {
			<-cl.done
			cl.resp, cl.err = Packet{}, nil
		}
		callPool.Put(cl)
		return Packet{}, f.sendError(err)
	}
	if !own || !f.readOwn(ctx, cl) {
		if done := ctx.Done(); done == nil {
			<-cl.done // a plain receive: cheaper to wake than a select
		} else {
			select {
			case <-cl.done:
			case <-done:
				if !f.forget(id) {
					<-cl.done
					cl.resp, cl.err = Packet{}, nil
				}
				callPool.Put(cl)
				return Packet{}, ctx.Err()
			}
		}
	}
	resp, err := cl.resp, cl.err
	cl.resp, cl.err = Packet{}, nil
	callPool.Put(cl)
	if err == errExpired {
		return Packet{}, fmt.Errorf("%w: %s: no answer from the leader on port %d within %v", ErrTimeout, what, f.cfg.Port, timeout)
	}
	return resp, err
}

// oneway sends a request that gets no response.
func (f *follower) oneway(encode func(b []byte) ([]byte, error), inline bool) error {
	f.mu.Lock()
	err := f.usable()
	f.mu.Unlock()
	if err != nil {
		return err
	}
	if err := f.w.send(inline, encode); err != nil {
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
	free := f.reader == nil && !f.bgReads
	f.mu.Unlock()
	if dead {
		return
	}
	if free {
		// The reading was left free by a call: read again, so that
		// the answer to a heartbeat is seen.
		f.wakeReader()
	}
	now := time.Now().UnixNano()
	last := f.lastRecv.Load()
	interval := f.cfg.HeartbeatInterval
	switch {
	case f.hbSent != 0 && last < f.hbSent:
		// With the reading left free, the answer may be waiting
		// unread: the reader now reads it, and the next tick checks.
		if !f.cfg.DisableHeartbeatCheck && !free {
			f.cfg.Logger.Warn("clusterclient: leader did not answer a heartbeat; leaving it",
				"channel", f.c.name, "port", f.cfg.Port, "silent", time.Duration(now-last))
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
