//go:build race

package clusterclient

// The race detector slows CPU-bound work, such as encoding JSON, five to
// ten times; latency limits of tests stretch by raceSlowdown under it.
func init() { raceSlowdown = 5 }
