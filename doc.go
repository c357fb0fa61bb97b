// Package clusterclient lets the processes of one host share one client of
// a remote service. One process, the leader, holds the real client: the
// connections, sessions and subscriptions to the servers. The other
// processes, the followers, forward their calls to it over TCP on
// 127.0.0.1. It speaks the wire protocol of the Node.js package
// cluster-client byte for byte, so Go and Node.js processes can share one
// client.
//
// # Roles
//
// Every process creates a [Client] with [New], giving a channel name, a
// [Config] and a [BuildFunc]. All clients of a host that use the same
// [Config.Port] (7777 by default) compete for it: the first to listen on
// 127.0.0.1:port leads every channel that its process opens on that port,
// and only there does the BuildFunc run and build the [RealClient]. The
// others dial the leader and register the channel. [Client.Ready] waits
// for either; [Client.IsLeader] tells which. [Config.Role] can force a
// role, and [Config.SingleMode] skips the cluster so that every process
// builds its own real client.
//
// # Calls
//
// [Client.Invoke] (or the generic [Invoke], which decodes the result into
// a type) runs a method of the real client with the given arguments:
// directly in the leader's process, over loopback elsewhere. Arguments and
// results are encoded with the [Codec], JSON by default; the real client
// receives each argument as a [Value], and [Methods] builds a real client
// from typed functions. An error it returns reaches the caller as a
// [*RemoteError] with the error's name, message and code (an error with an
// ErrorName() or ErrorCode() string method gives them). [Client.InvokeOneway]
// waits for no result. Each call is bounded by its context and
// [Config.ResponseTimeout].
//
// On the leader, one goroutine reads each follower connection and every
// invoke runs on a goroutine of its own, so a slow method holds up only
// its own caller; its context ends at the caller's deadline or when the
// caller's connection closes. A follower's one reader goroutine hands each
// answer to its call and each pushed value to the listeners as it
// arrives. A panic in the real client, the BuildFunc or the Codec is
// recovered on the leader and reaches the caller as a *RemoteError with
// code ERR_CLUSTER_PANIC; a panicking listener is logged in its process.
//
// # Subscriptions
//
// [Client.Subscribe] adds a listener for a registration, any value that
// encodes as JSON. The leader subscribes the real client (a [Subscriber])
// once per registration, however many listeners there are in all
// processes, and pushes every value to every process that listens (to one
// picked at random if [Config.DisableBroadcast] is set). A
// listener that joins late gets the latest value at once. Listeners of a
// client run one at a time and see the latest value: a listener still busy
// when newer values arrive gets only the newest. When the last listener
// anywhere leaves, the real client is told (an [Unsubscriber]). A Go
// leader that cannot serve a registration tells the subscribing process,
// which logs it; see [Subscription.Err].
// [Client.Publish] hands a registration to the real client (a [Publisher])
// and remembers it.
//
// # Failover
//
// When the leader dies, its followers' connections close. A call in
// flight on a follower fails with [ErrLeaderLost]: it may or may not have
// run. The followers compete for the port again; the winner builds a new
// real client. Every client then subscribes again to what its listeners
// want and publishes again what it published, and calls made meanwhile
// wait for the new leader. If none is found within [Config.MaxWaitTime],
// waiting calls fail with [ErrNoLeader] while the client keeps trying.
// [Client.Close] on a leader is a planned handover: it frees the port,
// tells its followers that it is closing, lets calls in flight finish
// (bounded by [Config.DrainTimeout]) and then closes the real client. Go
// followers hold new calls for the next leader, so none of their calls
// fails.
//
// # Security
//
// On Linux, only processes of the leader's own user may join it, and a
// follower follows only a leader of its own user: each end reads the owner
// of the other's socket from /proc/net/tcp once per connection
// ([Config.AllowUIDs] and [Config.AllowAnyUser] widen this; elsewhere the
// check is off). A registered follower can call the real client like any
// other; a process that holds the port first leads. The limits in [Config]
// bound what one connection, and all of them together, can cost the
// leader, and [Config.Secret] makes followers present a shared secret (Go
// peers only). See the README for details.
package clusterclient
