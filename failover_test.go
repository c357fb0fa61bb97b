package clusterclient

// Failover after SIGKILL of the leader, with real processes: what the
// survivors restore on the new leader, what happens to calls in flight,
// and how long it takes.

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestFailoverKillLeader kills the leader of three processes. The calls
// in flight on the survivors fail at once with ErrLeaderLost; the
// survivors elect a new leader, subscribe again to every key that has
// listeners (once per key on the new real client), publish again what
// they had published, and their listeners get values from the new
// leader.
func TestFailoverKillLeader(t *testing.T) {
	t.Parallel()
	kids, li := startCluster(t, 3, childSpec{Port: freePort(t), ResponseMS: 5000})
	shared := msg{"topic": "shared"}
	for i, k := range kids {
		k.ok(msg{"op": "subscribe", "reg": shared, "as": "s1"})
		k.ok(msg{"op": "subscribe", "reg": shared, "as": "s2"})
		k.ok(msg{"op": "subscribe", "reg": msg{"own": i}, "as": "own"})
		k.ok(msg{"op": "publish", "reg": msg{"pub": i}})
	}
	waitUntil(t, 10*time.Second, "first value everywhere", func() bool {
		kids[li].call("push", shared, "before")
		for _, k := range kids {
			if k.countLog(isValue("s1", "before")) == 0 {
				return false
			}
		}
		return true
	})

	old := kids[li]
	var surv []*child
	var survIdx []int
	for i, k := range kids {
		if i != li {
			surv = append(surv, k)
			survIdx = append(survIdx, i)
		}
	}
	// A call in flight on each survivor when the leader dies.
	var inflight []<-chan msg
	for _, k := range surv {
		inflight = append(inflight, k.send(msg{"op": "invoke", "method": "sleep", "args": []any{60000}}))
	}
	waitUntil(t, 10*time.Second, "calls in flight", func() bool { return old.call("sleeping") == float64(len(surv)) })
	old.kill()
	killed := time.Now()
	for i, ch := range inflight {
		select {
		case m := <-ch:
			if m["lost"] != true {
				t.Fatalf("%v: call in flight returned %v, want ErrLeaderLost", surv[i], m)
			}
			t.Logf("%v: call in flight failed %v after the kill: %v", surv[i], time.Since(killed).Round(time.Microsecond), m["err"])
		case <-time.After(3 * time.Second):
			t.Fatalf("%v: call in flight still waiting 3s after the leader died (response timeout 5s)", surv[i])
		}
	}

	lead := leaderOf(t, surv)
	mustReach(t, surv, lead)
	// Every survivor's publication reached the new real client.
	waitUntil(t, 10*time.Second, "publications on the new leader", func() bool {
		got := fmt.Sprint(lead.call("published"))
		for _, i := range survIdx {
			if !strings.Contains(got, fmt.Sprintf("pub:%d", i)) {
				return false
			}
		}
		return true
	})
	// One real Subscribe per key, and values from the new leader reach
	// every listener of every survivor.
	for _, k := range surv {
		if n := k.call("subscribes", shared); n != float64(1) {
			t.Fatalf("new real client subscribed shared %v times, want 1", n)
		}
	}
	for _, k := range surv {
		k.call("push", shared, "after")
	}
	for j, k := range surv {
		k.waitLog(isValue("s1", "after"), 5*time.Second)
		k.waitLog(isValue("s2", "after"), 5*time.Second)
		own := msg{"own": survIdx[j]}
		if n := k.call("subscribes", own); n != float64(1) {
			t.Fatalf("new real client subscribed %v %v times, want 1", own, n)
		}
		lead.call("push", own, "mine")
		k.waitLog(isValue("own", "mine"), 5*time.Second)
	}
	if n := lead.call("subscribes", msg{"own": li}); n != float64(0) {
		t.Fatalf("the dead leader's key was subscribed %v times on the new leader", n)
	}
}

// failoverRounds is the number of kills TestFailoverLatency makes;
// CLUSTERCLIENT_FAILOVER_ROUNDS overrides it.
const failoverRounds = 12

// TestFailoverLatency measures, with three processes on loopback, the
// time from SIGKILL of the leader to the next successful call on each
// survivor, over several kills (a new process replaces each dead
// leader). Each survivor has one call in flight when the leader dies;
// that call must be the only one that fails. The figures are logged; the
// bound asserted is loose, for a loaded machine.
func TestFailoverLatency(t *testing.T) {
	t.Parallel()
	rounds := failoverRounds
	if n, err := strconv.Atoi(os.Getenv("CLUSTERCLIENT_FAILOVER_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	rs := measureFailover(t, rounds)
	all, first, last := failoverFigures(rs, func(s failoverSample) time.Duration { return s.success })
	lost, _, _ := failoverFigures(rs, func(s failoverSample) time.Duration { return s.lost })
	ours, _, _ := failoverFigures(rs, func(s failoverSample) time.Duration { return s.success - s.lost })
	for _, f := range []struct {
		what string
		d    []time.Duration
	}{
		{"kill -> next successful call, each survivor", all},
		{"kill -> next successful call, first survivor of a kill", first},
		{"kill -> next successful call, last survivor of a kill", last},
		{"kill -> call in flight fails (the kernel closing the socket)", lost},
		{"call in flight fails -> next successful call", ours},
	} {
		t.Logf("%s: median %v, p90 %v, max %v (%d kills)",
			f.what, percentile(f.d, 50), percentile(f.d, 90), slices.Max(f.d), rounds)
	}
	if med := percentile(all, 50); med > time.Second {
		t.Errorf("median failover %v, want well under 1s", med)
	}
}

// failoverSample is one survivor's view of one kill: the time from the
// kill to the failure of its call in flight, and to its next successful
// call.
type failoverSample struct{ lost, success time.Duration }

// failoverFigures picks a time from each sample of measureFailover and
// returns them all, the smallest of each kill and the largest.
func failoverFigures(rounds [][]failoverSample, pick func(failoverSample) time.Duration) (all, first, last []time.Duration) {
	for _, r := range rounds {
		var d []time.Duration
		for _, s := range r {
			d = append(d, pick(s))
		}
		all = append(all, d...)
		first = append(first, slices.Min(d))
		last = append(last, slices.Max(d))
	}
	return all, first, last
}

// BenchmarkFailover reports the median and p90 time from SIGKILL of the
// leader to the next successful call on a survivor, b.N kills.
func BenchmarkFailover(b *testing.B) {
	all, _, _ := failoverFigures(measureFailover(b, b.N), func(s failoverSample) time.Duration { return s.success })
	b.ReportMetric(float64(percentile(all, 50))/1e6, "ms-median")
	b.ReportMetric(float64(percentile(all, 90))/1e6, "ms-p90")
	b.ReportMetric(0, "ns/op")
}

// measureFailover kills the leader of three processes rounds times and
// returns what each survivor saw of each kill.
func measureFailover(t testing.TB, rounds int) [][]failoverSample {
	port := freePort(t)
	spec := childSpec{Port: port, ResponseMS: 5000}
	var kids []*child
	for range 3 {
		kids = append(kids, startChild(t, spec))
	}
	for _, k := range kids {
		k.ready(20 * time.Second)
	}
	var lat [][]failoverSample
	for round := range rounds {
		li := -1
		for i, k := range kids {
			if k.do(msg{"op": "status"}, 10*time.Second)["leader"] == true {
				li = i
			}
		}
		if li < 0 {
			t.Fatalf("round %d: no leader", round)
		}
		old := kids[li]
		surv := slices.Delete(slices.Clone(kids), li, li+1)
		var replies []<-chan msg
		for _, k := range surv {
			replies = append(replies, k.send(msg{"op": "failover", "old": old.pid}))
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			m := old.do(msg{"op": "invoke", "method": "sleeping"}, 10*time.Second)
			if m["result"] == float64(len(surv)) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("round %d: calls not in flight on the leader: %v", round, m)
			}
			time.Sleep(time.Millisecond)
		}
		killed := time.Now()
		old.kill()
		var r []failoverSample
		for i, ch := range replies {
			var m msg
			select {
			case m = <-ch:
			case <-time.After(15 * time.Second):
				t.Fatalf("round %d: %v: no failover report", round, surv[i])
			}
			if e, ok := m["err"]; ok {
				t.Fatalf("round %d: %v: %v", round, surv[i], e)
			}
			first, _ := m["first"].(map[string]any)
			if first["lost"] != true {
				t.Errorf("round %d: %v: call in flight failed with %v, want ErrLeaderLost", round, surv[i], first)
			}
			if m["failed"] != float64(1) {
				t.Errorf("round %d: %v: %v calls failed, want only the one in flight; later errors %v", round, surv[i], m["failed"], m["errs"])
			}
			at := time.Unix(0, int64(m["at"].(float64)))
			lostAt := time.Unix(0, int64(m["lostAt"].(float64)))
			r = append(r, failoverSample{lost: lostAt.Sub(killed), success: at.Sub(killed)})
		}
		lat = append(lat, r)
		kids = append(surv, startChild(t, spec))
		kids[len(kids)-1].ready(20 * time.Second)
	}
	return lat
}

// percentile returns the p-th percentile of d (nearest rank).
func percentile(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[max(i-1, 0)]
}
