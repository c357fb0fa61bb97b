package clusterclient

import (
	"errors"
	"fmt"
)

// claim tries to make c the leader of its channel: in single mode always;
// otherwise on this process's listener for the port if it holds one, else
// by listening on 127.0.0.1:port. The winner's real client starts
// building at once. It returns nil when c must follow, and an error only
// for a forced leader that cannot lead.
func claim(c *Client) (*leader, error) {
	cfg := &c.cfg
	if cfg.SingleMode {
		l := newLeader(c.name, cfg, c.deliver)
		l.start(c.build)
		return l, nil
	}
	if cfg.Role == RoleFollower {
		return nil, nil
	}
	l := newLeader(c.name, cfg, c.deliver)
	hostsMu.Lock()
	ok, err := hostChannel(cfg, l)
	hostsMu.Unlock()
	if ok {
		l.start(c.build)
		return l, nil
	}
	l.cancel()
	if cfg.Role == RoleLeader {
		if err != nil {
			return nil, fmt.Errorf("clusterclient: cannot lead channel %q: port %d is taken: %w", c.name, cfg.Port, err)
		}
		return nil, fmt.Errorf("clusterclient: cannot lead channel %q on port %d: another client of this process leads it", c.name, cfg.Port)
	}
	return nil, nil
}

// retryable reports whether a failed attempt to follow may succeed by
// itself later without the wait running out first: anything but a leader
// that answered with its real client's error.
func retryable(err error) bool {
	var re *RemoteError
	return !errors.As(err, &re) || re.Code == codeChannelNotHosted
}
