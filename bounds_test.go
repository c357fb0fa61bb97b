package clusterclient

import (
	"testing"
	"time"
)

// TestInvokeWithoutTimeoutIsBounded: a request whose packet carries no
// timeout (0) still runs with the leader's ResponseTimeout as deadline, so
// no peer can hold the real client forever. The method honours its
// context, and the caller gets the error as an answer.
func TestInvokeWithoutTimeoutIsBounded(t *testing.T) {
	r := newRig(t, func(c *Config) { c.ResponseTimeout = 200 * time.Millisecond })
	nc := r.dial()
	rd := registerRaw(t, nc, "TestChannel", "")
	args := appendArgs(nil, [][]byte{[]byte("60000")})
	b, err := appendPacket(nil, false, 2, 0, invoke{Method: "sleep", ArgLength: 1}, args)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	mustWrite(t, nc, b)
	p := readAnswer(t, rd, nc, 2)
	took := time.Since(start)
	conn, _, err := parseConn(p.Conn)
	if res, ok := conn.(invokeResult); err != nil || !ok || res.Success {
		t.Fatalf("answer %s %s, %v", p.Conn, p.App, err)
	}
	if took > 10*time.Second {
		t.Fatalf("the answer took %v", took)
	}
	t.Logf("answered after %v: %s", took, p.App)
	r.serving()
}
