//! The subscriber connection: one task owns it, serves subscription
//! changes in order, delivers what arrives, and reconnects.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{COMMAND_TIMEOUT, MAX_BACKOFF, SUBSCRIBE_BATCH, Shared, SyncRequest};
use crate::{metrics as m, relay::RelayError};

/// Owns the subscriber connection: connects, re-subscribes, serves
/// subscription changes, and starts over when the connection is lost.
pub(super) async fn run_subscriber(
    shared: Arc<Shared>,
    mut control: mpsc::UnboundedReceiver<SyncRequest>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut down_since: Option<Instant> = Some(Instant::now());
    let mut first = true;
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        match connect(&shared).await {
            Ok((sink, stream, subscribed)) => {
                backoff = Duration::from_millis(100);
                shared.set_subscriber(Ok(()));
                if let Some(since) = down_since.take() {
                    let took = since.elapsed();
                    if first {
                        tracing::info!(node = shared.hub.node_tag(), "connected to Redis");
                    } else {
                        metrics::gauge!(m::RELAY_RECOVERY_SECONDS).set(took.as_secs_f64());
                        metrics::histogram!(m::RELAY_OUTAGE_SECONDS).record(took.as_secs_f64());
                        tracing::info!(
                            recovery_ms = took.as_millis() as u64,
                            topics = subscribed.len(),
                            "Redis relay recovered: every topic re-subscribed"
                        );
                    }
                }
                first = false;
                let mut dispatcher = tokio::spawn(dispatch(shared.clone(), stream));
                let reason = serve(&shared, sink, subscribed, &mut control, &mut dispatcher).await;
                shared.confirmed.lock().clear();
                // Make sure the old connection's dispatcher has stopped
                // before a new one subscribes, or messages would arrive
                // twice or out of order.
                dispatcher.abort();
                if !dispatcher.is_finished() {
                    let _ = dispatcher.await;
                }
                if shared.stop.is_cancelled() {
                    return;
                }
                metrics::counter!(m::RELAY_RECONNECTS).increment(1);
                tracing::warn!(%reason, "Redis subscriber connection lost; reconnecting");
                shared.set_subscriber(Err(format!("Redis subscriber down: {reason}")));
                down_since = Some(Instant::now());
            }
            Err(e) => {
                shared.set_subscriber(Err(format!("cannot reach Redis: {e}")));
                tracing::debug!(error = %e, ?backoff, "Redis connect failed");
                let wait = tokio::time::sleep(backoff);
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        _ = &mut wait => break,
                        _ = shared.stop.cancelled() => return,
                        req = control.recv() => match req {
                            Some(req) => answer_while_down(&shared, req),
                            None => return,
                        },
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Without a subscriber connection nothing can be subscribed: a request
/// that needs a channel fails; one that only releases channels succeeds
/// (the next connection subscribes only what the hub needs).
fn answer_while_down(shared: &Shared, req: SyncRequest) {
    let needs = req.topics.iter().any(|t| shared.hub.has_topic(t));
    let _ = req.done.send(if needs {
        Err(RelayError::Unavailable(
            shared
                .subscriber
                .lock()
                .clone()
                .err()
                .unwrap_or_else(|| "Redis unavailable".into()),
        ))
    } else {
        Ok(())
    });
}

/// A new subscriber connection, subscribed to this node's channel and to
/// every topic the hub has now.
async fn connect(shared: &Shared) -> Result<(PubSubSink, PubSubStream, HashSet<Arc<str>>), String> {
    let pubsub = tokio::time::timeout(COMMAND_TIMEOUT, shared.client.get_async_pubsub())
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let (mut sink, stream) = pubsub.split();
    subscribe(&mut sink, vec![shared.node_channel.clone()]).await?;
    let topics = shared.hub.topics();
    for chunk in topics.chunks(SUBSCRIBE_BATCH) {
        let names = chunk.iter().map(|t| shared.topic_channel(t)).collect();
        subscribe(&mut sink, names).await?;
    }
    let subscribed: HashSet<Arc<str>> = topics.into_iter().collect();
    *shared.confirmed.lock() = subscribed.clone();
    *shared.reconnect.lock() = CancellationToken::new();
    Ok((sink, stream, subscribed))
}

async fn subscribe(sink: &mut PubSubSink, channels: Vec<String>) -> Result<(), String> {
    tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(channels))
        .await
        .map_err(|_| "SUBSCRIBE timed out".to_owned())?
        .map_err(|e| e.to_string())
}

async fn unsubscribe(sink: &mut PubSubSink, channels: Vec<String>) -> Result<(), String> {
    tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(channels))
        .await
        .map_err(|_| "UNSUBSCRIBE timed out".to_owned())?
        .map_err(|e| e.to_string())
}

/// Serve subscription changes on a live connection until it is lost.
/// Returns why it ended.
async fn serve(
    shared: &Shared,
    mut sink: PubSubSink,
    mut subscribed: HashSet<Arc<str>>,
    control: &mut mpsc::UnboundedReceiver<SyncRequest>,
    dispatcher: &mut tokio::task::JoinHandle<()>,
) -> String {
    let mut ping = tokio::time::interval(
        shared
            .config
            .heartbeat_interval
            .max(Duration::from_millis(100)),
    );
    ping.tick().await;
    let kicked = shared.reconnect.lock().clone();
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return "stopped".into(),
            _ = kicked.cancelled() => return "a publish reached no subscriber of this node".into(),
            _ = &mut *dispatcher => return "connection closed by Redis".into(),
            _ = ping.tick() => {
                let pong = tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<redis::Value>()).await;
                if !matches!(pong, Ok(Ok(_))) {
                    return "PING unanswered".into();
                }
            }
            req = control.recv() => {
                let Some(req) = req else { return "stopped".into() };
                // Take every request already waiting: one SUBSCRIBE for all.
                let mut reqs = vec![req];
                while reqs.len() < 512 {
                    match control.try_recv() {
                        Ok(r) => reqs.push(r),
                        Err(_) => break,
                    }
                }
                let topics: HashSet<Arc<str>> =
                    reqs.iter().flat_map(|r| r.topics.iter().cloned()).collect();
                let (add, remove): (Vec<Arc<str>>, Vec<Arc<str>>) = topics
                    .into_iter()
                    .filter(|t| shared.hub.has_topic(t) != subscribed.contains(t))
                    .partition(|t| shared.hub.has_topic(t));
                let mut result = Ok(());
                if !add.is_empty() {
                    result = subscribe(&mut sink, add.iter().map(|t| shared.topic_channel(t)).collect()).await;
                    if result.is_ok() {
                        shared.confirmed.lock().extend(add.iter().cloned());
                        subscribed.extend(add);
                    }
                }
                if result.is_ok() && !remove.is_empty() {
                    result = unsubscribe(&mut sink, remove.iter().map(|t| shared.topic_channel(t)).collect()).await;
                    if result.is_ok() {
                        let mut confirmed = shared.confirmed.lock();
                        for t in &remove {
                            subscribed.remove(t);
                            confirmed.remove(t);
                        }
                    }
                }
                for r in reqs {
                    let _ = r.done.send(
                        result.clone().map_err(RelayError::Unavailable),
                    );
                }
                if let Err(e) = result {
                    return e;
                }
            }
        }
    }
}

/// Delivers what arrives on one subscriber connection, in order. Ends when
/// the connection does.
async fn dispatch(shared: Arc<Shared>, mut stream: PubSubStream) {
    while let Some(msg) = stream.next().await {
        let channel = msg.get_channel_name();
        if let Some(base) = channel.strip_prefix(shared.topic_prefix.as_str()) {
            shared.deliver(base, msg.get_payload_bytes());
        } else if channel == shared.node_channel {
            shared.on_node_message(msg.get_payload_bytes());
        }
    }
}
