package clusterclient

import (
	"context"
	"encoding/json"
)

func (l *leader) routeInvoke(ctx context.Context, method string, args [][]byte, oneway bool) (Value, error) {
	return l.invokeLocal(ctx, method, args, oneway)
}

// routeSubscribe adds or removes the own Client as a listener of key; the
// latest value, if any, goes to the Client's listeners at once.
func (l *leader) routeSubscribe(key string, reg json.RawMessage, on bool) error {
	if !on {
		l.unsubscribe(nil, key)
	} else if latest := l.subscribe(nil, key, reg); latest != nil {
		l.deliver(key, latest)
	}
	return nil
}
