package clusterclient

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"sync"
	"time"
)

// registerMaxPacket bounds the first packet of a connection, which must
// be a register_channel: a channel name and a secret fit easily.
const registerMaxPacket = 64 << 10

// readBufferSize is the read buffer of a follower connection on the
// leader, for the connection's whole life.
const readBufferSize = 4 << 10

// hosts holds the ports this process listens on: one listener per port,
// shared by every channel that the process leads on it. Lock order:
// hosts.mu, then a portHost's mu.
var hosts = struct {
	mu sync.Mutex
	m  map[int]*portHost // guarded by mu
}{m: make(map[int]*portHost)}

// portHost is a listener on 127.0.0.1:port and the channels that this
// process leads on it. It reads the first packet of each new connection
// and hands the connection to the leader of the channel it names.
type portHost struct {
	port     int
	ln       net.Listener
	log      *slog.Logger
	maxUnreg int            // Config.MaxUnregistered of the first channel
	regWait  time.Duration  // Config.RegisterTimeout of the first channel
	wg       sync.WaitGroup // the accept loop and the connections it has not handed to a leader

	mu       sync.Mutex
	channels map[string]*leader // guarded by mu
	unreg    []net.Conn         // guarded by mu: not yet registered, or refused; oldest first
	closed   bool               // guarded by mu
	logStart time.Time          // guarded by mu: start of the current second of warn
	logged   int                // guarded by mu: lines warn logged since logStart
	dropped  int                // guarded by mu: lines warn left out since it last logged
}

// warnPerSecond bounds the lines that warn logs per second and port, so
// that a flood of bad connections cannot flood the log.
const warnPerSecond = 10

// warn logs why a connection that had not registered was closed or
// refused, at most warnPerSecond lines a second; the next line logged
// counts those left out as "suppressed".
func (h *portHost) warn(msg string, args ...any) {
	h.mu.Lock()
	if now := time.Now(); now.Sub(h.logStart) >= time.Second {
		h.logStart, h.logged = now, 0
	}
	h.logged++
	ok, dropped := h.logged <= warnPerSecond, h.dropped
	h.dropped++
	if ok {
		h.dropped = 0
	}
	h.mu.Unlock()
	if ok && dropped > 0 {
		args = append(args, "suppressed", dropped)
	}
	if ok {
		h.log.Warn(msg, args...)
	}
}

// hostChannel makes l the leader of its channel on the port, listening
// first if this process does not hold the port yet. It returns false,
// and a listen error if there was one, when the port is another
// process's or the channel already has a leader in this process.
// Called with hosts.mu held.
func hostChannel(cfg *Config, l *leader) (bool, error) {
	h := hosts.m[cfg.Port]
	if h == nil {
		ln, err := net.Listen("tcp", loopback(cfg.Port))
		if err != nil {
			return false, err
		}
		// The channel is hosted before the first accept: a follower
		// that dials at once must not be refused.
		h = &portHost{port: cfg.Port, ln: ln, log: cfg.Logger, maxUnreg: cfg.MaxUnregistered,
			regWait: cfg.RegisterTimeout, channels: map[string]*leader{l.name: l}}
		hosts.m[cfg.Port], l.host = h, h
		h.wg.Add(1)
		go h.acceptLoop()
		return true, nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.channels[l.name] != nil {
		return false, nil
	}
	h.channels[l.name], l.host = l, h
	return true, nil
}

// unhost removes l from its port; the last channel to leave closes the
// listener and frees the port for a new election.
func (h *portHost) unhost(l *leader) {
	hosts.mu.Lock()
	h.mu.Lock()
	if h.channels[l.name] == l {
		delete(h.channels, l.name)
	}
	last := len(h.channels) == 0 && !h.closed
	unreg := h.unreg
	if last {
		h.closed, h.unreg = true, nil
		delete(hosts.m, h.port)
	}
	h.mu.Unlock()
	hosts.mu.Unlock()
	if last {
		h.ln.Close()
		for _, nc := range unreg {
			nc.Close()
		}
		h.wg.Wait()
	}
}

func (h *portHost) acceptLoop() {
	defer h.wg.Done()
	var delay time.Duration
	for {
		nc, err := h.ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			// Out of file descriptors or similar: back off, as
			// net/http does, rather than spin.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			h.log.Warn("clusterclient: accept failed", "port", h.port, "err", err, "retry", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if !h.track(nc) {
			return
		}
		h.wg.Add(1)
		go h.register(nc)
	}
}

// track adds nc to the connections that have not registered, closing the
// oldest past MaxUnregistered. It returns false, after closing nc, once
// the host has closed.
func (h *portHost) track(nc net.Conn) bool {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		nc.Close()
		return false
	}
	h.unreg = append(h.unreg, nc)
	var evict net.Conn
	if len(h.unreg) > h.maxUnreg {
		evict, h.unreg = h.unreg[0], h.unreg[1:]
	}
	h.mu.Unlock()
	if evict != nil {
		h.warn("clusterclient: closing unregistered connection: too many connections have not registered",
			"remote", evict.RemoteAddr(), "limit", h.maxUnreg)
		evict.Close()
	}
	return true
}

// registered takes nc off the list of unregistered connections. It
// returns false if nc was evicted or the host closed meanwhile.
func (h *portHost) registered(nc net.Conn) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	i := slices.Index(h.unreg, nc)
	if i >= 0 {
		h.unreg = slices.Delete(h.unreg, i, i+1)
	}
	return i >= 0
}

// register reads the first packet of a connection, which must register a
// channel that this process leads, and hands the connection to that
// channel's leader.
func (h *portHost) register(nc net.Conn) {
	l, p, rc, br := h.handshake(nc)
	h.wg.Done()
	if l != nil {
		l.serve(nc, br, p, rc)
	}
}

// handshake reads and checks the first packet of nc. It returns the
// leader of the channel named, or nil after closing or refusing nc.
func (h *portHost) handshake(nc net.Conn) (*leader, *Packet, registerChannel, *bufio.Reader) {
	nc.SetReadDeadline(time.Now().Add(h.regWait))
	br := bufio.NewReaderSize(nc, readBufferSize)
	var p Packet
	var rc registerChannel
	err := NewReader(br, registerMaxPacket).ReadPacket(&p)
	if !h.registered(nc) {
		nc.Close()
		return nil, nil, rc, nil
	}
	if err == nil {
		rc, err = registerOf(&p)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("no register_channel within Config.RegisterTimeout %v: %w", h.regWait, err)
	}
	if err != nil {
		// A connection closed before its first byte is no fault: a
		// Node.js follower made to follow probes the port that way.
		if err != io.EOF {
			h.warn("clusterclient: closing connection that did not register", "remote", nc.RemoteAddr(), "err", err)
		}
		nc.Close()
		return nil, nil, rc, nil
	}
	// Registered: from here on the leader's heartbeat check bounds a
	// silent connection.
	nc.SetReadDeadline(time.Time{})
	h.mu.Lock()
	l := h.channels[rc.ChannelName]
	h.mu.Unlock()
	if l == nil {
		h.warn("clusterclient: refusing register for a channel this leader does not host",
			"remote", nc.RemoteAddr(), "channel", clip(rc.ChannelName), "port", h.port)
		data, _ := JSONCodec{}.Marshal(registerResult{Error: &registerErrorObject{Name: "ClusterChannelNotFoundError",
			Message: fmt.Sprintf("the leader on port %d does not host channel %q", h.port, rc.ChannelName),
			Code:    codeJSON(codeChannelNotHosted)}})
		refuse(h, nc, &p, data)
	}
	return l, &p, rc, br
}

// registerOf reads the register_channel that the first packet of a
// connection must be.
func registerOf(p *Packet) (registerChannel, error) {
	c, typ, err := parseConn(p.Conn)
	rc, ok := c.(registerChannel)
	if err == nil && (!ok || p.Response) {
		err = fmt.Errorf("first packet is %q, not a register_channel request", typ)
	}
	return rc, err
}

// codeChannelNotHosted is the error code of a register refused because
// the leader does not host the channel. A follower keeps trying.
const codeChannelNotHosted = "ERR_CLUSTER_CHANNEL_NOT_HOSTED"

// refuse answers a register_channel with data, a registerResult with
// success false (nothing if nil), then holds nc until the peer closes it
// or RegisterTimeout passes, discarding what it sends. A Node.js
// follower elects again as soon as its connection closes: closed at
// once, a refused one comes back in a tight loop. A Go follower closes
// its side on reading the refusal. Held connections count among the
// unregistered ones, so MaxUnregistered bounds them.
func refuse(h *portHost, nc net.Conn, req *Packet, data []byte) {
	if data != nil {
		b, _ := appendPacket(nil, true, req.ID, req.Timeout, registerChannelRes{}, data)
		nc.SetWriteDeadline(time.Now().Add(time.Second))
		nc.Write(b)
	}
	if h.track(nc) {
		nc.SetReadDeadline(time.Now().Add(h.regWait))
		io.Copy(io.Discard, nc)
		h.registered(nc)
		nc.Close()
	}
}

func loopback(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }
