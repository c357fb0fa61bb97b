package clusterclient

import (
	"bufio"
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
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// publishMethod is the method that a publish invokes, as the reference's
// default delegate names it.
const publishMethod = "publish"

// leader holds the real client of one channel in the process that won the
// port. It serves the follower connections of that channel and the calls
// of the Client that owns it, which go straight to the real client.
type leader struct {
	name  string
	cfg   *Config
	owner *Client
	host  *portHost // nil in single mode; set by hostChannel

	ready chan struct{} // closed once build has returned
	real  RealClient    // set before ready is closed
	err   error         // build's error, set before ready is closed

	ctx    context.Context // ends when the leader has closed
	cancel context.CancelFunc

	inflight sync.WaitGroup // running invokes, remote and local

	onReaders  atomic.Int64                           // invokes running on a connection's reader goroutine
	watching   atomic.Bool                            // the watchdog runs
	ticks      atomic.Uint64                          // counts the watchdog's ticks
	methods    atomic.Pointer[map[string]*methodStat] // by method name; the map is replaced, never changed
	methodsMu  sync.Mutex                             // held while methods is replaced
	handOff    atomic.Int64                           // the watchdog's period in nanoseconds: handOffAfter, shorter in tests
	quickLimit atomic.Int64                           // nanoseconds: inlineLimit, longer in tests
	quiet      atomic.Int64                           // nanoseconds: quietAfter, shorter in tests
	wg         sync.WaitGroup                         // serve goroutines and the idle checker

	// realMu is held from the decision to subscribe or release a key
	// until the real client's Subscribe or Unsubscribe has returned, so
	// that those calls reach it in the order decided: a key subscribed
	// again while its release is under way ends up subscribed. It is
	// taken before mu.
	realMu sync.Mutex

	mu      sync.Mutex
	conns   map[*serverConn]struct{} // guarded by mu
	topics  map[string]*topic        // guarded by mu
	closing bool                     // guarded by mu
	stopped bool                     // guarded by mu: the drain is over; no call may start
	drained chan struct{}            // guarded by mu: closed when closing and conns is empty
}

// topic is one subscription key on the leader.
type topic struct {
	key    string
	reg    json.RawMessage
	latest []byte                   // the last value pushed, nil before the first
	conns  map[*serverConn]struct{} // followers subscribed
	local  bool                     // the owner has listeners on the key
	real   bool                     // the real client has been subscribed
}

// serverConn is one follower connection on the leader.
type serverConn struct {
	l          *leader
	nc         net.Conn
	w          *sender
	keys       map[string]struct{} // guarded by l.mu: keys subscribed
	lastActive atomic.Int64        // unix nanoseconds of the last packet read
	closeOnce  sync.Once
	done       chan struct{} // closed by close
	oddType    bool          // reader goroutine only: a request of unknown type was logged

	// The goroutine that reads the connection runs each invoke itself;
	// if one runs for handOffAfter, the leader's watchdog hands the
	// reading (br, r) to a new goroutine. See runInvoke and watch.
	br         *bufio.Reader // reader goroutine only
	r          *Reader       // reader goroutine only
	src        *prefixed     // reader goroutine only: what br reads, after a resize; nil before
	bufSize    atomic.Int64  // br's size, for tests
	rmu        sync.Mutex
	readerGen  uint64 // guarded by rmu: counts the hand-offs
	busySince  uint64 // guarded by rmu: the first watchdog tick after the reader's invoke began, 0 if none
	busyMethod string // guarded by rmu: the method of that invoke

	gate     sync.Mutex
	running  int           // guarded by gate: invokes running
	held     int           // guarded by gate: bytes of their app objects
	gateWake chan struct{} // guarded by gate: closed when one ends, if the reader waits
}

// maxConnInvokes bounds the invokes that one follower connection has
// running on the leader; Config.MaxQueuedBytes bounds their app objects.
// Past either bound the leader reads nothing more from that connection
// until one ends, so a peer cannot make it hold unbounded goroutines or
// memory.
const maxConnInvokes = 1024

// admit waits until the connection may start an invoke whose app object
// has n bytes (one is always allowed). It returns false if the connection
// closed meanwhile. alone reports whether the invoke is the only one sc
// has running: only then does the reader run it itself, so once an
// invoke has been slow enough to be handed off, those behind it get
// goroutines of their own until it ends.
func (sc *serverConn) admit(n int) (ok, alone bool) {
	for {
		sc.gate.Lock()
		if sc.running == 0 || (sc.running < maxConnInvokes && sc.held+n <= sc.l.cfg.MaxQueuedBytes) {
			sc.running++
			sc.held += n
			alone = sc.running == 1
			sc.gate.Unlock()
			return true, alone
		}
		if sc.gateWake == nil {
			sc.gateWake = make(chan struct{})
		}
		wake := sc.gateWake
		sc.gate.Unlock()
		select {
		case <-wake:
		case <-sc.done:
			return false, false
		}
	}
}

// release ends an invoke that admit let start.
func (sc *serverConn) release(n int) {
	sc.gate.Lock()
	sc.running--
	sc.held -= n
	if sc.gateWake != nil {
		close(sc.gateWake)
		sc.gateWake = nil
	}
	sc.gate.Unlock()
}

func newLeader(name string, cfg *Config, owner *Client) *leader {
	ctx, cancel := context.WithCancel(context.Background())
	l := &leader{
		name:    name,
		cfg:     cfg,
		owner:   owner,
		ready:   make(chan struct{}),
		ctx:     ctx,
		cancel:  cancel,
		conns:   make(map[*serverConn]struct{}),
		topics:  make(map[string]*topic),
		drained: make(chan struct{}),
	}
	l.handOff.Store(int64(handOffAfter))
	l.quickLimit.Store(int64(inlineLimit))
	l.quiet.Store(int64(quietAfter))
	return l
}

// start builds the real client in the background and starts the check
// for silent followers.
func (l *leader) start(build BuildFunc) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		real, err := build(l.ctx)
		if err == nil && real == nil {
			err = errors.New("clusterclient: BuildFunc returned a nil RealClient")
		}
		l.real, l.err = real, err
		close(l.ready)
	}()
	if l.host != nil && !l.cfg.DisableHeartbeatCheck {
		l.wg.Add(1)
		go l.checkIdle()
	}
}

// checkIdle drops follower connections silent for three heartbeat
// intervals.
func (l *leader) checkIdle() {
	defer l.wg.Done()
	interval := l.cfg.HeartbeatInterval
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-l.ctx.Done():
			return
		case now := <-t.C:
			limit := now.Add(-3 * interval).UnixNano()
			l.mu.Lock()
			var idle []*serverConn
			for sc := range l.conns {
				if sc.lastActive.Load() < limit {
					idle = append(idle, sc)
				}
			}
			l.mu.Unlock()
			for _, sc := range idle {
				sc.close(fmt.Errorf("no packet for %v, three heartbeat intervals", 3*interval))
			}
		}
	}
}

// serve runs one follower connection, from its register_channel packet
// until it closes.
func (l *leader) serve(nc net.Conn, br *bufio.Reader, r *Reader, reg *Packet, rc registerChannel) {
	l.mu.Lock()
	if l.closing {
		l.mu.Unlock()
		refuse(l.host, nc, reg, l.cfg.Codec, &registerErrorObject{
			Name: "ClusterChannelNotFoundError", Message: "the leader of channel " + l.name + " is closing",
			Code: codeJSON(codeChannelNotHosted),
		})
		return
	}
	l.wg.Add(1)
	l.mu.Unlock()
	defer l.wg.Done()

	select {
	case <-l.ready:
	case <-l.ctx.Done():
		nc.Close()
		return
	}
	if l.cfg.Secret != "" && !secretsEqual(l.cfg.Secret, rc.Secret) {
		l.cfg.Logger.Warn("clusterclient: refusing follower with a wrong secret", "channel", l.name, "remote", nc.RemoteAddr())
		refuse(l.host, nc, reg, l.cfg.Codec, &registerErrorObject{Name: "ClusterAuthError", Message: "wrong secret", Code: codeJSON("ERR_CLUSTER_AUTH")})
		return
	}
	if l.err != nil {
		re := toRemote(l.err)
		refuse(l.host, nc, reg, l.cfg.Codec, &registerErrorObject{Message: re.Message, Stack: re.Stack, Name: re.Name, Code: codeJSON(re.Code)})
		return
	}

	sc := &serverConn{l: l, nc: nc, keys: make(map[string]struct{}), done: make(chan struct{})}
	sc.w = newSender(nc, l.cfg.MaxQueuedBytes, l.cfg.ResponseTimeout, sc.close)
	sc.lastActive.Store(time.Now().UnixNano())
	l.mu.Lock()
	if l.closing {
		l.mu.Unlock()
		nc.Close()
		return
	}
	l.conns[sc] = struct{}{}
	l.mu.Unlock()

	r.max = l.cfg.MaxPacketSize
	sc.br, sc.r = br, r
	sc.bufSize.Store(int64(br.Size()))
	ok, _ := l.cfg.Codec.Marshal(registerResult{Success: true})
	sc.w.send(true, func(b []byte) ([]byte, error) {
		return appendPacket(b, true, reg.ID, reg.Timeout, registerChannelRes{}, ok)
	})
	l.readLoop(sc, 0)
}

// busyReadBuffer is the read buffer of a busy follower connection: one
// that sent more than readBufferSize in one burst, which the reader read
// without waiting for the network. A larger buffer takes such a burst in
// fewer reads, so its answers also go out in fewer writes (measured with
// 64 calls in flight and 1 KiB arguments: 30 % more calls per second).
// A connection gets its small buffer back once a burst starts more than
// quietAfter after the previous one. So a leader holds at most
// busyReadBuffer per busy connection, and readBufferSize per idle one.
const busyReadBuffer = 64 << 10

// quietAfter is how long a connection with a busy read buffer may go
// between two bursts before it gets its small buffer back.
const quietAfter = time.Second

// resize gives the connection a read buffer of size bytes. The bytes
// already read and not yet consumed are read first from the new one.
// Called by the goroutine that reads sc.
func (sc *serverConn) resize(size int) {
	var left []byte
	if sc.src != nil {
		left = sc.src.pre
	}
	if n := sc.br.Buffered(); n > 0 {
		b, _ := sc.br.Peek(n)
		left = append(slices.Clone(b), left...)
	}
	sc.src = &prefixed{pre: left, nc: sc.nc}
	sc.br = bufio.NewReaderSize(sc.src, size)
	sc.r = NewReader(sc.br, sc.l.cfg.MaxPacketSize)
	sc.bufSize.Store(int64(size))
}

// prefixed reads pre, then nc.
type prefixed struct {
	pre []byte
	nc  net.Conn
}

func (p *prefixed) Read(b []byte) (int, error) {
	if len(p.pre) > 0 {
		n := copy(b, p.pre)
		p.pre = p.pre[n:]
		return n, nil
	}
	return p.nc.Read(b)
}

// errHandedOff ends a reader goroutine whose invoke ran so long that
// another goroutine now reads the connection.
var errHandedOff = errors.New("reading handed to another goroutine")

// readLoop reads and handles the packets of sc until the connection ends
// or the reading is handed to another goroutine. Answers queued by
// invokes that ran here are written when no whole packet is left to
// read, so a burst of requests is answered in one write.
func (l *leader) readLoop(sc *serverConn, gen uint64) {
	var p Packet
	burst := 0      // bytes read since the reader last waited for the network
	resize := false // a busy buffer that may shrink: this burst came after a quiet spell
	for {
		waits := !packetBuffered(sc.br)
		if waits {
			sc.w.flush()
			// What was read since the last wait filled the buffer:
			// more was probably waiting in the socket.
			full := burst+sc.br.Buffered() >= sc.br.Size()
			switch {
			case full && sc.br.Size() < busyReadBuffer:
				sc.resize(busyReadBuffer)
			case resize && !full:
				sc.resize(readBufferSize)
			}
			resize, burst = false, 0
		}
		err := sc.r.ReadPacket(&p)
		if err == nil {
			if waits {
				now := time.Now().UnixNano()
				if sc.br.Size() > readBufferSize && now-sc.lastActive.Load() > sc.l.quiet.Load() {
					resize = true
				}
				sc.lastActive.Store(now)
			}
			burst += HeaderSize + len(p.Conn) + len(p.App)
			err = l.handle(sc, &p, gen)
		}
		if err == errHandedOff {
			return
		}
		if err != nil {
			sc.close(err)
			l.dropConn(sc)
			return
		}
	}
}

// inlineLimit is how long an invoke of a method may take for the next
// ones to run on the goroutine that reads their connection. Running
// invokes on the reader saves a goroutine and a thread wake-up per call
// and lets answers share writes, but the requests behind it on the same
// connection wait for it: so a method runs on the reader only once an
// invoke of it, on a goroutine of its own, has returned within this, and
// no longer once one on the reader has not (see ran).
const inlineLimit = time.Millisecond

// handOffAfter bounds how long an invoke that runs on the reader holds up
// the requests behind it: after between one and two of these, the
// leader's watchdog hands the reading to a new goroutine and the method
// runs on goroutines of its own from then on. The watchdog ticks only
// while invokes run on readers. The period is long because a timer due
// within about 100 ms makes every wait of the process for the network
// slower on virtual machines (measured on loopback, per round trip: 5 to
// 7 µs more with a 1 ms tick, 3 to 5 µs with this watchdog ticking every
// 10 or 100 ms, nothing measurable with 1 s).
const handOffAfter = time.Second

// watchQuiet is the number of ticks without an invoke running on a
// reader after which the watchdog stops, to start again with the next.
const watchQuiet = 10

// maxMethods bounds the method names a leader remembers, each at most
// clipLen bytes long: names come from peers. Invokes of other methods
// run on goroutines of their own.
const maxMethods = 256

// beginOnReader records that the reader of sc starts an invoke, and
// starts the watchdog if it does not run.
func (l *leader) beginOnReader(sc *serverConn, method string) {
	tick := l.ticks.Load() + 1 // the next tick: a whole one has passed when the one after it comes
	sc.rmu.Lock()
	sc.busySince = tick
	sc.busyMethod = method
	sc.rmu.Unlock()
	l.onReaders.Add(1)
	if !l.watching.Load() && l.watching.CompareAndSwap(false, true) {
		l.wg.Add(1)
		go l.watch()
	}
}

// endOnReader records the end of an invoke that began on the reader of
// generation gen. It reports whether that goroutine still reads sc.
func (l *leader) endOnReader(sc *serverConn, gen uint64) bool {
	l.onReaders.Add(-1)
	sc.rmu.Lock()
	defer sc.rmu.Unlock()
	if sc.readerGen != gen {
		return false
	}
	sc.busySince = 0
	return true
}

// watch ticks every handOffAfter while invokes run on readers, and hands
// the reading of a connection whose invoke has run for a whole tick to a
// new goroutine.
func (l *leader) watch() {
	defer l.wg.Done()
	t := time.NewTicker(time.Duration(l.handOff.Load()))
	defer t.Stop()
	quiet := 0
	for {
		select {
		case <-l.ctx.Done():
			l.watching.Store(false)
			return
		case <-t.C:
		}
		tick := l.ticks.Add(1)
		if l.onReaders.Load() == 0 {
			if quiet++; quiet < watchQuiet {
				continue
			}
			// Stop, unless an invoke began meanwhile and saw the
			// watchdog still running.
			l.watching.Store(false)
			if l.onReaders.Load() == 0 || !l.watching.CompareAndSwap(false, true) {
				return
			}
		}
		quiet = 0
		l.mu.Lock()
		for sc := range l.conns {
			sc.rmu.Lock()
			if sc.busySince != 0 && sc.busySince < tick {
				sc.busySince = 0
				if st := l.stat(sc.busyMethod); st != nil {
					st.quick.Store(0)
					st.inline.Store(false)
				}
				sc.readerGen++
				l.wg.Add(1)
				go func(gen uint64) {
					defer l.wg.Done()
					l.readLoop(sc, gen)
				}(sc.readerGen)
			}
			sc.rmu.Unlock()
		}
		l.mu.Unlock()
	}
}

// methodStat is what the invokes of one method taught the leader.
type methodStat struct {
	inline atomic.Bool  // its invokes run on the reader
	quick  atomic.Int32 // invokes in a row, on goroutines of their own, that returned within inlineLimit
}

// inlineAfter is the number of invokes of a method in a row that must
// return within inlineLimit, on goroutines of their own, before its
// invokes run on the reader.
const inlineAfter = 32

// stat returns the methodStat of method, adding one if there is room.
func (l *leader) stat(method string) *methodStat {
	if m := l.methods.Load(); m != nil {
		if st := (*m)[method]; st != nil {
			return st
		}
		if len(*m) >= maxMethods {
			return nil
		}
	}
	if len(method) > clipLen {
		return nil
	}
	l.methodsMu.Lock()
	defer l.methodsMu.Unlock()
	old := l.methods.Load()
	if old != nil {
		if st := (*old)[method]; st != nil {
			return st
		}
		if len(*old) >= maxMethods {
			return nil
		}
	}
	m := make(map[string]*methodStat, 1)
	if old != nil {
		maps.Copy(m, *old)
	}
	st := new(methodStat)
	m[method] = st
	l.methods.Store(&m)
	return st
}

// ran records an invoke of method that took took.
func (l *leader) ran(method string, took time.Duration) {
	st := l.stat(method)
	switch {
	case st == nil:
	case took > time.Duration(l.quickLimit.Load()):
		st.quick.Store(0)
		st.inline.Store(false)
	case !st.inline.Load() && st.quick.Add(1) >= inlineAfter:
		st.inline.Store(true)
	}
}

// inline reports whether the invokes of method run on the reader.
func (l *leader) inline(method string) bool {
	m := l.methods.Load()
	if m == nil {
		return false
	}
	st := (*m)[method]
	return st != nil && st.inline.Load()
}

// secretsEqual compares in constant time, whatever the lengths.
func secretsEqual(want, got string) bool {
	a, b := sha256.Sum256([]byte(want)), sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1
}

// close closes the connection once. It logs why, unless the follower
// left or the leader is closing.
func (sc *serverConn) close(err error) {
	sc.closeOnce.Do(func() {
		close(sc.done)
		sc.w.fail(net.ErrClosed)
		sc.nc.Close()
		if err != nil && err != io.EOF && !errors.Is(err, net.ErrClosed) && !errors.Is(err, ErrClosed) {
			sc.l.cfg.Logger.Warn("clusterclient: closing follower connection",
				"channel", sc.l.name, "remote", sc.nc.RemoteAddr(), "err", err)
		}
	})
}

// handle acts on one packet from a follower, read by the reader of
// generation gen. An error closes the connection, but errHandedOff,
// which ends the goroutine.
func (l *leader) handle(sc *serverConn, p *Packet, gen uint64) error {
	c, typ, err := parseConn(p.Conn)
	if err != nil {
		return err
	}
	if p.Response {
		return nil // acknowledgements of pushes and notices
	}
	switch c := c.(type) {
	case invoke:
		return l.invoke(sc, p, c, gen)
	case heartbeat:
		id, timeout := p.ID, p.Timeout
		sc.w.sendLazy(func(b []byte) ([]byte, error) {
			return appendPacket(b, true, id, timeout, heartbeatRes{}, nil)
		})
	case subscribe:
		l.subscribeConn(sc, c.Reg)
	case unSubscribe:
		l.unsubscribeConn(sc, c.Reg)
	case registerChannel:
		// Already registered; answer again.
		ok, _ := l.cfg.Codec.Marshal(registerResult{Success: true})
		id, timeout := p.ID, p.Timeout
		sc.w.send(false, func(b []byte) ([]byte, error) {
			return appendPacket(b, true, id, timeout, registerChannelRes{}, ok)
		})
	default:
		// Logged once per connection: a peer cannot flood the log.
		if !sc.oddType {
			sc.oddType = true
			l.cfg.Logger.Warn("clusterclient: ignoring requests of unknown type on this connection",
				"channel", l.name, "remote", sc.nc.RemoteAddr(), "type", clip(typ))
		}
	}
	return nil
}

// invoke starts an invoke from a follower: on the reader of generation
// gen if it is the only one the connection has running and its method
// is known to be quick (see inlineLimit), else on a goroutine of its own.
func (l *leader) invoke(sc *serverConn, p *Packet, c invoke, gen uint64) error {
	if err := validArgs(p.App, c.ArgLength); err != nil {
		return err
	}
	ok, alone := sc.admit(len(p.App))
	if !ok {
		return net.ErrClosed
	}
	if !l.enter() {
		sc.release(len(p.App))
		// A Node.js follower does not heed leader_closing and may
		// call after the drain: tell it, as the reference would by
		// closing the connection.
		if !c.Oneway {
			_, data := l.encodeResult(c.Method, nil, &RemoteError{Name: "ClusterLeaderClosingError",
				Message: "the leader of channel " + l.name + " is closing", Code: "ERR_CLUSTER_LEADER_CLOSING"})
			id, timeout := p.ID, p.Timeout
			sc.w.send(false, func(b []byte) ([]byte, error) {
				return appendPacket(b, true, id, timeout, invokeResult{Success: false}, data)
			})
		}
		return nil
	}
	st := &invokeState{}
	st.args = st.few[:0]
	if c.ArgLength > len(st.few) {
		st.args = make([]Value, 0, c.ArgLength)
	}
	for rest := p.App; len(rest) > 0; {
		var a []byte
		a, rest = nextArg(rest)
		st.args = append(st.args, Value{data: a, codec: l.cfg.Codec})
	}
	if !alone || !l.inline(c.Method) {
		go l.runInvoke(sc, offReader, p.ID, p.Timeout, c, st, len(p.App))
	} else if !l.runInvoke(sc, gen, p.ID, p.Timeout, c, st, len(p.App)) {
		return errHandedOff
	}
	return nil
}

// invokeState is what one invoke from a follower hands the real client,
// its context and its arguments: one allocation, and a second only for
// an invoke of more than two arguments. The arguments alias the
// request's app object.
type invokeState struct {
	ctx  invokeCtx
	args []Value
	few  [2]Value // args, for up to two arguments
}

// enter counts a call in flight, unless the leader has stopped taking
// calls. Taking l.mu orders every Add before close's Wait, as
// sync.WaitGroup requires.
func (l *leader) enter() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		return false
	}
	l.inflight.Add(1)
	return true
}

// offReader is the generation passed to runInvoke for an invoke that has
// a goroutine of its own.
const offReader = ^uint64(0)

// runInvoke runs one invoke from a follower, on the reader of generation
// gen or (offReader) on a goroutine of its own, and answers it, unless it
// is oneway or its timeout passed (the follower gave up; the reference
// also stays silent then). It reports whether this goroutine still reads
// the connection; if so the answer is left for the reader's next flush,
// else it is written now.
func (l *leader) runInvoke(sc *serverConn, gen uint64, id uint64, timeoutMS int32, c invoke, st *invokeState, held int) (reader bool) {
	defer l.inflight.Done()
	if gen != offReader {
		l.beginOnReader(sc, c.Method)
	}
	// The packet's timeout is the method's deadline. A request without
	// one (the reference never sends that) gets the leader's
	// ResponseTimeout, so no follower can hold the real client forever.
	limit := time.Duration(timeoutMS) * time.Millisecond
	if timeoutMS <= 0 {
		limit = l.cfg.ResponseTimeout
	}
	start := time.Now()
	st.ctx.parent, st.ctx.deadline = l.ctx, start.Add(limit)
	defer st.ctx.release()
	var ctx context.Context = &st.ctx
	args := st.args
	var result any
	err := l.checkArgs(c.Method, args)
	switch {
	case err != nil: // refused before the real client sees it
	case c.Method == publishMethod && c.Oneway && len(args) == 1:
		err = l.publish(ctx, args[0])
	default:
		result, err = l.real.Invoke(ctx, c.Method, args)
	}
	reader = gen != offReader && l.endOnReader(sc, gen)
	// The invoke is over before its answer is written, so that the
	// follower's next request, which the answer may bring at once,
	// finds it no longer running (and may run on the reader).
	sc.release(held)
	took := time.Since(start)
	l.ran(c.Method, took)
	if c.Oneway {
		if err != nil {
			l.cfg.Logger.Warn("clusterclient: oneway invoke failed", "channel", l.name, "method", clip(c.Method), "err", err)
		}
		return reader
	}
	if timeoutMS > 0 && took >= limit {
		l.cfg.Logger.Warn("clusterclient: invoke outlasted its timeout; no answer sent",
			"channel", l.name, "method", clip(c.Method), "timeout", time.Duration(timeoutMS)*time.Millisecond, "err", err)
		return reader
	}
	success, data := l.encodeResult(c.Method, result, err)
	answer := func(b []byte) ([]byte, error) {
		return appendPacket(b, true, id, timeoutMS, invokeResult{Success: success}, data)
	}
	if reader {
		sc.w.sendLazy(answer)
	} else {
		sc.w.send(true, answer)
	}
	return reader
}

// invokeCtx is the context of an invoke from a follower: the leader's
// context with the deadline that the packet carries. The timer that
// closes Done at the deadline is made only when Done or Value is first
// called, so a method that never looks at its context costs no timer.
type invokeCtx struct {
	parent   context.Context
	deadline time.Time

	mu     sync.Mutex
	ctx    context.Context    // guarded by mu: made by inner
	cancel context.CancelFunc // guarded by mu
}

func (c *invokeCtx) inner() context.Context {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ctx == nil {
		c.ctx, c.cancel = context.WithDeadline(c.parent, c.deadline)
	}
	return c.ctx
}

// release stops the timer, if one was made.
func (c *invokeCtx) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cancel != nil {
		c.cancel()
	}
}

func (c *invokeCtx) Deadline() (time.Time, bool) { return c.deadline, true }
func (c *invokeCtx) Done() <-chan struct{}       { return c.inner().Done() }
func (c *invokeCtx) Value(key any) any           { return c.inner().Value(key) }

func (c *invokeCtx) Err() error {
	c.mu.Lock()
	inner := c.ctx
	c.mu.Unlock()
	switch {
	case inner != nil:
		return inner.Err()
	case c.parent.Err() != nil:
		return c.parent.Err()
	case !time.Now().Before(c.deadline):
		return context.DeadlineExceeded
	}
	return nil
}

// clipLen bounds a name that a peer sent (method, type, channel) in a log
// line: a packet may carry megabytes of it.
const clipLen = 64

// clip cuts s to clipLen bytes for a log line.
func clip(s string) string {
	if len(s) <= clipLen {
		return s
	}
	return strings.ToValidUTF8(s[:clipLen], "") + "..."
}

// codeBadArgument is the error code of an invoke refused because an
// argument is not valid JSON.
const codeBadArgument = "ERR_CLUSTER_BAD_ARGUMENT"

// checkArgs refuses, when the codec is JSONCodec, arguments that are not
// valid JSON: the caller gets a clear error and the connection stays,
// since the packet itself was well framed. Another codec decodes its own
// arguments and reports its own errors.
func (l *leader) checkArgs(method string, args []Value) error {
	switch l.cfg.Codec.(type) {
	case JSONCodec, *JSONCodec:
	default:
		return nil
	}
	for i, a := range args {
		if !json.Valid(a.data) {
			return &RemoteError{Name: "SyntaxError", Code: codeBadArgument,
				Message: fmt.Sprintf("argument %d of %.64q is not valid JSON", i, method)}
		}
	}
	return nil
}

// encodeResult turns the outcome of an invoke into the app object of an
// invoke_result.
func (l *leader) encodeResult(method string, result any, err error) (bool, []byte) {
	if err == nil {
		data, merr := l.cfg.Codec.Marshal(result)
		if merr == nil && len(data) > l.cfg.MaxPacketSize-256 {
			merr = fmt.Errorf("result of %d bytes exceeds Config.MaxPacketSize %d", len(data), l.cfg.MaxPacketSize)
		}
		if merr == nil {
			return true, data
		}
		err = fmt.Errorf("clusterclient: encode result of %s: %w", method, merr)
	}
	re := toRemote(err)
	data, merr := l.cfg.Codec.Marshal(invokeErrorObject{Stack: re.Stack, Name: re.Name, Message: re.Message, Code: codeJSON(re.Code)})
	if merr != nil {
		data, _ = JSONCodec{}.Marshal(invokeErrorObject{Name: "Error", Message: merr.Error()})
	}
	return false, data
}

// publish hands a registration to the real client: to Publish if it has
// one, else to Invoke as the method "publish".
func (l *leader) publish(ctx context.Context, arg Value) error {
	if p, ok := l.real.(Publisher); ok {
		var reg json.RawMessage
		if err := arg.Decode(&reg); err != nil {
			return fmt.Errorf("clusterclient: publish registration: %w", err)
		}
		return p.Publish(ctx, reg)
	}
	_, err := l.real.Invoke(ctx, publishMethod, []Value{arg})
	return err
}

// invokeLocal runs a call of the owner straight on the real client.
func (l *leader) invokeLocal(ctx context.Context, method string, args [][]byte, oneway bool) (Value, error) {
	if !l.enter() {
		return Value{}, ErrClosed
	}
	defer l.inflight.Done()
	ctx, cancel := context.WithTimeout(ctx, l.cfg.ResponseTimeout)
	defer cancel()
	vals := make([]Value, len(args))
	for i, a := range args {
		vals[i] = Value{data: a, codec: l.cfg.Codec}
	}
	result, err := l.real.Invoke(ctx, method, vals)
	if oneway {
		if err != nil {
			l.cfg.Logger.Warn("clusterclient: oneway invoke failed", "channel", l.name, "method", method, "err", err)
		}
		return Value{}, nil
	}
	if err != nil {
		if ctx.Err() == context.DeadlineExceeded && errors.Is(err, context.DeadlineExceeded) {
			return Value{}, fmt.Errorf("%w: %s did not return within %v", ErrTimeout, method, l.cfg.ResponseTimeout)
		}
		return Value{}, toRemote(err)
	}
	data, err := l.cfg.Codec.Marshal(result)
	if err != nil {
		return Value{}, fmt.Errorf("clusterclient: encode result of %s: %w", method, err)
	}
	return Value{data: data, codec: l.cfg.Codec}, nil
}

// publishLocal publishes a registration of the owner.
func (l *leader) publishLocal(ctx context.Context, reg json.RawMessage) error {
	if !l.enter() {
		return ErrClosed
	}
	defer l.inflight.Done()
	ctx, cancel := context.WithTimeout(ctx, l.cfg.ResponseTimeout)
	defer cancel()
	data, err := l.cfg.Codec.Marshal(reg)
	if err != nil {
		return err
	}
	if err := l.publish(ctx, Value{data: data, codec: l.cfg.Codec}); err != nil {
		return toRemote(err)
	}
	return nil
}

// topicFor returns the topic of key, creating it. Called with l.mu held.
func (l *leader) topicFor(key string, reg json.RawMessage) *topic {
	t := l.topics[key]
	if t == nil {
		t = &topic{key: key, reg: reg, conns: make(map[*serverConn]struct{})}
		l.topics[key] = t
	}
	return t
}

// subscribeConn subscribes a follower connection to reg's key, replaying
// the latest value when broadcasting.
func (l *leader) subscribeConn(sc *serverConn, reg json.RawMessage) {
	key := subscriptionKey(reg)
	l.realMu.Lock()
	defer l.realMu.Unlock()
	l.mu.Lock()
	t := l.topicFor(key, reg)
	if _, dup := t.conns[sc]; dup {
		l.mu.Unlock()
		return
	}
	t.conns[sc] = struct{}{}
	sc.keys[key] = struct{}{}
	latest := t.latest
	needReal := !t.real
	t.real = true
	l.mu.Unlock()
	if latest != nil && l.cfg.Broadcast {
		sc.push(key, latest)
	}
	if needReal {
		l.subscribeReal(t)
	}
}

// subscribeLocal records that the owner has listeners on key. It returns
// the latest value to replay, if any: only when broadcasting, as for a
// late follower.
func (l *leader) subscribeLocal(key string, reg json.RawMessage) []byte {
	l.realMu.Lock()
	defer l.realMu.Unlock()
	l.mu.Lock()
	t := l.topicFor(key, reg)
	t.local = true
	var latest []byte
	if l.cfg.Broadcast {
		latest = t.latest
	}
	needReal := !t.real
	t.real = true
	l.mu.Unlock()
	if needReal {
		l.subscribeReal(t)
	}
	return latest
}

// subscribeReal subscribes the real client to t, once per key.
func (l *leader) subscribeReal(t *topic) {
	s, ok := l.real.(Subscriber)
	if !ok {
		l.cfg.Logger.Warn("clusterclient: the real client cannot subscribe", "channel", l.name, "key", t.key)
		return
	}
	if err := s.Subscribe(t.reg, func(v any) { l.pushValue(t, v) }); err != nil {
		l.cfg.Logger.Warn("clusterclient: real client subscribe failed", "channel", l.name, "key", t.key, "err", err)
	}
}

// pushValue keeps v as t's latest value and pushes it to t's subscribers:
// all of them, or one picked at random when not broadcasting.
func (l *leader) pushValue(t *topic, v any) {
	data, err := l.cfg.Codec.Marshal(v)
	if err != nil {
		l.cfg.Logger.Warn("clusterclient: encode pushed value", "channel", l.name, "key", t.key, "err", err)
		return
	}
	l.mu.Lock()
	if l.topics[t.key] != t {
		l.mu.Unlock()
		return // released meanwhile
	}
	t.latest = data
	targets := make([]*serverConn, 0, len(t.conns))
	for sc := range t.conns {
		targets = append(targets, sc)
	}
	local := t.local
	l.mu.Unlock()
	if !l.cfg.Broadcast {
		n := len(targets)
		if local {
			n++
		}
		if n == 0 {
			return
		}
		i := rand.IntN(n)
		if i < len(targets) {
			targets, local = targets[i:i+1], false
		} else {
			targets = nil
		}
	}
	for _, sc := range targets {
		sc.push(t.key, data)
	}
	if local {
		l.owner.deliver(t.key, data)
	}
}

// push sends a subscribe_result. It never waits on the socket.
func (sc *serverConn) push(key string, data []byte) {
	id, timeout := nextID(), int32(sc.l.cfg.ResponseTimeout/time.Millisecond)
	sc.w.send(false, func(b []byte) ([]byte, error) {
		return appendPacket(b, false, id, timeout, subscribeResult{Key: key}, data)
	})
}

// unsubscribeConn removes a follower connection from reg's key.
func (l *leader) unsubscribeConn(sc *serverConn, reg json.RawMessage) {
	key := subscriptionKey(reg)
	l.realMu.Lock()
	defer l.realMu.Unlock()
	l.mu.Lock()
	var release *topic
	if t := l.topics[key]; t != nil {
		delete(t.conns, sc)
		delete(sc.keys, key)
		release = l.releasable(t)
	}
	l.mu.Unlock()
	l.release(release)
}

// unsubscribeLocal records that the owner has no listeners left on key.
func (l *leader) unsubscribeLocal(key string) {
	l.realMu.Lock()
	defer l.realMu.Unlock()
	l.mu.Lock()
	var release *topic
	if t := l.topics[key]; t != nil {
		t.local = false
		release = l.releasable(t)
	}
	l.mu.Unlock()
	l.release(release)
}

// releasable removes t if nobody listens to it any more and the real
// client can unsubscribe, and returns it then. Called with l.mu held.
func (l *leader) releasable(t *topic) *topic {
	if len(t.conns) > 0 || t.local {
		return nil
	}
	if _, ok := l.real.(Unsubscriber); !ok || !t.real {
		return nil
	}
	delete(l.topics, t.key)
	return t
}

func (l *leader) release(t *topic) {
	if t == nil {
		return
	}
	if err := l.real.(Unsubscriber).Unsubscribe(t.reg); err != nil {
		l.cfg.Logger.Warn("clusterclient: real client unsubscribe failed", "channel", l.name, "key", t.key, "err", err)
	}
}

// dropConn forgets a closed follower connection and its subscriptions.
func (l *leader) dropConn(sc *serverConn) {
	l.realMu.Lock()
	defer l.realMu.Unlock()
	l.mu.Lock()
	delete(l.conns, sc)
	var released []*topic
	for key := range sc.keys {
		if t := l.topics[key]; t != nil {
			delete(t.conns, sc)
			if t := l.releasable(t); t != nil {
				released = append(released, t)
			}
		}
	}
	sc.keys = nil
	if l.closing && len(l.conns) == 0 {
		select {
		case <-l.drained:
		default:
			close(l.drained)
		}
	}
	l.mu.Unlock()
	for _, t := range released {
		l.release(t)
	}
}

// close stops the leader on purpose: it frees the port (if no other
// channel of this process uses it), tells every follower that it is
// closing, lets calls in flight finish and Go followers leave, bounded by
// Config.DrainTimeout, then closes what is left and the real client.
func (l *leader) close() {
	l.mu.Lock()
	if l.closing {
		l.mu.Unlock()
		return
	}
	l.closing = true
	conns := make([]*serverConn, 0, len(l.conns))
	for sc := range l.conns {
		conns = append(conns, sc)
	}
	if len(l.conns) == 0 {
		close(l.drained)
	}
	l.mu.Unlock()

	if l.host != nil {
		l.host.unhost(l)
	}
	timeout := int32(l.cfg.ResponseTimeout / time.Millisecond)
	for _, sc := range conns {
		id := nextID()
		sc.w.send(false, func(b []byte) ([]byte, error) {
			return appendPacket(b, false, id, timeout, leaderClosing{}, nil)
		})
	}
	timer := time.NewTimer(l.cfg.DrainTimeout)
	defer timer.Stop()
	expired := false
	select {
	case <-l.drained:
	case <-timer.C:
		expired = true
	}
	// From here on no call starts, so every inflight.Add happened
	// before the Wait below, as sync.WaitGroup requires.
	l.mu.Lock()
	l.stopped = true
	l.mu.Unlock()
	inflight := make(chan struct{})
	go func() { l.inflight.Wait(); close(inflight) }()
	if !expired {
		select {
		case <-inflight:
		case <-timer.C:
		}
	}
	l.mu.Lock()
	conns = conns[:0]
	for sc := range l.conns {
		conns = append(conns, sc)
	}
	l.mu.Unlock()
	for _, sc := range conns {
		sc.close(ErrClosed)
	}
	l.cancel()
	<-inflight
	l.wg.Wait()
	if c, ok := l.real.(io.Closer); ok {
		if err := c.Close(); err != nil {
			l.cfg.Logger.Warn("clusterclient: closing the real client", "channel", l.name, "err", err)
		}
	}
}
