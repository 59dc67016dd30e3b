//! Following the other instances: one pub/sub subscription per process to `<prefix>:events`
//! ([`RedisStore::events`]), where the scripts publish every stock change the others care
//! about (see `crate::store::events`).
//!
//! Classic (not sharded) pub/sub: on a Redis Cluster a message published on any node reaches
//! subscribers on every node, so one subscription to any seed hears the whole cluster, and a
//! SKU's messages all come from its slot's master, in the order they happened there.
//!
//! The subscription reconnects by itself (trying the seeds in turn, backing off up to
//! [`MAX_BACKOFF`]) and is pinged every [`PING_EVERY`], so a frozen or half-open connection is
//! noticed. Each (re)subscription sends [`StoreEvent::Resync`]: messages published while it
//! was down are lost, so the follower asks the store again.

use std::time::Duration;

use futures_util::StreamExt;
use redis::Client;
use tokio::sync::mpsc;

use super::RedisStore;
use crate::store::events::StoreEvent;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often an idle subscription proves it is alive.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Events waiting for the follower; a burst beyond this waits (the subscriber stops reading,
/// Redis buffers for it).
const QUEUE: usize = 1024;

impl RedisStore {
    /// Start following the shared channel; the receiver gets every event (and a `Resync`
    /// after each (re)subscription). The subscription ends when the receiver is dropped.
    pub fn events(&self) -> mpsc::Receiver<StoreEvent> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let clients = self.shared.event_clients.clone();
        let channel = self.shared.events_channel.clone();
        let connect_timeout = self.shared.connect_timeout;
        tokio::spawn(follow(clients, channel, connect_timeout, tx));
        rx
    }
}

async fn follow(
    clients: Vec<Client>,
    channel: String,
    connect_timeout: Duration,
    tx: mpsc::Sender<StoreEvent>,
) {
    let mut backoff = FIRST_BACKOFF;
    for client in clients.iter().cycle() {
        if tx.is_closed() {
            return;
        }
        match subscribe(client, &channel, connect_timeout).await {
            Ok(pubsub) => {
                backoff = FIRST_BACKOFF;
                tracing::debug!(%channel, "following the other instances' stock events");
                if tx.send(StoreEvent::Resync).await.is_err() || listen(pubsub, &tx).await {
                    return;
                }
                tracing::warn!(%channel, "stock event subscription lost: resubscribing");
            }
            Err(e) => tracing::debug!(%channel, error = %e, "stock event subscription failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = tx.closed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn subscribe(
    client: &Client,
    channel: &str,
    connect_timeout: Duration,
) -> Result<redis::aio::PubSub, String> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(connect_timeout, attempt).await {
        Ok(Ok(pubsub)) => Ok(pubsub),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {connect_timeout:?}")),
    }
}

/// Pass messages on until the subscription fails; `true` when the follower is gone.
async fn listen(pubsub: redis::aio::PubSub, tx: &mpsc::Sender<StoreEvent>) -> bool {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return false };
                if let Some(event) = StoreEvent::parse(msg.get_payload_bytes())
                    && tx.send(event).await.is_err()
                {
                    return true;
                }
            }
            _ = ping.tick() => {
                let alive = tokio::time::timeout(PING_EVERY, sink.ping::<redis::Value>()).await;
                if !matches!(alive, Ok(Ok(_))) {
                    return false;
                }
            }
            () = tx.closed() => return true,
        }
    }
}
