package clusterclient

import (
	"context"
	"net"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestFaultTotalBytesBounded: many connections, each within its own
// bounds, cannot add up past Config.MaxTotalBytes on the leader: packets
// left unfinished, a pushed value replayed again and again to connections
// that do not read, and answers to connections that do not read. The leader closes the connections that
// hold the most; its heap stays within the bound (with 2 MiB to spare for
// the runtime and the log), and a well-behaved
// follower's calls stay fast all along. With the bound lifted to 1 GiB,
// the same attacks hold twice the bound and more.
func TestFaultTotalBytesBounded(t *testing.T) {
	const (
		attackers = 32
		bound     = 8 << 20
		value     = 256 << 10
	)
	body := uint32(1<<20 - 64) // app length of an unfinished packet
	for _, tc := range []struct {
		name   string
		attack func(t *testing.T, r *rig, nc net.Conn)
		holds  int64 // what each attacker makes the leader hold, when no bound stops it first
	}{
		{"unfinished packets", func(t *testing.T, r *rig, nc net.Conn) {
			registerRaw(t, nc, "TestChannel", "")
			conn := []byte(`{"type":"invoke","method":"echo","argLength":1,"oneway":false}`)
			b := append(rawHeader(false, 7, uint32(len(conn)), body), conn...)
			nc.Write(append(b, make([]byte, body-1)...)) // one byte short; the leader may close it meanwhile
		}, int64(body) + 62},
		{"replays to connections that do not read", func(t *testing.T, r *rig, nc net.Conn) {
			registerRaw(t, nc, "TestChannel", "")
			smallSendBuffer(r, nc)
			reg, _ := marshalReg(goodReg)
			var b []byte
			for i := range 6 { // each subscribe after an unsubscribe replays the value
				b = append(b, packetBytes(t, false, uint64(10+2*i), subscribe{Key: subscriptionKey(reg), Reg: reg}, nil)...)
				b = append(b, packetBytes(t, false, uint64(11+2*i), unSubscribe{Key: subscriptionKey(reg), Reg: reg}, nil)...)
			}
			nc.Write(b) // the leader may close it meanwhile
		}, 2 * value},
		{"answers to connections that do not read", func(t *testing.T, r *rig, nc net.Conn) {
			registerRaw(t, nc, "TestChannel", "")
			smallSendBuffer(r, nc)
			arg := appendArgs(nil, [][]byte{[]byte(`"` + strings.Repeat("a", value) + `"`)})
			var b []byte
			for i := range 6 {
				b = append(b, packetBytes(t, false, uint64(10+i), invoke{Method: "args", ArgLength: 1}, arg)...)
			}
			nc.Write(b) // the leader may close it meanwhile
		}, 2 * value},
	} {
		for _, lifted := range []bool{false, true} {
			t.Run(tc.name+map[bool]string{false: "", true: "/bound lifted"}[lifted], func(t *testing.T) {
				r := newRig(t, func(c *Config) {
					c.MaxPacketSize, c.MaxQueuedBytes, c.MaxTotalBytes = 1<<20, 4<<20, bound
					c.ResponseTimeout = 10 * time.Second // a blocked write fails no connection meanwhile
					if lifted {
						c.MaxTotalBytes = 1 << 30
					}
				})
				ctx := context.Background()
				if _, err := r.lead.Invoke(ctx, "push", goodReg, strings.Repeat("v", value)); err != nil {
					t.Fatal(err)
				}
				base := measure()
				stop := make(chan struct{})
				lat := make(chan []time.Duration)
				go func() { // the well-behaved follower calls all along
					var d []time.Duration
					for i := 0; ; i++ {
						select {
						case <-stop:
							lat <- d
							return
						default:
						}
						start := time.Now()
						if n, err := Invoke[int](ctx, r.good, "echo", i); err != nil || n != i {
							t.Errorf("echo(%d) = %d, %v", i, n, err)
						}
						d = append(d, time.Since(start))
					}
				}()
				// Attackers that read nothing: a small receive buffer keeps
				// the kernel from taking what the leader queues for them.
				d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
					return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
				}}
				var ncs []net.Conn
				for range attackers {
					nc, err := d.Dial("tcp", loopback(r.port))
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { nc.Close() })
					tc.attack(t, r, nc)
					ncs = append(ncs, nc)
				}
				// Each attacker ends closed by the leader, or holding what
				// it makes the leader hold.
				var peak int64
				waitUntil(t, 20*time.Second, "every attacker closed or holding its share", func() bool {
					held := attackerBytes(r, ncs)
					peak = 0
					for _, n := range held {
						if n >= 0 && n < tc.holds {
							return false
						}
						peak += max(n, 0)
					}
					return true
				})
				u := measure()
				close(stop)
				d2 := <-lat
				slices.Sort(d2)
				p99 := d2[len(d2)*99/100]
				t.Logf("attackers hold %d KiB; heap %d KiB -> %d KiB; %d calls of the good follower, p99 %v",
					peak>>10, base.heap>>10, u.heap>>10, len(d2), p99)
				if over := int64(u.heap) - int64(base.heap); !lifted && over > bound+2<<20 {
					t.Errorf("the leader's heap grew by %d KiB, bound %d KiB", over>>10, bound>>10)
				} else if lifted && over <= 2*bound {
					t.Errorf("with the bound lifted the heap grew by %d KiB only: the attack is too weak to show the bound", over>>10)
				}
				if !lifted && p99 > 50*time.Millisecond*time.Duration(raceSlowdown) {
					t.Errorf("the good follower's p99 is %v", p99)
				}
				r.serving()
			})
		}
	}
}

// raceSlowdown is 1, or more under the race detector (race_test.go).
var raceSlowdown = 1

// attackerBytes returns what the leader holds for each connection of ncs,
// by their local addresses: -1 for one it has closed.
func attackerBytes(r *rig, ncs []net.Conn) []int64 {
	r.lead.mu.Lock()
	l := r.lead.lead()
	r.lead.mu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	held := make([]int64, len(ncs))
	for i, nc := range ncs {
		held[i] = -1
		for sc := range l.conns {
			if sc.nc.RemoteAddr().String() == nc.LocalAddr().String() {
				held[i] = sc.bytes.Load()
			}
		}
	}
	return held
}

// smallSendBuffer makes the kernel's send buffer of the leader's end of nc
// small, so that what the leader queues for a peer that does not read
// stays in the leader's heap rather than in the kernel's buffers.
func smallSendBuffer(r *rig, nc net.Conn) {
	r.lead.mu.Lock()
	l := r.lead.lead()
	r.lead.mu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	for sc := range l.conns {
		if sc.nc.RemoteAddr().String() == nc.LocalAddr().String() {
			sc.nc.(*net.TCPConn).SetWriteBuffer(4096)
		}
	}
}
