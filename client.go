package clusterclient

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
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

	// subMu serializes changes of subscriptions and publications with
	// their replay on a new route, so that none is sent twice or
	// forgotten. Lock order: subMu, then mu.
	subMu sync.Mutex

	mu        sync.Mutex
	cur       route                  // guarded by mu: the route of calls now, lead or fol; nil if none
	readyErr  error                  // guarded by mu: why there is no route, if known
	ready     chan struct{}          // guarded by mu: closed at every change of the route or readyErr
	closed    bool                   // guarded by mu
	topics    map[string]*localTopic // guarded by mu, and changed with subMu held too: keys with local listeners
	published []json.RawMessage      // guarded by mu, and changed with subMu held too: registrations published, to publish again
	wake      chan struct{}          // wakes the delivery loop; capacity 1
}

// route is where a client's calls go: its own leader, or its follower
// connection to the leader of another process. routeInvoke returns
// errDraining or errGone for a call that it did not send, which then
// waits for the next route.
type route interface {
	routeInvoke(ctx context.Context, method string, args [][]byte, oneway bool) (Value, error)
	routeSubscribe(key string, reg json.RawMessage)
	routeUnsubscribe(key string, reg json.RawMessage)
}

// localTopic is a key with listeners in this client. Its fields are
// guarded by Client.mu.
type localTopic struct {
	reg     json.RawMessage
	subs    []*Subscription
	latest  []byte // the last value received
	version uint64 // counts values received; 0 = none yet
	err     error  // the leader's refusal of the key since it was last sent
}

// Subscription is one listener on one key. Listeners of a client run one
// at a time on the client's delivery goroutine. A listener sees the latest
// value of its key: values that arrive while it is still busy with an
// earlier one are merged into the newest, so a slow listener holds no
// queue.
type Subscription struct {
	c       *Client
	key     string
	t       *localTopic
	fn      func(Value)
	seen    uint64 // guarded by Client.mu: the version last handed to the listener
	next    Value  // delivery loop only: the value to hand it
	removed atomic.Bool
}

// New creates a client of the channel name on cfg.Port (nil cfg means
// DefaultConfig(); zero fields mean their defaults). It competes for the
// port at once; build runs only if this client leads. A forced leader
// fails here when the port is taken. Call Ready to wait until the client
// can serve calls, and Close when done.
func New(name string, cfg *Config, build BuildFunc) (*Client, error) {
	if err := VerifyConfig(cfg); err != nil {
		return nil, err
	} else if name == "" || len(name) > maxChannelName {
		return nil, fmt.Errorf("clusterclient: channel name must have 1 to %d bytes", maxChannelName)
	} else if build == nil {
		return nil, errors.New("clusterclient: nil BuildFunc")
	}
	c := &Client{name: name, cfg: *withDefaults(cfg), build: build, done: make(chan struct{}),
		ready: make(chan struct{}), topics: make(map[string]*localTopic), wake: make(chan struct{}, 1)}
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
	_, ok := c.cur.(*leader)
	return ok
}

// Ready waits until the client can serve calls: as leader once the real
// client is built, as follower once the leader accepted it. It returns
// nil, or:
//   - the build error, as a *RemoteError (on followers too);
//   - an error wrapping ErrTimeout when a process holds the port but does
//     not answer the registration within Config.ResponseTimeout, or one
//     that says what answers on the port does not speak the protocol:
//     another program holds it (choose another Config.Port);
//   - an error wrapping ErrNoLeader when no leader was found within
//     Config.MaxWaitTime;
//   - ErrClosed, or ctx's error.
//
// After an error the client keeps trying; a later Ready may succeed.
func (c *Client) Ready(ctx context.Context) error {
	_, err := c.route(ctx)
	return err
}

// route waits for the route of calls.
func (c *Client) route(ctx context.Context) (route, error) {
	for {
		c.mu.Lock()
		r, err, ready := c.cur, c.readyErr, c.ready
		c.mu.Unlock()
		if r != nil || err != nil { // never both: reroute sets one; Close sets ErrClosed
			return r, err
		}
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-c.done: // readyErr is ErrClosed by now
		}
	}
}

// reroute replaces the route of calls, if it is still from, with to, or
// with err, why there is none (nil err: calls wait for the next route),
// and wakes every call waiting in route. Once the client is closed it
// changes nothing and reports false.
func (c *Client) reroute(from, to route, err error) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == from && !c.closed {
		c.cur, c.readyErr = to, err
		close(c.ready)
		c.ready = make(chan struct{})
	}
	return !c.closed
}

// setRoute replays subscriptions and publications on a new route, then
// lets calls through. It returns false if the client closed meanwhile.
func (c *Client) setRoute(r route) bool {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	c.mu.Lock()
	for _, t := range c.topics {
		t.err = nil // a refusal holds until the key is sent again
	}
	c.mu.Unlock()
	for key, t := range c.topics { // subMu keeps the record as it is; a topic's reg never changes
		r.routeSubscribe(key, t.reg)
	}
	for _, reg := range c.published {
		if err := c.publishOn(context.Background(), r, reg); err != nil {
			c.cfg.Logger.Warn("clusterclient: publishing again on the new leader", "channel", c.name, "err", err)
		}
	}
	return c.reroute(nil, r, nil) // the route was nil: a route is set only here, and run unroutes it first
}

// run follows the leader of the channel, and the next, until it claims
// the port; then it leads until the client closes.
func (c *Client) run(l *leader) {
	defer c.wg.Done()
	ctx, cancel := context.WithCancel(context.Background()) // ends when the client closes
	go func() { <-c.done; cancel() }()
	// New claimed the port first; only a forced leader's claim fails, and it leads from New on.
	for failures, deadline := 0, time.Now().Add(c.cfg.MaxWaitTime); l == nil; l, _ = claim(c) {
		f, err := dialLeader(ctx, c.name, &c.cfg, c.deliver)
		if err == nil {
			if !c.setRoute(f) || !c.follow(f) {
				f.fail(ErrClosed) // the connection ends on purpose
				<-f.dead
				return
			}
			deadline, failures = time.Now().Add(c.cfg.MaxWaitTime), 0
			continue
		}
		failures++
		select {
		case <-time.After(c.retryAfter(err, failures, deadline)): // collected once the select is left
		case <-c.done:
			return
		}
	}
	defer l.close()
	select {
	case <-l.ready:
		if l.err != nil {
			c.reroute(nil, nil, toRemote(l.err))
		} else {
			c.setRoute(l) // false: the client closed, and c.done is closed
		}
		<-c.done
	case <-c.done:
	}
}

// retryAfter says how long to wait before the next attempt to follow,
// after failures failed ones; errors that waiting calls must see now are
// recorded.
func (c *Client) retryAfter(err error, failures int, deadline time.Time) time.Duration {
	var re *RemoteError
	wait := 100 * time.Millisecond
	switch {
	case errors.As(err, &re) && re.Code != codeChannelNotHosted:
		// The leader's real client failed to build: no retry succeeds
		// by itself soon.
		wait = time.Second
	case time.Now().After(deadline):
		err = fmt.Errorf("%w on port %d after %v: %w", ErrNoLeader, c.cfg.Port, c.cfg.MaxWaitTime, err)
	case errors.Is(err, ErrTimeout), errors.As(err, new(*errNotLeader)):
		// Something holds the port and is not, or not yet, a leader
		// that answers: waiting calls fail now.
	case failures == 1:
		// The first retry goes at once: a killed leader's listener may
		// outlive its connections by a moment.
		return 0
	default:
		return min(time.Millisecond<<min(failures-2, 7), 100*time.Millisecond)
	}
	c.reroute(nil, nil, err) // errors that waiting calls must see now
	return wait
}

// follow waits until f's connection has ended; calls leave f as soon as
// its leader announces its close. It reports false if the client closed.
func (c *Client) follow(f *follower) bool {
	for closing := f.closing; ; closing = nil {
		select {
		case <-closing:
		case <-f.dead:
			return c.reroute(f, nil, nil)
		case <-c.done:
			return false
		}
		c.reroute(f, nil, nil)
	}
}

// Close closes the client. A leader stops taking calls, lets those in
// flight finish and its followers move to a new leader (bounded by
// Config.DrainTimeout), then releases the port and closes the real client
// if it is an io.Closer. Close waits for the client's goroutines to end.
func (c *Client) Close() error {
	c.mu.Lock()
	first := !c.closed
	c.closed, c.cur, c.readyErr = true, nil, ErrClosed
	c.mu.Unlock()
	if first {
		close(c.done)
		c.wg.Wait()
	}
	return nil
}

// Invoke calls method on the real client with args, encoded with the
// Codec, and returns its result. It waits for a leader first. The call is
// bounded by ctx and Config.ResponseTimeout; errors of the real client
// come back as *RemoteError.
func (c *Client) Invoke(ctx context.Context, method string, args ...any) (Value, error) {
	return c.invoke(ctx, method, args, false)
}

// InvokeOneway calls method with args and does not wait for its result;
// it returns once the call is handed to the leader (or, on the leader,
// started). Errors of the real client are logged by the leader.
func (c *Client) InvokeOneway(ctx context.Context, method string, args ...any) error {
	_, err := c.invoke(ctx, method, args, true)
	return err
}

func (c *Client) invoke(ctx context.Context, method string, args []any, oneway bool) (_ Value, err error) {
	raw := make([][]byte, len(args))
	for i, a := range args {
		if raw[i], err = c.cfg.Codec.Marshal(a); err != nil {
			return Value{}, fmt.Errorf("clusterclient: encode argument %d: %w", i, err)
		}
	}
	// The call goes on the route of calls, waiting for one first, and on
	// the next route when its route was gone or closing before it sent anything.
	for {
		r, err := c.route(ctx)
		if err != nil {
			return Value{}, err
		}
		if v, err := r.routeInvoke(ctx, method, raw, oneway); !errors.Is(err, errDraining) && !errors.Is(err, errGone) {
			return v, err
		}
		c.reroute(r, nil, nil)
	}
}

// Invoke calls method like Client.Invoke and decodes the result into a T.
func Invoke[T any](ctx context.Context, c *Client, method string, args ...any) (out T, err error) {
	v, err := c.Invoke(ctx, method, args...)
	if err == nil {
		err = v.Decode(&out)
	}
	return out, err
}

// Publish hands a registration to the real client (Publisher.Publish, or
// Invoke of "publish"), as a oneway invoke in every role: it returns once
// the registration is handed to the leader, and an error only for what
// fails in this process (encoding, ErrClosed); the leader logs an error of
// the real client. The client remembers the registration and publishes it
// again on every new leader. Publish does not wait for a leader: made
// before one is ready, the registration is published when it is. The
// record grows with each distinct registration.
func (c *Client) Publish(ctx context.Context, reg any) error {
	raw, err := c.registration(reg)
	if err != nil {
		return err
	}
	c.subMu.Lock()
	defer c.subMu.Unlock()
	r, err := c.record(func() {
		if !slices.ContainsFunc(c.published, func(r json.RawMessage) bool { return string(r) == string(raw) }) {
			c.published = append(c.published, raw)
		}
	})
	if r == nil {
		return err // closed, or no leader yet: it gets the record when it is ready
	}
	if err = c.publishOn(ctx, r, raw); errors.Is(err, errDraining) || errors.Is(err, errGone) {
		c.reroute(r, nil, nil) // the next leader gets it with the rest of the record
		err = nil
	}
	return err
}

// registration encodes reg as every process must (see marshalReg) and
// refuses one whose subscribe packet the leader would refuse for its
// size: the connection would close, and every new one with it.
func (c *Client) registration(reg any) (json.RawMessage, error) {
	raw, err := marshalReg(reg)
	if n := len(subscribe{Key: subscriptionKey(raw), Reg: raw}.appendJSON(nil)); err == nil && n > c.cfg.MaxPacketSize {
		err = fmt.Errorf("%w: registration of %d bytes, Config.MaxPacketSize is %d", ErrPacketTooLarge, len(raw), c.cfg.MaxPacketSize)
	}
	return raw, err
}

// publishOn sends a registration on r as a oneway invoke of "publish".
func (c *Client) publishOn(ctx context.Context, r route, reg json.RawMessage) error {
	arg, err := c.cfg.Codec.Marshal(reg)
	if err == nil {
		_, err = r.routeInvoke(ctx, publishMethod, [][]byte{arg}, true)
	}
	return err
}

// Subscribe adds a listener for the values of reg, a registration that is
// encoded as JSON. The leader subscribes its real client once per key,
// whatever the number of listeners in all processes; a listener that
// joins a key that already has a value gets that value at once. Listeners
// survive failover. Subscribe does not wait for a leader.
//
// A Go leader that cannot serve reg (its real client has no Subscribe
// method, or Subscribe failed or panicked, or a bound such as
// Config.MaxKeysPerConn was reached) refuses it: this client logs a
// warning naming reg and why, and Err of its listeners returns the
// refusal. A later Subscribe of reg sends it again, as does every new
// leader. A Node.js leader sends no refusal: the listener never fires.
func (c *Client) Subscribe(reg any, listener func(Value)) (*Subscription, error) {
	raw, err := c.registration(reg)
	if listener == nil {
		return nil, errors.New("clusterclient: nil listener")
	} else if err != nil {
		return nil, err
	}
	s := &Subscription{c: c, key: subscriptionKey(raw), fn: listener}
	c.subMu.Lock()
	defer c.subMu.Unlock()
	var send bool
	r, err := c.record(func() {
		t := c.topics[s.key]
		if t == nil {
			t = &localTopic{reg: raw}
			if d := c.cfg.SubscribeTimeout; d > 0 {
				time.AfterFunc(d, func() { c.subscribeTimedOut(s.key, t, d) })
			}
		}
		send, t.err = len(t.subs) == 0 || t.err != nil, nil // the first listener, or a refused key
		c.topics[s.key], t.subs, s.t = t, append(t.subs, s), t
	})
	if err != nil {
		return nil, err
	}
	c.wakeDelivery() // a late listener gets the latest value at once
	if r != nil && send {
		r.routeSubscribe(s.key, raw) // a lost route replays it on the next
	}
	return s, nil
}

// record makes a change to the client's subscriptions or publications
// with mu held, unless the client is closed, and returns the route to
// send it on, nil if none. The caller holds subMu until it has sent it,
// so that a change is either recorded before a new route replays the
// record, or sent on that route: never both.
func (c *Client) record(change func()) (route, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	change()
	return c.cur, nil
}

func (c *Client) subscribeTimedOut(key string, t *localTopic, d time.Duration) {
	c.mu.Lock()
	if c.topics[key] == t && t.version == 0 && !c.closed {
		defer c.cfg.Logger.Warn("clusterclient: no value for a subscription within Config.SubscribeTimeout", "channel", c.name, "reg", string(t.reg), "timeout", d)
	}
	c.mu.Unlock() // before the deferred warning
}

// Err returns the leader's refusal of the subscription, a *RemoteError
// (see Client.Subscribe), or nil if the leader has not refused it since it
// was last sent: Err clears when the registration is sent again, by a
// later Subscribe of it or to a new leader.
func (s *Subscription) Err() error {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.t.err
}

// Unsubscribe removes this listener. When it was the key's last listener
// in this client, the leader is told.
func (s *Subscription) Unsubscribe() { s.c.unsubscribe(s.key, s) }

// Unsubscribe removes every listener of reg in this client and tells the
// leader.
func (c *Client) Unsubscribe(reg any) error {
	raw, err := c.registration(reg)
	if err == nil {
		c.unsubscribe(subscriptionKey(raw), nil)
	}
	return err
}

// unsubscribe removes s, or every listener of key when s is nil.
func (c *Client) unsubscribe(key string, s *Subscription) {
	c.subMu.Lock()
	defer c.subMu.Unlock()
	var last *localTopic
	r, _ := c.record(func() {
		if t := c.topics[key]; t != nil {
			for _, x := range t.subs {
				x.removed.Store(s == nil || x == s) // false before: a listener is marked only as it leaves t.subs
			}
			t.subs = slices.DeleteFunc(t.subs, func(x *Subscription) bool { return x.removed.Load() })
			if len(t.subs) == 0 {
				delete(c.topics, key)
				last = t
			}
		}
	})
	if last != nil && r != nil {
		r.routeUnsubscribe(key, last.reg)
	}
}

// deliver records a value of key and wakes the delivery loop, or with
// err set, records and logs the leader's refusal of key, the first since
// the key was last sent.
func (c *Client) deliver(key string, data []byte, err error) {
	c.mu.Lock()
	if t := c.topics[key]; t != nil && err != nil && t.err == nil { // one warning until it is sent again
		t.err = err
		defer c.cfg.Logger.Warn("clusterclient: the leader refused a subscription", "channel", c.name, "reg", string(t.reg), "err", err)
	} else if t != nil && err == nil {
		t.latest, t.version = data, t.version+1
	}
	c.mu.Unlock() // before the deferred warning
	c.wakeDelivery()
}

func (c *Client) wakeDelivery() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// deliverLoop hands values to listeners, one at a time: each listener
// gets the latest value of its key, once.
func (c *Client) deliverLoop() {
	defer c.wg.Done()
	for {
		select {
		case <-c.wake:
		case <-c.done:
			return
		}
		var todo []*Subscription
		c.mu.Lock()
		for _, t := range c.topics {
			for _, s := range t.subs {
				if s.seen < t.version {
					s.seen, s.next = t.version, Value{data: t.latest, codec: c.cfg.Codec}
					todo = append(todo, s)
				}
			}
		}
		c.mu.Unlock()
		for _, s := range todo {
			if !s.removed.Load() {
				c.listen(s)
			}
		}
	}
}

// listen calls a listener. A panic in it is logged, and the other
// listeners still get their values.
func (c *Client) listen(s *Subscription) {
	defer func() {
		if p := recover(); p != nil {
			c.cfg.Logger.Error("clusterclient: a listener panicked", "channel", c.name, "key", s.key, "panic", p, "stack", string(debug.Stack()))
		}
	}()
	s.fn(s.next)
}
