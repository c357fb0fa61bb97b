package clusterclient

import (
	"fmt"
	"net"
	"sync"
)

// hosts holds the ports this process listens on: one listener per port,
// shared by every channel that the process leads on it. Lock order:
// hostsMu, then a portHost's mu, then its logMu.
var hostsMu sync.Mutex
var hosts = map[int]*portHost{} // guarded by hostsMu

// claim tries to make c the leader of its channel: in single mode always;
// otherwise on this process's listener for the port if it holds one, else
// by listening on 127.0.0.1:port. The winner's real client starts
// building at once. It returns nil when c must follow, and an error only
// for a forced leader that cannot lead.
func claim(c *Client) (*leader, error) {
	if c.cfg.Role == RoleFollower && !c.cfg.SingleMode {
		return nil, nil
	}
	l := newLeader(c.name, &c.cfg, c.deliver)
	if !c.cfg.SingleMode {
		if err := hostChannel(&c.cfg, l); err != nil && c.cfg.Role == RoleLeader {
			return nil, err
		} else if err != nil {
			return nil, nil // the port or the channel has a leader: follow it
		}
	}
	l.start(c.build)
	return l, nil
}

// hostChannel makes l the leader of its channel on the port, listening
// first if this process does not hold the port yet. It fails when the
// port is another process's or the channel already has a leader in this
// process.
func hostChannel(cfg *Config, l *leader) error {
	hostsMu.Lock()
	defer hostsMu.Unlock()
	h := hosts[cfg.Port]
	if h == nil {
		ln, err := net.Listen("tcp", loopback(cfg.Port))
		if err != nil {
			return fmt.Errorf("clusterclient: cannot lead channel %q: port %d is taken: %w", l.name, cfg.Port, err)
		}
		h = &portHost{ln: ln, cfg: cfg, channels: map[string]*leader{}}
		hosts[cfg.Port] = h
		// Deferred until l is hosted: a follower that dials at once
		// must not be refused.
		defer func() { h.wg.Add(1); go h.acceptLoop() }()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.channels[l.name] != nil {
		return fmt.Errorf("clusterclient: cannot lead channel %q on port %d: this process leads it already", l.name, cfg.Port)
	}
	h.channels[l.name], l.host = l, h
	return nil
}

func loopback(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }
