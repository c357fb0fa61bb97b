package clusterclient

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// registerMaxPacket bounds the first packet of a connection, which must
// be a register_channel: a channel name and a secret fit easily.
const registerMaxPacket = 64 << 10

// readBufferSize is the read buffer of a follower connection on the
// leader, for the connection's whole life.
const readBufferSize = 4 << 10

// codeTooManyConns is the error code of a register refused because the
// port has Config.MaxConns registered connections already.
const codeTooManyConns = "ERR_CLUSTER_TOO_MANY_CONNECTIONS"

// portHost is a listener on 127.0.0.1:port and the channels that this
// process leads on it. It reads the first packet of each new connection
// and hands the connection to the leader of the channel it names.
type portHost struct {
	ln  net.Listener
	cfg *Config        // the first channel's: Port, Logger, MaxUnregistered, RegisterTimeout, MaxConns, AllowUIDs, AllowAnyUser
	wg  sync.WaitGroup // the accept loop and the connections it has not handed to a leader

	mu       sync.Mutex
	channels map[string]*leader // guarded by mu; nil once the host has closed
	unreg    []net.Conn         // guarded by mu: not yet registered, or refused; oldest first

	held     atomic.Int64 // bytes held for all registered connections; see serverConn.bytes
	conns    atomic.Int64 // connections handed to a leader, see register
	dropping atomic.Bool  // dropLargest is running

	logMu    sync.Mutex
	logStart time.Time // guarded by logMu: start of the current second of warn
	logged   int       // guarded by logMu: lines warn was asked for since logStart
	dropped  int       // guarded by logMu: lines left out since reportDropped last ran
}

// warnPerSecond bounds the lines that a port's peers can make the
// process log per second, so that a flood of bad connections or calls
// cannot flood the log.
const warnPerSecond = 10

// warn logs a warning of the port that a peer can cause.
func (h *portHost) warn(msg string, args ...any) { h.log(h.cfg.Logger.Warn, msg, args...) }

// log logs a line that a peer can cause with out (a Logger's Warn or
// Error), at most warnPerSecond lines a second for the port; at the end
// of a second that left lines out, one line says how many. A nil host
// (single mode) logs every line.
func (h *portHost) log(out func(msg string, args ...any), msg string, args ...any) {
	if h != nil {
		h.logMu.Lock()
		defer h.logMu.Unlock()
		if now := time.Now(); now.Sub(h.logStart) >= time.Second {
			h.logStart, h.logged = now, 0
		}
		if h.logged++; h.logged > warnPerSecond {
			if h.dropped++; h.dropped == 1 {
				time.AfterFunc(time.Until(h.logStart.Add(time.Second)), h.reportDropped)
			}
			return
		}
	}
	out(msg, args...)
}

// reportDropped logs how many lines log left out since it last did.
// It may come up to a second after the host has closed: the count is
// still true.
func (h *portHost) reportDropped() {
	h.logMu.Lock()
	defer h.logMu.Unlock()
	h.cfg.Logger.Warn("clusterclient: more warnings than the log takes", "port", h.cfg.Port, "suppressed", h.dropped)
	h.dropped = 0
}

// dropLargest closes the registered connections that hold the most
// bytes until what they held no longer passes the bound.
func (h *portHost) dropLargest() {
	defer h.dropping.Store(false)
	excess := h.held.Load() - int64(h.cfg.MaxTotalBytes)
	for big := h.largest(); excess > 0 && big != nil; big = h.largest() {
		excess -= big.bytes.Load()
		big.close(fmt.Errorf("the port's connections hold over Config.MaxTotalBytes (%d bytes); this one holds the most, %d", h.cfg.MaxTotalBytes, big.bytes.Load()))
	}
}

// largest returns the open registered connection that holds the most
// bytes, nil if there is none.
func (h *portHost) largest() (big *serverConn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, l := range h.channels {
		l.mu.Lock()
		for sc := range l.conns {
			if sc.ctx.Err() == nil && (big == nil || sc.bytes.Load() > big.bytes.Load()) {
				big = sc
			}
		}
		l.mu.Unlock()
	}
	return big
}

// unhost removes l from its port; the last channel to leave closes the
// listener and the connections not yet registered, and frees the port
// for a new election.
func (h *portHost) unhost(l *leader) {
	hostsMu.Lock()
	h.mu.Lock()
	delete(h.channels, l.name)
	last := len(h.channels) == 0 // once: a closed host is no longer in hosts
	if last {
		delete(hosts, h.cfg.Port)
		h.ln.Close()
		for _, nc := range h.unreg {
			nc.Close()
		}
		h.channels, h.unreg = nil, nil // closed; the readers of unreg find their connections gone and log nothing
	}
	h.mu.Unlock()
	hostsMu.Unlock()
	if last {
		h.wg.Wait()
	}
}

func (h *portHost) acceptLoop() {
	defer h.wg.Done()
	for delay := time.Duration(0); ; {
		nc, err := h.ln.Accept()
		switch {
		case errors.Is(err, net.ErrClosed):
			return
		case err != nil:
			// Out of file descriptors or similar: back off, as
			// net/http does, rather than spin.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			h.cfg.Logger.Warn("clusterclient: accept failed", "port", h.cfg.Port, "err", err, "retry", delay)
			time.Sleep(delay)
		case h.track(nc): // else the host has closed, and so has its listener
			delay = 0
			h.wg.Add(1)
			go h.register(nc)
		}
	}
}

// track adds nc to the connections that have not registered, closing the
// oldest past MaxUnregistered. It returns false, after closing nc, once
// the host has closed.
func (h *portHost) track(nc net.Conn) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.channels == nil {
		nc.Close()
		return false
	}
	if h.unreg = append(h.unreg, nc); len(h.unreg) > h.cfg.MaxUnregistered {
		h.warn("clusterclient: closing unregistered connection: too many connections have not registered", "remote", h.unreg[0].RemoteAddr(), "limit", h.cfg.MaxUnregistered)
		h.unreg[0].Close()
		h.unreg = h.unreg[1:]
	}
	return true
}

// registered takes nc off the list of unregistered connections, and
// returns the leader of channel, if any. It returns false if nc was
// evicted or the host closed meanwhile.
func (h *portHost) registered(nc net.Conn, channel string) (*leader, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := len(h.unreg)
	h.unreg = slices.DeleteFunc(h.unreg, func(c net.Conn) bool { return c == nc })
	return h.channels[channel], len(h.unreg) < n
}

// register reads the first packet of a connection, which must register a
// channel that this process leads (with its Config.Secret, if any), and
// hands the connection to that channel's leader, on a goroutine of its
// own; it closes or refuses any other. The port counts the connections
// handed to a leader until their serve returns, at most MaxConns; an
// attempt past the bound counts for an instant, until it undoes its count.
func (h *portHost) register(nc net.Conn) {
	defer h.wg.Done()
	nc.SetReadDeadline(time.Now().Add(h.cfg.RegisterTimeout))
	r, p := NewReader(bufio.NewReaderSize(nc, readBufferSize), registerMaxPacket), new(Packet)
	rc, err := h.registerOf(r.ReadPacket(p), p)
	l, tracked := h.registered(nc, rc.ChannelName)
	switch {
	case !tracked || err != nil: // an untracked one was evicted, or the host closed
		// A connection closed before its first byte is no fault: a
		// Node.js follower made to follow probes the port that way.
		if tracked && err != io.EOF {
			h.warn("clusterclient: closing connection that did not register", "remote", nc.RemoteAddr(), "err", err)
		}
		nc.Close()
	case h.refusesPeer(nc, p):
	case l == nil:
		h.warn("clusterclient: refusing register for a channel this leader does not host", "remote", nc.RemoteAddr(), "channel", clip(rc.ChannelName), "port", h.cfg.Port)
		refuse(h, nc, p, JSONCodec{}.Marshal, &RemoteError{Name: "ClusterChannelNotFoundError", Code: codeChannelNotHosted,
			Message: fmt.Sprintf("the leader on port %d does not host channel %q", h.cfg.Port, rc.ChannelName)})
	case l.cfg.Secret != "" && !secretsEqual(l.cfg.Secret, rc.Secret):
		l.warn("refusing follower with a wrong secret", "remote", nc.RemoteAddr())
		refuse(h, nc, p, l.marshal, &RemoteError{Name: "ClusterAuthError", Message: "wrong secret", Code: "ERR_CLUSTER_AUTH"})
	case h.conns.Add(1) > int64(h.cfg.MaxConns):
		h.conns.Add(-1)
		h.warn("clusterclient: refusing follower: too many connections", "remote", nc.RemoteAddr(), "limit", h.cfg.MaxConns)
		refuse(h, nc, p, l.marshal, &RemoteError{Name: "ClusterTooManyConnectionsError", Code: codeTooManyConns, Message: fmt.Sprintf(
			"the leader on port %d serves %d follower connections, its limit (Config.MaxConns)", h.cfg.Port, h.cfg.MaxConns)})
	default:
		go func() { l.serve(nc, r, p); h.conns.Add(-1) }()
	}
}

// socketOwner returns the uid that owns the TCP socket of this host from
// address local to address remote, both IPv4, read from /proc/net/tcp
// and /proc/net/tcp6 (where an IPv4-mapped address ends as the IPv4 one
// does), or -1 if there is none. TIME_WAIT lines (state 06), whose uid
// always reads 0, are skipped. An error means that the table cannot be
// read.
func socketOwner(local, remote *net.TCPAddr) (int, error) {
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		return -1, err
	}
	defer f.Close()
	f6, _ := os.Open("/proc/net/tcp6") // nil without IPv6: reads and Close fail
	defer f6.Close()
	// An address as the tables write it: the four bytes as one hexadecimal
	// number in the host's byte order, a colon, the port. An address that
	// is not IPv4 matches no line.
	hex := func(a *net.TCPAddr) string {
		return fmt.Sprintf("%08X:%04X", binary.NativeEndian.Uint32(append(a.IP.To4(), 0, 0, 0, 0)), a.Port)
	}
	la, ra := hex(local), hex(remote)
	for s := bufio.NewScanner(io.MultiReader(f, f6)); s.Scan(); {
		fs := strings.Fields(s.Text()) // sl local remote st tx:rx tr:when retrnsmt uid ...
		if len(fs) > 7 && fs[3] != "06" && strings.HasSuffix(fs[1], la) && strings.HasSuffix(fs[2], ra) {
			if uid, err := strconv.Atoi(fs[7]); err == nil {
				return uid, nil
			}
		}
	}
	return -1, nil
}

// peerAllowed looks up the owner of the socket from address local to
// address remote, and says whether cfg lets this process talk to it: yes
// when the socket table cannot be read. uid is -1 if no socket matches.
func peerAllowed(cfg *Config, local, remote net.Addr) (uid int, ok bool) {
	la, _ := local.(*net.TCPAddr)
	ra, _ := remote.(*net.TCPAddr)
	if cfg.AllowAnyUser || la == nil || ra == nil { // not TCP: no socket to look up
		return -1, cfg.AllowAnyUser
	}
	uid, err := socketOwner(la, ra)
	return uid, err != nil || uid >= 0 && (uid == os.Geteuid() || slices.Contains(cfg.AllowUIDs, uid))
}

// refusesPeer refuses the register_channel p on nc, a TCP connection of
// h.ln, and reports true, if the follower's process runs as a user that
// the port does not allow; ERR_CLUSTER_PEER_USER tells the follower.
func (h *portHost) refusesPeer(nc net.Conn, p *Packet) bool {
	uid, ok := peerAllowed(h.cfg, nc.RemoteAddr(), nc.LocalAddr())
	if !ok {
		h.warn("clusterclient: refusing follower of another user", "remote", nc.RemoteAddr(), "uid", uid, "port", h.cfg.Port)
		msg := fmt.Sprintf("the leader on port %d refuses followers of uid %d (-1: their socket not found): set its Config.AllowUIDs or AllowAnyUser", h.cfg.Port, uid)
		refuse(h, nc, p, JSONCodec{}.Marshal, &RemoteError{Name: "ClusterPeerUserError", Code: "ERR_CLUSTER_PEER_USER", Message: msg})
	}
	return !ok
}

// registerOf reads the register_channel that the first packet p of a
// connection must be, given the error of reading it.
func (h *portHost) registerOf(err error, p *Packet) (registerChannel, error) {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return registerChannel{}, fmt.Errorf("no register_channel within Config.RegisterTimeout %v: %w", h.cfg.RegisterTimeout, err)
	} else if err != nil {
		return registerChannel{}, err
	}
	c, typ, err := parseConn(p.Conn)
	rc, ok := c.(registerChannel)
	if err == nil && (!ok || p.Response) {
		err = fmt.Errorf("first packet is %q, not a register_channel request", typ)
	}
	return rc, err
}

// refuse answers a register_channel with a registerResult that refuses
// for re, encoded with marshal (nothing if that fails), then holds nc
// until the peer closes it or RegisterTimeout passes, discarding what it
// sends. A Node.js follower elects again as soon as its connection
// closes: closed at once, a refused one comes back in a tight loop. A Go
// follower closes its side on reading the refusal. Held connections count
// among the unregistered ones, so MaxUnregistered bounds them.
func refuse(h *portHost, nc net.Conn, req *Packet, marshal func(any) ([]byte, error), re *RemoteError) {
	data, err := marshal(registerResult{Error: &registerErrorObject{Message: re.Message, Stack: re.Stack, Name: re.Name, Code: errorCode(re.Code)}})
	if err == nil {
		b, _ := appendPacket(nil, true, req.ID, req.Timeout, registerChannelRes{}, data)
		nc.SetWriteDeadline(time.Now().Add(time.Second))
		nc.Write(b)
	}
	if h.track(nc) {
		nc.SetReadDeadline(time.Now().Add(h.cfg.RegisterTimeout))
		io.Copy(io.Discard, nc)
		h.registered(nc, "")
		nc.Close()
	}
}
