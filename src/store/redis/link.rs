//! One connection to Redis, as the rest of the store sees it: a single server's multiplexed
//! connection, or a Redis Cluster connection that sends each command to the node owning its
//! keys' slot ([`Link`]), and how either is opened ([`Connector`]).
//!
//! On a cluster, redis-rs follows `MOVED`/`ASK` and refreshes its slot map, but it also resends
//! a command whose connection dropped, and a reserve that may already have run must never run
//! twice (the buyer would be told "already purchased" while a unit stays held for them). So the
//! cluster client is built with no retries of its own, and [`Link`] retries here only the
//! answers that prove the command did not run: `MOVED` (after redis-rs refreshed its map),
//! `ASK` (`ASKING` + the command on the node named), `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`,
//! `LOADING`, `READONLY`. A dropped connection stays an error, handled as on one server (a
//! reserve's lost reply is cancelled, see `reserve.rs`). Every call is bounded by the store's
//! `response_timeout` (`pool.rs`), retries included. The cluster client speaks RESP3, so a
//! node's dropped connection is announced and repaired as it happens (commands meanwhile go
//! to the shard's replica, which answers `MOVED` until promoted): connections that were idle
//! through a failover do not each cost a buyer a 503 to find the old master gone.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::SingleNodeRoutingInfo;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, Pipeline, RedisFuture, RedisResult,
    ServerErrorKind, Value,
};

/// Pause before retrying a redirected or refused command: long enough for redis-rs to
/// refresh its slot map, short against a buyer's wait. Doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(2);
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// How a pool slot opens its connection.
#[derive(Clone)]
pub(super) enum Connector {
    Node(Client, AsyncConnectionConfig),
    Cluster(ClusterClient),
}

impl Connector {
    pub(super) async fn connect(&self) -> RedisResult<Link> {
        match self {
            Connector::Node(client, config) => client
                .get_multiplexed_async_connection_with_config(config)
                .await
                .map(Link::Node),
            Connector::Cluster(client) => client.get_async_connection().await.map(Link::Cluster),
        }
    }

    /// A cluster connection repairs itself node by node (reconnects, slot map refreshes); a
    /// single server's connection that failed is replaced whole.
    pub(super) fn replace_on_failure(&self) -> bool {
        matches!(self, Connector::Node(..))
    }
}

/// A connection to one server or to a cluster; cheap to clone (both are handles to a
/// multiplexed connection driven by a task of their own).
#[derive(Clone)]
pub(super) enum Link {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Node(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => Box::pin(cluster_command(c, cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => Box::pin(async move {
                let mut pause = FIRST_PAUSE;
                loop {
                    match c.req_packed_commands(pipeline, offset, count).await {
                        // Our pipelines touch one slot; a redirect or refusal means none ran.
                        Err(e) if did_not_run(&e) => wait(&mut pause).await,
                        reply => return reply,
                    }
                }
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Node(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

/// One command on a cluster, following redirects and waiting out refusals (see the module
/// docs); the caller's timeout bounds the loop.
async fn cluster_command(c: &mut ClusterConnection, cmd: &Cmd) -> RedisResult<Value> {
    let mut pause = FIRST_PAUSE;
    let mut reply = c.req_packed_command(cmd).await;
    loop {
        match reply {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::Ask) => {
                // The slot is migrating and this key has moved already: ask the new node,
                // once, in the same breath.
                let Some((host, port)) = e.redirect_node() else {
                    return Err(e);
                };
                let route = SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port,
                };
                let mut pipe = redis::pipe();
                pipe.cmd("ASKING").add_command(cmd.clone());
                reply = c
                    .route_pipeline(pipe, 1, 1, route)
                    .await
                    .and_then(|mut replies| replies.pop().ok_or_else(no_reply));
            }
            Err(e) if did_not_run(&e) => {
                wait(&mut pause).await;
                reply = c.req_packed_command(cmd).await;
            }
            reply => return reply,
        }
    }
}

/// Answers that prove the command was not executed, so sending it again is safe.
fn did_not_run(e: &redis::RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::BusyLoading
                | ServerErrorKind::ReadOnly
        )
    )
}

async fn wait(pause: &mut Duration) {
    tokio::time::sleep(*pause).await;
    *pause = (*pause * 2).min(MAX_PAUSE);
}

fn no_reply() -> redis::RedisError {
    redis::RedisError::from((ErrorKind::Client, "ASKING pipeline returned no reply"))
}
