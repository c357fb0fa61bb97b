package clusterclient

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// maxChannelName bounds the length of a channel name in bytes.
const maxChannelName = 1024

// Client is one client of a channel. In the process that leads the
// channel it calls the real client directly; elsewhere it forwards every
// call to the leader over loopback. Across a failover it keeps its
// listeners and publications and restores them on the new leader. Its
// methods are safe for concurrent use.
type Client struct {
	name  string
	cfg   Config
	build BuildFunc
	done  chan struct{}  // closed by Close
	wg    sync.WaitGroup // the run loop and the delivery loop

	// subMu serializes changes of subscriptions with their replay on a
	// new leader, so that no key is subscribed twice or forgotten.
	subMu sync.Mutex

	mu        sync.Mutex
	lead      *leader                // guarded by mu: set while this client leads
	fol       *follower              // guarded by mu: set while it follows a registered leader
	readyErr  error                  // guarded by mu: why there is no route, if known
	ready     chan struct{}          // guarded by mu: closed at every change of the three above
	closed    bool                   // guarded by mu
	topics    map[string]*localTopic // guarded by mu: keys with local listeners
	dirty     []string               // guarded by mu: keys with values to deliver, oldest first
	published []json.RawMessage      // guarded by mu: registrations published, to publish again
	wake      chan struct{}          // wakes the delivery loop; capacity 1
}

// localTopic is a key with listeners in this client.
type localTopic struct {
	reg     json.RawMessage
	subs    []*Subscription
	latest  []byte // the last value received
	version uint64 // counts values received; 0 = none yet
	dirty   bool   // queued in Client.dirty
	timer   *time.Timer
}

// Subscription is one listener on one key. Listeners of a client run one
// at a time on the client's delivery goroutine. A listener sees the latest
// value of its key: values that arrive while it is still busy with an
// earlier one are merged into the newest, so a slow listener holds no
// queue.
type Subscription struct {
	c       *Client
	key     string
	fn      func(Value)
	seen    uint64 // the version last delivered; delivery loop only
	removed atomic.Bool
}

// New creates a client of the channel name on cfg.Port (nil cfg means
// DefaultConfig()). It competes for the port at once; build runs only if
// this client leads. A forced leader fails here when the port is taken.
// Call Ready to wait until the client can serve calls, and Close when
// done.
func New(name string, cfg *Config, build BuildFunc) (*Client, error) {
	if err := VerifyConfig(cfg); err != nil {
		return nil, err
	}
	if name == "" || len(name) > maxChannelName {
		return nil, fmt.Errorf("clusterclient: channel name must have 1 to %d bytes", maxChannelName)
	}
	if build == nil {
		return nil, errors.New("clusterclient: nil BuildFunc")
	}
	c := &Client{
		name:   name,
		cfg:    withDefaults(cfg),
		build:  build,
		done:   make(chan struct{}),
		ready:  make(chan struct{}),
		topics: make(map[string]*localTopic),
		wake:   make(chan struct{}, 1),
	}
	l, err := claim(c)
	if err != nil {
		return nil, err
	}
	c.wg.Add(2)
	go c.run(l)
	go c.deliverLoop()
	return c, nil
}

// Name returns the channel name.
func (c *Client) Name() string { return c.name }

// IsLeader reports whether this client holds the real client now.
func (c *Client) IsLeader() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lead != nil
}

// Ready waits until the client can serve calls: as leader once the real
// client is built, as follower once the leader accepted it. It returns
// the build error (a *RemoteError on followers), an error wrapping
// ErrNoLeader after Config.MaxWaitTime, ErrClosed, or ctx's error.
func (c *Client) Ready(ctx context.Context) error {
	_, _, err := c.route(ctx)
	return err
}

// route waits for the leader or follower that serves calls now.
func (c *Client) route(ctx context.Context) (*leader, *follower, error) {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, nil, ErrClosed
		}
		l, f, err, ready := c.lead, c.fol, c.readyErr, c.ready
		c.mu.Unlock()
		if l != nil || f != nil {
			return l, f, nil
		}
		if err != nil {
			return nil, nil, err
		}
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-c.done:
			return nil, nil, ErrClosed
		}
	}
}

// signal wakes every call waiting in route. Called with mu held.
func (c *Client) signal() {
	close(c.ready)
	c.ready = make(chan struct{})
}

// setError records why no route can be had now.
func (c *Client) setError(err error) {
	c.mu.Lock()
	if c.lead == nil && c.fol == nil {
		c.readyErr = err
		c.signal()
	}
	c.mu.Unlock()
}

// unroute stops routing calls to f; they wait for the next route.
func (c *Client) unroute(f *follower) {
	c.mu.Lock()
	if c.fol == f {
		c.fol = nil
		c.readyErr = nil
		c.signal()
	}
	c.mu.Unlock()
}

// setRoute replays subscriptions and publications on a new route, then
// lets calls through. It returns false if the client closed meanwhile.
func (c *Client) setRoute(l *leader, f *follower) bool {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return false
	}
	type keyReg struct {
		key string
		reg json.RawMessage
	}
	keys := make([]keyReg, 0, len(c.topics))
	for key, t := range c.topics {
		keys = append(keys, keyReg{key, t.reg})
	}
	published := slices.Clone(c.published)
	c.mu.Unlock()

	for _, k := range keys {
		if l != nil {
			if latest := l.subscribeLocal(k.key, k.reg); latest != nil {
				c.deliver(k.key, latest)
			}
		} else {
			f.oneway(c.subscribePacket(k.key, k.reg, false))
		}
	}
	for _, reg := range published {
		if l != nil {
			ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ResponseTimeout)
			if err := l.publishLocal(ctx, reg); err != nil {
				c.cfg.Logger.Warn("clusterclient: publishing again on the new leader", "channel", c.name, "err", err)
			}
			cancel()
		} else if arg, err := c.cfg.Codec.Marshal(reg); err == nil {
			f.oneway(func(b []byte) ([]byte, error) {
				return c.appendInvoke(b, nextID(), c.timeoutMS(), publishMethod, true, [][]byte{arg})
			})
		}
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.lead, c.fol, c.readyErr = l, f, nil
	c.signal()
	return true
}

// run elects and re-elects until the client closes.
func (c *Client) run(l *leader) {
	defer c.wg.Done()
	deadline := time.Now().Add(c.cfg.MaxWaitTime)
	var backoff time.Duration
	failures := 0 // failed attempts since the last connection
	// ctx ends when the client closes.
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-c.done
		cancel()
	}()
	for {
		if l == nil {
			var err error
			if l, err = claim(c); err != nil {
				c.setError(err)
				<-c.done
				return
			}
		}
		if l != nil {
			c.runLeader(l)
			return
		}
		f, err := dialLeader(ctx, c.name, &c.cfg, c.deliver)
		if err == nil {
			if !c.setRoute(nil, f) || !c.follow(f) {
				f.close()
				return
			}
			deadline = time.Now().Add(c.cfg.MaxWaitTime)
			backoff, failures = 0, 0
			continue
		}
		failures++
		switch {
		case !retryable(err):
			// The leader refused: its real client failed to build.
			c.setError(err)
			backoff = time.Second
		case time.Now().After(deadline):
			c.setError(fmt.Errorf("%w on port %d after %v: %w", ErrNoLeader, c.cfg.Port, c.cfg.MaxWaitTime, err))
			backoff = 100 * time.Millisecond
		case errors.Is(err, ErrTimeout):
			// A leader that does not answer: waiting calls fail now,
			// and the attempt already took a response timeout.
			c.setError(err)
			backoff = 0
		case failures == 1:
			// The first retry goes at once: a killed leader's listener
			// may outlive its connections by a moment, so the first
			// attempt after a loss can meet it, and the next finds the
			// port free.
			backoff = 0
		default:
			backoff = min(max(2*backoff, time.Millisecond), 100*time.Millisecond)
		}
		if backoff == 0 {
			select {
			case <-c.done:
				return
			default:
			}
			continue
		}
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-c.done:
			t.Stop()
			return
		}
	}
}

// follow waits until f's connection has ended; calls leave f as soon as
// its leader announces its close. It reports false if the client closed.
func (c *Client) follow(f *follower) bool {
	select {
	case <-f.closing:
		c.unroute(f)
	case <-f.dead:
	case <-c.done:
		return false
	}
	select {
	case <-f.dead:
		c.unroute(f)
		return true
	case <-c.done:
		return false
	}
}

// runLeader serves as leader until the client closes.
func (c *Client) runLeader(l *leader) {
	select {
	case <-l.ready:
	case <-c.done:
		l.close()
		return
	}
	if l.err != nil {
		c.setError(toRemote(l.err))
	} else if !c.setRoute(l, nil) {
		l.close()
		return
	}
	<-c.done
	l.close()
}

// Close closes the client. A leader stops taking calls, lets those in
// flight finish and its followers move to a new leader (bounded by
// Config.DrainTimeout), then releases the port and closes the real client
// if it is an io.Closer. Close waits for the client's goroutines to end.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.lead, c.fol = nil, nil
	for _, t := range c.topics {
		if t.timer != nil {
			t.timer.Stop()
		}
	}
	close(c.done)
	c.mu.Unlock()
	c.wg.Wait()
	return nil
}

// timeoutMS is the timeout carried by packets that wait for nothing.
func (c *Client) timeoutMS() int32 { return int32(c.cfg.ResponseTimeout / time.Millisecond) }

// appendInvoke appends an invoke packet, refusing one that the leader
// would refuse for its size.
func (c *Client) appendInvoke(b []byte, id uint64, ms int32, method string, oneway bool, args [][]byte) ([]byte, error) {
	n := len(b)
	b, err := appendInvoke(b, id, ms, method, oneway, args)
	if err == nil && len(b)-n-HeaderSize > c.cfg.MaxPacketSize {
		err = fmt.Errorf("%w: invoke %s has %d bytes, Config.MaxPacketSize is %d", ErrPacketTooLarge, method, len(b)-n-HeaderSize, c.cfg.MaxPacketSize)
	}
	if err != nil {
		return b[:n], err
	}
	return b, nil
}

func (c *Client) encodeArgs(raw [][]byte, args []any) ([][]byte, error) {
	for i, a := range args {
		b, err := c.cfg.Codec.Marshal(a)
		if err != nil {
			return nil, fmt.Errorf("clusterclient: encode argument %d: %w", i, err)
		}
		raw = append(raw, b)
	}
	return raw, nil
}

// Invoke calls method on the real client with args, encoded with the
// Codec, and returns its result. It waits for a leader first. The call is
// bounded by ctx and Config.ResponseTimeout; errors of the real client
// come back as *RemoteError.
func (c *Client) Invoke(ctx context.Context, method string, args ...any) (Value, error) {
	// The encoded arguments of a call to the leader stay on the stack;
	// the local real client gets a copy it may keep.
	var few [2][]byte
	raw, err := c.encodeArgs(few[:0], args)
	if err != nil {
		return Value{}, err
	}
	for {
		l, f, err := c.route(ctx)
		if err != nil {
			return Value{}, err
		}
		if l != nil {
			return l.invokeLocal(ctx, method, slices.Clone(raw), false)
		}
		p, err := f.request(ctx, method, func(b []byte, id uint64, ms int32) ([]byte, error) {
			return c.appendInvoke(b, id, ms, method, false, raw)
		})
		if c.retry(f, err) {
			continue
		}
		if err != nil {
			return Value{}, err
		}
		return c.result(&p)
	}
}

// retry reports whether f refused a call without sending it, because its
// leader is closing or the connection has ended. The call then waits for
// the next route, and f gets no more calls.
func (c *Client) retry(f *follower, err error) bool {
	if errors.Is(err, errDraining) || errors.Is(err, errGone) {
		c.unroute(f)
		return true
	}
	return false
}

// result reads an invoke_result.
func (c *Client) result(p *Packet) (Value, error) {
	conn, typ, err := parseConn(p.Conn)
	if err != nil {
		return Value{}, err
	}
	res, ok := conn.(invokeResult)
	if !ok {
		return Value{}, fmt.Errorf("%w: answer to invoke has type %q", ErrBadConn, typ)
	}
	if res.Success {
		return Value{data: p.App, codec: c.cfg.Codec}, nil
	}
	var e invokeErrorObject
	if err := c.cfg.Codec.Unmarshal(p.App, &e); err != nil {
		return Value{}, fmt.Errorf("clusterclient: decode remote error: %w", err)
	}
	return Value{}, &RemoteError{Name: e.Name, Message: e.Message, Code: codeText(e.Code), Stack: e.Stack}
}

// Invoke calls method like Client.Invoke and decodes the result into a T.
func Invoke[T any](ctx context.Context, c *Client, method string, args ...any) (T, error) {
	var out T
	v, err := c.Invoke(ctx, method, args...)
	if err != nil {
		return out, err
	}
	return out, v.Decode(&out)
}

// InvokeOneway calls method with args and does not wait for its result;
// it returns once the call is handed to the leader (or, on the leader,
// started). Errors of the real client are logged by the leader.
func (c *Client) InvokeOneway(ctx context.Context, method string, args ...any) error {
	raw, err := c.encodeArgs(nil, args)
	if err != nil {
		return err
	}
	for {
		l, f, err := c.route(ctx)
		if err != nil {
			return err
		}
		if l != nil {
			_, err := l.invokeLocal(ctx, method, raw, true)
			return err
		}
		err = f.oneway(func(b []byte) ([]byte, error) {
			return c.appendInvoke(b, nextID(), c.timeoutMS(), method, true, raw)
		})
		if !c.retry(f, err) {
			return err
		}
	}
}

// Publish publishes a registration through the real client: a oneway
// invoke of "publish" on followers, Publisher.Publish on the leader. The
// client remembers it and publishes it again on every new leader. It does
// not wait for a leader: made before one is ready, the registration is
// published when it is. ctx bounds the real client's Publish on the
// leader. The record of registrations grows with each distinct one.
func (c *Client) Publish(ctx context.Context, reg any) error {
	raw, err := marshalReg(reg)
	if err != nil {
		return err
	}
	arg, err := c.cfg.Codec.Marshal(raw)
	if err != nil {
		return err
	}
	// Under subMu, so that a registration is either recorded before a new
	// route replays the record, or sent on that route: never both.
	c.subMu.Lock()
	defer c.subMu.Unlock()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrClosed
	}
	if !slices.ContainsFunc(c.published, func(r json.RawMessage) bool { return bytes.Equal(r, raw) }) {
		c.published = append(c.published, raw)
	}
	l, f := c.lead, c.fol
	c.mu.Unlock()
	switch {
	case l != nil:
		return l.publishLocal(ctx, raw)
	case f != nil:
		err = f.oneway(func(b []byte) ([]byte, error) {
			return c.appendInvoke(b, nextID(), c.timeoutMS(), publishMethod, true, [][]byte{arg})
		})
		if c.retry(f, err) {
			return nil // the next leader gets it with the rest of the record
		}
		return err
	}
	return nil // no leader yet: it gets the record when it is ready
}

func (c *Client) subscribePacket(key string, reg json.RawMessage, unsub bool) func(b []byte) ([]byte, error) {
	return func(b []byte) ([]byte, error) {
		var conn connObject = subscribe{Key: key, Reg: reg}
		if unsub {
			conn = unSubscribe{Key: key, Reg: reg}
		}
		return appendPacket(b, false, nextID(), c.timeoutMS(), conn, nil)
	}
}

// Subscribe adds a listener for the values of reg, a registration that is
// encoded as JSON. The leader subscribes its real client once per key,
// whatever the number of listeners in all processes; a listener that
// joins a key that already has a value gets that value at once. Listeners
// survive failover. Subscribe does not wait for a leader.
func (c *Client) Subscribe(reg any, listener func(Value)) (*Subscription, error) {
	if listener == nil {
		return nil, errors.New("clusterclient: nil listener")
	}
	raw, err := marshalReg(reg)
	if err != nil {
		return nil, err
	}
	key := subscriptionKey(raw)
	s := &Subscription{c: c, key: key, fn: listener}
	c.subMu.Lock()
	defer c.subMu.Unlock()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	t := c.topics[key]
	first := t == nil
	if first {
		t = &localTopic{reg: raw}
		c.topics[key] = t
		if d := c.cfg.SubscribeTimeout; d > 0 {
			t.timer = time.AfterFunc(d, func() { c.subscribeTimedOut(key, t, d) })
		}
	}
	t.subs = append(t.subs, s)
	if t.version > 0 {
		c.markDirty(key, t)
	}
	l, f := c.lead, c.fol
	c.mu.Unlock()
	if first {
		if l != nil {
			if latest := l.subscribeLocal(key, raw); latest != nil {
				c.deliver(key, latest)
			}
		} else if f != nil {
			f.oneway(c.subscribePacket(key, raw, false))
		}
	}
	return s, nil
}

func (c *Client) subscribeTimedOut(key string, t *localTopic, d time.Duration) {
	c.mu.Lock()
	late := c.topics[key] == t && t.version == 0
	c.mu.Unlock()
	if late {
		c.cfg.Logger.Warn("clusterclient: no value for a subscription within Config.SubscribeTimeout",
			"channel", c.name, "key", key, "timeout", d)
	}
}

// Unsubscribe removes this listener. When it was the key's last listener
// in this client, the leader is told.
func (s *Subscription) Unsubscribe() {
	s.c.unsubscribe(s.key, s)
}

// Unsubscribe removes every listener of reg in this client and tells the
// leader.
func (c *Client) Unsubscribe(reg any) error {
	raw, err := marshalReg(reg)
	if err != nil {
		return err
	}
	c.unsubscribe(subscriptionKey(raw), nil)
	return nil
}

// unsubscribe removes s, or every listener of key when s is nil.
func (c *Client) unsubscribe(key string, s *Subscription) {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	c.mu.Lock()
	t := c.topics[key]
	if t == nil {
		c.mu.Unlock()
		return
	}
	t.subs = slices.DeleteFunc(t.subs, func(x *Subscription) bool {
		if s == nil || x == s {
			x.removed.Store(true)
			return true
		}
		return false
	})
	last := len(t.subs) == 0
	if last {
		delete(c.topics, key)
		if t.timer != nil {
			t.timer.Stop()
		}
	}
	l, f := c.lead, c.fol
	c.mu.Unlock()
	if !last {
		return
	}
	if l != nil {
		l.unsubscribeLocal(key)
	} else if f != nil {
		f.oneway(c.subscribePacket(key, t.reg, true))
	}
}

// deliver records a value of key and queues it for the listeners.
func (c *Client) deliver(key string, data []byte) {
	c.mu.Lock()
	t := c.topics[key]
	if t == nil || c.closed {
		c.mu.Unlock()
		return
	}
	t.latest = data
	t.version++
	c.markDirty(key, t)
	c.mu.Unlock()
}

// markDirty queues key for the delivery loop. Called with mu held.
func (c *Client) markDirty(key string, t *localTopic) {
	if !t.dirty {
		t.dirty = true
		c.dirty = append(c.dirty, key)
	}
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// deliverLoop hands values to listeners, one at a time, each listener
// getting a version of its key at most once.
func (c *Client) deliverLoop() {
	defer c.wg.Done()
	for {
		select {
		case <-c.wake:
		case <-c.done:
			return
		}
		for {
			c.mu.Lock()
			if len(c.dirty) == 0 || c.closed {
				c.dirty = nil
				c.mu.Unlock()
				break
			}
			key := c.dirty[0]
			c.dirty = c.dirty[1:]
			t := c.topics[key]
			if t == nil {
				c.mu.Unlock()
				continue
			}
			t.dirty = false
			data, version := t.latest, t.version
			subs := slices.Clone(t.subs)
			c.mu.Unlock()
			v := Value{data: data, codec: c.cfg.Codec}
			for _, s := range subs {
				if s.seen < version && !s.removed.Load() {
					s.seen = version
					s.fn(v)
				}
			}
		}
	}
}
