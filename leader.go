package clusterclient

import (
	"cmp"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// publishMethod is the method that a publish invokes, as the reference's
// default delegate names it.
const publishMethod = "publish"

// maxConnInvokes bounds the invokes that one follower connection has
// running on the leader; Config.MaxQueuedBytes bounds what they hold.
// Past either bound the leader reads nothing more from that connection
// until one ends, so a peer cannot make it hold unbounded goroutines or
// memory: its socket pushes back.
const maxConnInvokes = 1024

// argCost is what the leader holds per argument of a running invoke on
// top of the app object's bytes, at its peak while call builds the
// []Value: a []byte in runInvoke's [][]byte (24 bytes) and a Value (40: a
// []byte and a Codec). Measured with runtime.ReadMemStats after a
// collection inside the real client's Invoke, when the [][]byte is gone,
// 200,000 one-byte arguments held 40.1 bytes each beyond their frames
// (TestInvokeArgCost).
const argCost = 64

// codeTooLarge is the error code of an invoke refused because it would
// hold more than Config.MaxQueuedBytes once its arguments are decoded.
const codeTooLarge = "ERR_CLUSTER_TOO_LARGE"

// codePanic is the error code of a call whose user code panicked.
const codePanic = "ERR_CLUSTER_PANIC"

// codeBadArgument is the error code of an invoke refused because an
// argument is not valid JSON, under JSONCodec.
const codeBadArgument = "ERR_CLUSTER_BAD_ARGUMENT"

// codeChannelNotHosted is the error code of a register refused because
// the leader does not host the channel, or is closing: a follower keeps
// trying.
const codeChannelNotHosted = "ERR_CLUSTER_CHANNEL_NOT_HOSTED"

// leader holds the real client of one channel in the process that won the
// port. It serves the follower connections of that channel, each with one
// goroutine that reads it and one goroutine per invoke, and the calls of
// its own Client, which go straight to the real client.
//
// Lock order: realMu, then mu, then a connection's gate.
type leader struct {
	name    string
	cfg     *Config
	deliver func(key string, data []byte, err error) // hands a pushed value, or a refusal, to the own Client
	host    *portHost                                // nil in single mode; set by hostChannel

	ready chan struct{} // closed once build has returned
	real  RealClient    // set before ready is closed
	err   error         // build's error, set before ready is closed

	ctx    context.Context // set by start; ends when the leader has closed
	cancel context.CancelFunc
	wg     sync.WaitGroup // the connections' readers, from admit until they end
	calls  sync.WaitGroup // the calls running, remote and local, from enter until answered

	// realMu is held from the decision to subscribe or release a key
	// until the real client's Subscribe or Unsubscribe has returned, so
	// that those calls reach it in the order decided: a key subscribed
	// again while its release is under way ends up subscribed.
	realMu sync.Mutex

	mu     sync.Mutex
	conns  map[*serverConn]struct{} // guarded by mu
	topics map[string]*topic        // guarded by mu
	// guarded by mu: close has begun, so no connection is admitted; the
	// followers have left or the wait ran out, so no call starts (close
	// sets stopped under realMu too, so either lock reads it)
	closing, stopped bool
}

// topic is one subscription key on the leader, to which the real client
// is subscribed. Its fields are guarded by the leader's mu.
type topic struct {
	key    string
	reg    json.RawMessage
	latest []byte                   // the last value pushed, nil before the first
	subs   map[*serverConn]struct{} // the listeners: followers, and nil for the own Client
}

// serverConn is one follower connection on the leader.
type serverConn struct {
	l       *leader
	nc      net.Conn
	w       *sender
	ctx     context.Context // ends when the connection closes or the leader's ctx ends (which closes it); its invokes' contexts derive from it
	cancel  context.CancelFunc
	oddType sync.Once // logs the first request of unknown type
	once    sync.Once
	bytes   atomic.Int64 // held for the connection: the packet being read, queued writes, running invokes' app objects

	gate  sync.Mutex
	ended sync.Cond // on gate: signalled when an invoke ends, broadcast when the connection closes
	// guarded by gate: invokes running, and the bytes they hold (argCost);
	// keys, guarded by the leader's mu: the keys it listens to
	running, held, keys int
}

func newLeader(name string, cfg *Config, deliver func(key string, data []byte, err error)) *leader {
	return &leader{name: name, cfg: cfg, deliver: deliver, ready: make(chan struct{}), conns: make(map[*serverConn]struct{}), topics: make(map[string]*topic)}
}

// safely runs f, which calls user code (the build, the real client, the
// codec), and turns a panic in it into an error: the stack goes to the
// log, and the leader serves on.
func (l *leader) safely(what string, f func() error) (err error) {
	defer func() {
		if v := recover(); v != nil {
			l.host.log(l.cfg.Logger.Error, "clusterclient: "+what+" panicked", "channel", l.name, "panic", v, "stack", string(debug.Stack()))
			err = &RemoteError{Name: "Error", Code: codePanic, Message: fmt.Sprintf("%s panicked: %v", what, v)}
		}
	}()
	return f()
}

func (l *leader) marshal(v any) (data []byte, err error) {
	err = l.safely("Codec.Marshal", func() (err error) { data, err = l.cfg.Codec.Marshal(v); return err })
	return data, err
}

// call hands a call to the real client: a oneway publish with one
// argument to Publish if it has one, anything else to Invoke. When the
// codec is JSONCodec it first refuses arguments that are not valid JSON:
// the caller gets a clear error and the connection stays, since the
// packet itself was well framed. Another codec decodes its own arguments
// and reports its own errors.
func (l *leader) call(ctx context.Context, c invoke, raw [][]byte) (result any, err error) {
	_, plain := l.cfg.Codec.(JSONCodec)
	_, ptr := l.cfg.Codec.(*JSONCodec)
	args := make([]Value, len(raw))
	for i, a := range raw {
		if (plain || ptr) && !json.Valid(a) {
			return nil, &RemoteError{Name: "SyntaxError", Code: codeBadArgument, Message: fmt.Sprintf("argument %d of %.64q is not valid JSON", i, c.Method)}
		}
		args[i] = Value{data: a, codec: l.cfg.Codec}
	}
	p, ok := l.real.(Publisher)
	if !ok || c.Method != publishMethod || !c.Oneway || len(args) != 1 {
		err = l.safely("RealClient.Invoke", func() (err error) { result, err = l.real.Invoke(ctx, c.Method, args); return err })
		return result, err
	}
	return nil, l.safely("Publisher.Publish", func() error {
		var reg json.RawMessage
		if err := args[0].Decode(&reg); err != nil {
			return fmt.Errorf("clusterclient: publish registration: %w", err)
		}
		return p.Publish(ctx, reg)
	})
}

// warn logs a warning about the channel, rate-limited with the port's
// other lines: most warnings are a peer's doing.
func (l *leader) warn(msg string, args ...any) {
	l.host.log(l.cfg.Logger.Warn, "clusterclient: "+msg, append([]any{"channel", l.name}, args...)...)
}

// start builds the real client in the background.
func (l *leader) start(build BuildFunc) {
	l.ctx, l.cancel = context.WithCancel(context.Background())
	go func() {
		defer close(l.ready)
		l.err = l.safely("BuildFunc", func() (err error) { l.real, err = build(l.ctx); return err })
		if l.err == nil && l.real == nil {
			l.err = errors.New("clusterclient: BuildFunc returned a nil RealClient")
		}
	}()
}

// serve runs one follower connection, from its register_channel packet
// reg until it closes, or refuses it. r, which read reg, reads the rest:
// its buffer of readBufferSize bytes serves the connection for its whole
// life. Unless the heartbeat check is off, a connection that sends no
// whole packet for three heartbeat intervals fails.
func (l *leader) serve(nc net.Conn, r *Reader, reg *Packet) {
	<-l.ready // a leader closed while building waits for the build too
	sc, re := l.admit(nc)
	if re != nil {
		refuse(l.host, nc, reg, l.marshal, re)
		return
	}
	defer l.wg.Done()
	r.max, r.charge = l.cfg.MaxPacketSize, sc.charge // registerMaxPacket bounded reg
	nc.SetReadDeadline(time.Time{})                  // RegisterTimeout's, until the heartbeat check's
	err := l.handle(sc, reg)
	for err == nil {
		if !l.cfg.DisableHeartbeatCheck {
			nc.SetReadDeadline(time.Now().Add(3 * l.cfg.HeartbeatInterval))
		}
		p := new(Packet) // an invoke's goroutine keeps the last one
		if err = r.ReadPacket(p); errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("no packet for %v, three heartbeat intervals: %w", 3*l.cfg.HeartbeatInterval, err)
		} else if err == nil {
			err = l.handle(sc, p)
		}
	}
	sc.close(err)
	// Forget the connection and its subscriptions. Its reader has ended,
	// so it subscribes to nothing new meanwhile.
	l.mu.Lock()
	delete(l.conns, sc)
	keys := slices.Collect(maps.Keys(l.topics))
	l.mu.Unlock()
	l.unsubscribe(sc, keys...)
}

// admit adds nc to the leader's connections, or returns why it refuses
// it: the build's error, or the leader closing (nc must then not miss
// the leader_closing notice).
func (l *leader) admit(nc net.Conn) (*serverConn, *RemoteError) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return nil, toRemote(l.err)
	} else if l.closing {
		return nil, &RemoteError{Name: "ClusterChannelNotFoundError", Code: codeChannelNotHosted, Message: "the leader is closing"}
	}
	sc := &serverConn{l: l, nc: nc}
	sc.ctx, sc.cancel = context.WithCancel(l.ctx)
	sc.ended.L = &sc.gate
	context.AfterFunc(sc.ctx, func() { sc.close(ErrClosed); sc.gate.Lock(); sc.ended.Broadcast(); sc.gate.Unlock() })
	sc.w = newSender(sc.nc, l.cfg.MaxQueuedBytes, l.cfg.ResponseTimeout, sc.close, sc.charge)
	l.conns[sc] = struct{}{}
	l.wg.Add(1)
	return sc, nil
}

// secretsEqual compares in constant time, whatever the lengths.
func secretsEqual(want, got string) bool {
	a, b := sha256.Sum256([]byte(want)), sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1
}

// close closes the connection once, which cancels its invokes. It logs
// why, unless the follower left (closed or reset its end) or the leader
// is closing: a warning is for what someone must act on.
func (sc *serverConn) close(err error) {
	sc.once.Do(func() {
		sc.cancel()
		sc.w.fail(net.ErrClosed)
		sc.nc.Close()
		// The follower left, or the leader is closing (errors.Is(nil, nil) is true):
		if !slices.ContainsFunc([]error{nil, io.EOF, net.ErrClosed, ErrClosed, syscall.ECONNRESET}, func(e error) bool { return errors.Is(err, e) }) {
			sc.l.warn("closing follower connection", "remote", sc.nc.RemoteAddr(), "err", err)
		}
	})
}

// charge counts n bytes more (or fewer) held for the connection, in its
// own count and in its port's. Past Config.MaxTotalBytes, the port's
// connection that holds the most is closed, on a goroutine of its own:
// charge runs under locks that closing takes.
func (sc *serverConn) charge(n int) {
	sc.bytes.Add(int64(n))
	if h := sc.l.host; h.held.Add(int64(n)) > int64(h.cfg.MaxTotalBytes) && n > 0 && h.dropping.CompareAndSwap(false, true) {
		go h.dropLargest()
	}
}

// reply answers the request p. The calling goroutine writes it, unless
// another one is writing already.
func (sc *serverConn) reply(p *Packet, c connObject, data []byte) {
	sc.w.send(true, func(b []byte) ([]byte, error) { return appendPacket(b, true, p.ID, p.Timeout, c, data) })
}

// notify sends a request that the follower need not answer: a
// subscribe_result or leader_closing. The caller never waits on the
// socket.
func (sc *serverConn) notify(c connObject, data []byte) {
	id, timeout := nextID(), int32(sc.l.cfg.ResponseTimeout/time.Millisecond)
	sc.w.send(false, func(b []byte) ([]byte, error) { return appendPacket(b, false, id, timeout, c, data) })
}

// handle acts on one packet from a follower, on the connection's reader.
// An error closes the connection.
func (l *leader) handle(sc *serverConn, p *Packet) error {
	c, typ, err := parseConn(p.Conn)
	if err != nil || p.Response {
		return err // responses acknowledge pushes and notices
	}
	switch c := c.(type) {
	case invoke:
		return l.invoke(sc, p, c)
	case heartbeat:
		sc.reply(p, heartbeatRes{}, nil)
	case subscribe:
		l.subscribe(sc, subscriptionKey(c.Reg), c.Reg)
	case unSubscribe:
		l.unsubscribe(sc, subscriptionKey(c.Reg))
	case registerChannel: // the first, or again: answer again
		ok, _ := l.marshal(registerResult{Success: true})
		sc.reply(p, registerChannelRes{}, ok)
	default:
		sc.oddType.Do(func() { // once per connection: a peer cannot flood the log
			l.warn("ignoring requests of unknown type on this connection", "remote", sc.nc.RemoteAddr(), "type", clip(typ))
		})
	}
	return nil
}

// invoke starts an invoke from a follower on a goroutine of its own, once
// the connection's bounds let it: at most maxConnInvokes running, what
// they hold (app objects, plus argCost per argument) within
// Config.MaxQueuedBytes. Until then the reader waits, so the peer's
// socket pushes back. An invoke that alone would hold more is refused
// with a clear error before its arguments are decoded, and the
// connection stays. A Node.js follower does not heed leader_closing and
// may call after the drain: it is told so, as the reference would by
// closing the connection.
func (l *leader) invoke(sc *serverConn, p *Packet, c invoke) error {
	if err := validArgs(p.App, c.ArgLength); err != nil {
		return err
	}
	cost := len(p.App) + c.ArgLength*argCost
	if err := l.enter(c, cost); err != nil {
		if !c.Oneway {
			l.answer(sc, p, nil, err)
		}
		return nil
	}
	sc.gate.Lock()
	defer sc.gate.Unlock()
	for sc.ctx.Err() == nil && (sc.running >= maxConnInvokes || sc.held+cost > l.cfg.MaxQueuedBytes) {
		sc.ended.Wait()
	}
	if sc.ctx.Err() != nil {
		l.calls.Done()
		return net.ErrClosed
	}
	sc.running, sc.held = sc.running+1, sc.held+cost
	sc.charge(cost)
	go l.runInvoke(sc, p, c, cost)
	return nil
}

// enter counts the call c in calls, unless the leader has stopped taking
// calls or c alone would hold cost bytes, more than MaxQueuedBytes (the
// own Client's calls cost 0): then it returns the error that a follower
// gets.
func (l *leader) enter(c invoke, cost int) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return &RemoteError{Name: "ClusterLeaderClosingError", Code: "ERR_CLUSTER_LEADER_CLOSING", Message: "leader closing"}
	} else if cost > l.cfg.MaxQueuedBytes {
		return &RemoteError{Name: "ClusterTooLargeError", Code: codeTooLarge, Message: fmt.Sprintf("invoke of %.64q would hold "+
			"%d bytes with its %d arguments decoded, over the leader's Config.MaxQueuedBytes %d", c.Method, cost, c.ArgLength, l.cfg.MaxQueuedBytes)}
	}
	l.calls.Add(1)
	return nil
}

// runInvoke runs one invoke from a follower and answers it, unless it is
// oneway or the timeout its packet asked for passed (the follower gave
// up; the reference also stays silent then). The packet's timeout is the
// method's deadline, bounded by the leader's Config.MaxInvokeTime; a
// request without one (the reference never sends that) gets the leader's
// ResponseTimeout, so no follower can hold the real client forever.
func (l *leader) runInvoke(sc *serverConn, p *Packet, c invoke, cost int) {
	defer l.calls.Done()
	asked := time.Duration(max(p.Timeout, 0)) * time.Millisecond
	limit := min(cmp.Or(asked, l.cfg.ResponseTimeout), l.cfg.MaxInvokeTime)
	args, rest := make([][]byte, c.ArgLength), p.App
	for i := range args {
		args[i], rest = nextArg(rest)
	}
	data, late, err := l.run(sc.ctx, limit, c, args)
	// Past its timeout the follower has given up: no answer, as the
	// reference. A method that returned its context's error did its job.
	if !c.Oneway && (!late || limit != asked) {
		l.answer(sc, p, data, err)
	} else if !c.Oneway && !errors.Is(err, context.DeadlineExceeded) {
		l.warn("invoke outlasted its timeout; no answer sent", "method", clip(c.Method), "timeout", limit, "err", err)
	}
	// The invoke counts until its answer is queued: a peer that does not
	// read its answers runs no more invokes.
	sc.gate.Lock()
	sc.running, sc.held = sc.running-1, sc.held-cost
	sc.gate.Unlock()
	sc.charge(-cost)
	sc.ended.Signal()
}

// answer sends the invoke_result of p: the result data, or err.
func (l *leader) answer(sc *serverConn, p *Packet, data []byte, err error) {
	if err == nil && len(data) > l.cfg.MaxPacketSize-256 {
		err = fmt.Errorf("clusterclient: result of %d bytes exceeds Config.MaxPacketSize %d", len(data), l.cfg.MaxPacketSize)
	}
	ok := err == nil
	if !ok {
		re := toRemote(err)
		if data, err = l.marshal(invokeErrorObject{Stack: re.Stack, Name: re.Name, Message: re.Message, Code: errorCode(re.Code)}); err != nil {
			data, _ = JSONCodec{}.Marshal(invokeErrorObject{Name: "Error", Message: err.Error()})
		}
	}
	sc.reply(p, invokeResult{Success: ok}, data)
}

// run runs one call, from a follower or the own Client, with the deadline
// limit from now. It returns the result encoded (none
// for a oneway call), logs the errors of oneway calls, and reports whether
// the deadline passed.
func (l *leader) run(ctx context.Context, limit time.Duration, c invoke, raw [][]byte) (data []byte, late bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	result, err := l.call(ctx, c, raw)
	if late = ctx.Err() == context.DeadlineExceeded; c.Oneway && err != nil {
		l.warn("oneway invoke failed", "method", clip(c.Method), "err", err)
	}
	if err == nil && !c.Oneway {
		data, err = l.marshal(result)
	}
	return data, late, err
}

// clip cuts a name that a peer sent (method, type, channel) to 64
// characters for a log line: a packet may carry megabytes of it.
func clip(s string) string { return fmt.Sprintf("%.64s", s) }

// routeInvoke runs a call of the own Client straight on the real client.
// A oneway call runs on a goroutine of its own; routeInvoke returns at
// once.
func (l *leader) routeInvoke(ctx context.Context, method string, args [][]byte, oneway bool) (Value, error) {
	c := invoke{Method: method, ArgLength: len(args), Oneway: oneway}
	if l.enter(c, 0) != nil {
		return Value{}, ErrClosed
	}
	if oneway {
		go func() { defer l.calls.Done(); l.run(l.ctx, l.cfg.ResponseTimeout, c, args) }()
		return Value{}, nil
	}
	defer l.calls.Done()
	data, late, err := l.run(ctx, l.cfg.ResponseTimeout, c, args)
	if late && errors.Is(err, context.DeadlineExceeded) {
		return Value{}, fmt.Errorf("%w: %s did not return within %v", ErrTimeout, method, l.cfg.ResponseTimeout)
	} else if err != nil {
		return Value{}, toRemote(err)
	}
	return Value{data: data, codec: l.cfg.Codec}, nil
}

// routeSubscribe adds the own Client as a listener of key.
func (l *leader) routeSubscribe(key string, reg json.RawMessage) { l.subscribe(nil, key, reg) }

// routeUnsubscribe removes the own Client from the listeners of key.
func (l *leader) routeUnsubscribe(key string, _ json.RawMessage) { l.unsubscribe(nil, key) }

// subscribe adds sc (nil: the own Client) to the listeners of key and
// subscribes the real client to it, once per key. When broadcasting, a
// listener new to the key gets its latest value, if any, at once. A key
// past Config.MaxKeysPerConn or MaxKeys, or one that the real client
// cannot subscribe, is refused: sc is told why, with subscribe_failed (a
// follower) or at once (the own Client, which logs it), and a key that
// join created is forgotten, so that a later subscribe tries again.
// realMu, held throughout, keeps every other listener out of that key
// meanwhile.
func (l *leader) subscribe(sc *serverConn, key string, reg json.RawMessage) {
	l.realMu.Lock()
	defer l.realMu.Unlock()
	t, err := l.join(sc, key, reg)
	if s, ok := l.real.(Subscriber); t != nil && ok {
		push := func(v any) { l.safely("the push callback", func() error { l.pushValue(t, v); return nil }) }
		err = l.safely("Subscriber.Subscribe", func() error { return s.Subscribe(reg, push) })
	} else if t != nil {
		err = &RemoteError{Name: "Error", Code: "ERR_CLUSTER_NO_SUBSCRIBE", Message: "the real client has no Subscribe method"}
	}
	if err == nil {
		return
	} else if t != nil {
		l.leave(sc, []string{key}, true) // join created it: forgotten
	}
	if re := toRemote(err); sc == nil {
		l.deliver(key, nil, re)
	} else {
		l.warn("subscription refused", "remote", sc.nc.RemoteAddr(), "reg", clip(string(reg)), "err", re)
		data, _ := l.marshal(invokeErrorObject{Stack: re.Stack, Name: re.Name, Message: re.Message, Code: errorCode(re.Code)})
		sc.notify(subscribeFailed{Key: key}, data)
	}
}

// join adds sc to the listeners of key within the bounds on keys, unless
// the real client is closing, and returns the key's topic if it is new:
// the real client must subscribe.
func (l *leader) join(sc *serverConn, key string, reg json.RawMessage) (created *topic, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	t := l.topics[key]
	if t == nil {
		t = &topic{key: key, reg: reg, subs: make(map[*serverConn]struct{})}
		created = t
	}
	_, dup := t.subs[sc]
	switch {
	case l.stopped, sc != nil && dup: // a follower that asks again gets nothing new
		return nil, nil
	case created != nil && len(l.topics) >= l.cfg.MaxKeys:
		return nil, &RemoteError{Name: "RangeError", Code: "ERR_CLUSTER_TOO_MANY_KEYS", Message: fmt.Sprintf("the leader holds Config.MaxKeys (%d) keys", l.cfg.MaxKeys)}
	case sc == nil:
	case sc.keys >= l.cfg.MaxKeysPerConn:
		return nil, &RemoteError{Name: "RangeError", Code: "ERR_CLUSTER_TOO_MANY_KEYS", Message: fmt.Sprintf("the connection listens to Config.MaxKeysPerConn (%d) keys", l.cfg.MaxKeysPerConn)}
	default:
		sc.keys++
	}
	if l.topics[key], t.subs[sc] = t, struct{}{}; !l.cfg.DisableBroadcast && t.latest != nil {
		l.push(sc, key, t.latest) // under mu: in order with pushValue's pushes
	}
	return created, nil
}

// pushValue keeps v as t's latest value and pushes it to t's listeners:
// all of them, or one picked at random when not broadcasting.
func (l *leader) pushValue(t *topic, v any) {
	data, err := l.marshal(v)
	if n := len(subscribeResult{Key: t.key}.appendJSON(nil)) + len(data); err == nil && n > l.cfg.MaxPacketSize {
		err = fmt.Errorf("%w: %d bytes with its key, Config.MaxPacketSize is %d", ErrPacketTooLarge, n, l.cfg.MaxPacketSize)
	}
	if err != nil { // a follower would refuse the packet and leave
		l.warn("value not pushed", "key", clip(t.key), "err", err)
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock() // pushes go out in the order of t.latest
	if l.topics[t.key] != t {
		return // released meanwhile
	}
	t.latest = data
	targets := slices.Collect(maps.Keys(t.subs))
	if l.cfg.DisableBroadcast && len(targets) > 0 {
		targets = targets[rand.IntN(len(targets)):][:1]
	}
	for _, sc := range targets {
		l.push(sc, t.key, data)
	}
}

// push sends a value of key to sc, or to the own Client's listeners if sc
// is nil.
func (l *leader) push(sc *serverConn, key string, data []byte) {
	if sc == nil {
		l.deliver(key, data, nil)
	} else {
		sc.notify(subscribeResult{Key: key}, data)
	}
}

// unsubscribe removes sc (nil: the own Client) from the listeners of
// keys; the last one anywhere to leave a key releases the real client's
// subscription, if it can unsubscribe.
func (l *leader) unsubscribe(sc *serverConn, keys ...string) {
	l.realMu.Lock()
	defer l.realMu.Unlock()
	u, ok := l.real.(Unsubscriber)
	for _, t := range l.leave(sc, keys, ok && !l.stopped) { // not once the real client is closing
		if err := l.safely("Unsubscriber.Unsubscribe", func() error { return u.Unsubscribe(t.reg) }); err != nil {
			l.warn("real client unsubscribe failed", "key", t.key, "err", err)
		}
	}
}

// leave removes sc (nil: the own Client) from the listeners of keys.
// With forget, it forgets the keys left without listeners, and returns
// their topics.
func (l *leader) leave(sc *serverConn, keys []string, forget bool) (gone []*topic) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, key := range keys {
		if t := l.topics[key]; t != nil {
			if _, in := t.subs[sc]; in && sc != nil {
				sc.keys--
			}
			delete(t.subs, sc)
			if forget && len(t.subs) == 0 {
				delete(l.topics, key)
				gone = append(gone, t)
			}
		}
	}
	return gone
}

// waitFor waits until wg is done or the deadline passes.
func waitFor(deadline time.Time, wg *sync.WaitGroup) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Until(deadline)):
	}
}

// close stops the leader on purpose: it frees the port (if no other
// channel of this process uses it) and tells every follower that it is
// closing. Within Config.DrainTimeout, it waits until the followers have
// left, then stops taking calls and waits until those in flight have
// ended. Then it closes the connections left, waits for the calls that
// outlasted the drain, and closes the real client. The Client calls it
// once, as its run loop ends.
func (l *leader) close() {
	if l.host != nil {
		l.host.unhost(l) // first: a follower told may elect at once
	}
	l.mu.Lock()
	l.closing = true // from here on no connection is admitted
	for sc := range l.conns {
		sc.notify(leaderClosing{}, nil) // never waits on the socket
	}
	l.mu.Unlock()
	deadline := time.Now().Add(l.cfg.DrainTimeout)
	waitFor(deadline, &l.wg)
	l.realMu.Lock() // a Subscribe or Unsubscribe under way ends first
	l.mu.Lock()
	l.stopped = true // from here on no call starts
	l.mu.Unlock()
	l.realMu.Unlock()
	waitFor(deadline, &l.calls)
	l.cancel() // closes the connections left: their contexts derive from l.ctx
	<-l.ready
	l.wg.Wait()
	l.calls.Wait()
	if c, ok := l.real.(io.Closer); ok {
		if err := l.safely("io.Closer.Close", c.Close); err != nil {
			l.warn("closing the real client", "err", err)
		}
	}
}
