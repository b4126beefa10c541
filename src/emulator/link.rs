//! Per-connection link work: serving the client's sessions (one receiver link allowed, all other
//! links refused), the sender pump that feeds the receiver from the backlog, and the settle
//! loop that turns dispositions (or their absence) into backlog outcomes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fe2o3_amqp::acceptor::{LinkAcceptor, LinkEndpoint, ListenerSessionHandle};
use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::link::SendError;
use fe2o3_amqp::types::definitions::{self, AmqpError, Role};
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Data, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, LazyValue, SimpleValue};
use fe2o3_amqp::Sender;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::backlog::{Backlog, Settled, Taken};
use super::{DeviceMessage, ExtraValue};

/// Bound on link-level handshakes (attach accept, refusing detach).
const LINK_OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Outcome futures queued between the pump and the settle loop (credit bounds the rest).
pub(crate) const SETTLE_QUEUE: usize = 1024;

type Outcomes = DeliveryFut<Result<Outcome, SendError>>;

/// Serves one client session: accepts the connection's single receiver link and hands its
/// `Sender` to the connection task; refuses everything else with `amqp:not-allowed`.
pub(crate) async fn serve_session(
    mut session: ListenerSessionHandle,
    receiver_slot: Arc<AtomicBool>,
    sender_tx: mpsc::Sender<Sender>,
    refused_links: Arc<AtomicU64>,
    cancel: CancellationToken,
    peer: SocketAddr,
) {
    // The source address is ignored, like the cloud does; no source at all is fine too.
    let acceptor = LinkAcceptor::builder()
        .verify_incoming_source(false)
        .verify_incoming_target(false)
        .build();
    loop {
        let attach = tokio::select! {
            _ = cancel.cancelled() => break,
            a = session.next_incoming_attach() => match a {
                Some(a) => a,
                None => break,
            },
        };
        let name = attach.name.clone();
        let client_receives = attach.role == Role::Receiver;
        let claimed = client_receives
            && receiver_slot
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
        if claimed {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                r = tokio::time::timeout(LINK_OP_TIMEOUT, acceptor.accept_incoming_attach(attach, &mut session)) => r,
            };
            match accepted {
                Ok(Ok(LinkEndpoint::Sender(sender))) => {
                    tracing::info!(%peer, link = %name, "receiver link attached");
                    let handed = tokio::select! {
                        _ = cancel.cancelled() => false,
                        r = sender_tx.send(sender) => r.is_ok(),
                    };
                    if !handed {
                        receiver_slot.store(false, Ordering::SeqCst);
                        break;
                    }
                }
                Ok(Ok(LinkEndpoint::Receiver(_))) => {
                    receiver_slot.store(false, Ordering::SeqCst);
                }
                Ok(Err(e)) => {
                    receiver_slot.store(false, Ordering::SeqCst);
                    tracing::warn!(%peer, link = %name, error = %e, "receiver attach failed");
                }
                Err(_) => {
                    receiver_slot.store(false, Ordering::SeqCst);
                    tracing::warn!(%peer, link = %name, "receiver attach timed out");
                }
            }
            continue;
        }

        refused_links.fetch_add(1, Ordering::Relaxed);
        let reason = if client_receives {
            "only one receiver link per connection is allowed"
        } else {
            "sender links are not allowed: the platform pushes messages, clients only receive"
        };
        tracing::warn!(%peer, link = %name, reason, "link refused");
        let error = definitions::Error::new(AmqpError::NotAllowed, Some(reason.to_string()), None);
        // Complete the attach, then close it with the error: the AMQP way to refuse a link.
        let refuse = async {
            match acceptor.accept_incoming_attach(attach, &mut session).await {
                Ok(LinkEndpoint::Sender(s)) => {
                    let _ = s.close_with_error(error).await;
                }
                Ok(LinkEndpoint::Receiver(r)) => {
                    let _ = r.close_with_error(error).await;
                }
                Err(e) => tracing::debug!(%peer, error = %e, "refused attach did not complete"),
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = tokio::time::timeout(LINK_OP_TIMEOUT, refuse) => {
                if r.is_err() {
                    tracing::debug!(%peer, link = %name, "refusing the link timed out");
                }
            }
        }
    }
}

/// Why the pump stopped.
#[derive(Debug)]
pub(crate) enum PumpEnd {
    Cancelled,
    LinkGone(String),
}

/// Feeds the receiver link from the backlog. `send_batchable` waits for credit; outcomes are
/// awaited by the settle loop so up to the whole credit window is in flight.
pub(crate) async fn pump(
    mut sender: Sender,
    backlog: Arc<Backlog>,
    conn_id: u64,
    message_id_as_long: bool,
    settle_tx: mpsc::Sender<(u64, Outcomes)>,
    cancel: CancellationToken,
) -> PumpEnd {
    loop {
        let Some(mut taken) = backlog.next(conn_id, &cancel).await else {
            return PumpEnd::Cancelled;
        };
        let mut seqs = std::mem::take(&mut taken.seqs).into_iter();
        while let Some(seq) = seqs.next() {
            let sent = tokio::select! {
                _ = cancel.cancelled() => return PumpEnd::Cancelled,
                r = send_one(&mut sender, &taken, message_id_as_long) => r,
            };
            match sent {
                Ok(fut) => {
                    backlog.on_sent(seq);
                    tokio::select! {
                        _ = cancel.cancelled() => return PumpEnd::Cancelled,
                        r = settle_tx.send((seq, fut)) => if r.is_err() {
                            return PumpEnd::Cancelled;
                        },
                    }
                }
                Err(SendError::MessageSizeExceeded(e)) => {
                    // This link can never carry it; let another link try after the delay.
                    tracing::warn!(
                        message_id = %taken.msg.message_id,
                        error = %e,
                        "message larger than the receiver's max-message-size"
                    );
                    backlog.settle(seq, Settled::Undeliverable);
                    for rest in seqs.by_ref() {
                        backlog.settle(rest, Settled::Undeliverable);
                    }
                }
                Err(e) => {
                    backlog.settle(seq, Settled::Lost);
                    for rest in seqs.by_ref() {
                        backlog.settle(rest, Settled::Lost);
                    }
                    return PumpEnd::LinkGone(e.to_string());
                }
            }
        }
    }
}

/// Sends one copy of a taken message: built from its fields, or its hand-encoded sections.
async fn send_one(
    sender: &mut Sender,
    taken: &Taken,
    message_id_as_long: bool,
) -> Result<Outcomes, SendError> {
    match &taken.encoded {
        Some(sections) => sender.send_batchable(encoded_message(sections)).await,
        None => {
            sender
                .send_batchable(build_message(&taken.msg, message_id_as_long))
                .await
        }
    }
}

/// A message that serializes as `00 53 77 40` (an empty amqp-value section) followed by
/// `sections` verbatim: fe2o3 writes a `LazyValue` as its bytes, with no checks.
fn encoded_message(sections: &Bytes) -> Message<Body<LazyValue>> {
    let mut raw = Vec::with_capacity(1 + sections.len());
    raw.push(0x40); // null: the value of the amqp-value section fe2o3 opens the body with
    raw.extend_from_slice(sections);
    let lazy = LazyValue::deserialize(Verbatim(raw))
        .expect("LazyValue takes any byte buffer from a deserializer");
    Message::builder()
        .body(Body::Value(AmqpValue(lazy)))
        .build()
}

/// A deserializer that hands over its bytes as they are. `LazyValue`'s public constructors
/// only take one well-formed AMQP value; its `Deserialize` takes any byte buffer.
struct Verbatim(Vec<u8>);

impl<'de> serde::Deserializer<'de> for Verbatim {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(
        self,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_byte_buf(self.0)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

/// Awaits delivery outcomes with the ack timeout and applies them to the backlog. Ends when the
/// pump has gone and every outstanding outcome has resolved (they resolve once the link's
/// session stops, so the connection task bounds this with a timeout).
pub(crate) async fn settle_loop(
    mut rx: mpsc::Receiver<(u64, Outcomes)>,
    backlog: Arc<Backlog>,
    ack_timeout: Duration,
) {
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    loop {
        if !open && pending.is_empty() {
            break;
        }
        tokio::select! {
            item = rx.recv(), if open => match item {
                // Unconstrained: under tokio's coop budget a ready outcome can report Pending
                // and be re-queued behind later ones, which would scramble acceptance order.
                Some((seq, fut)) => pending.push(tokio::task::unconstrained(await_outcome(seq, fut, ack_timeout))),
                None => open = false,
            },
            Some(first) = pending.next(), if !pending.is_empty() => {
                // Outcomes that are ready together are applied in delivery order: the client
                // settles in order far more often than not, and FuturesUnordered does not
                // keep that order.
                let mut ready = vec![first];
                while let Some(Some(more)) = pending.next().now_or_never() {
                    ready.push(more);
                }
                ready.sort_unstable_by_key(|(seq, _)| *seq);
                for (seq, how) in ready {
                    backlog.settle(seq, how);
                }
            }
        }
    }
}

async fn await_outcome(seq: u64, fut: Outcomes, ack_timeout: Duration) -> (u64, Settled) {
    let how = match tokio::time::timeout(ack_timeout, fut).await {
        Err(_) => Settled::TimedOut,
        Ok(Ok(Outcome::Accepted(_))) => Settled::Accepted,
        Ok(Ok(Outcome::Rejected(_))) => Settled::Rejected,
        Ok(Ok(Outcome::Released(_))) => Settled::Released,
        Ok(Ok(Outcome::Modified(_))) => Settled::Modified,
        #[allow(unreachable_patterns)]
        Ok(Ok(_)) => Settled::Rejected,
        Ok(Err(_)) => Settled::Lost,
    };
    (seq, how)
}

/// The message as Aliyun pushes it: application properties `topic`, `messageId`,
/// `generateTime` (+ extras), `properties.message-id`, and the body as one Data section.
pub(crate) fn build_message(m: &DeviceMessage, message_id_as_long: bool) -> Message<Data> {
    let numeric = if message_id_as_long {
        m.message_id.parse::<i64>().ok().filter(|n| *n >= 0)
    } else {
        None
    };
    let (app_id, prop_id) = match numeric {
        Some(n) => (SimpleValue::Long(n), MessageId::Ulong(n as u64)),
        None => (
            SimpleValue::String(m.message_id.clone()),
            MessageId::String(m.message_id.clone()),
        ),
    };
    let mut props = ApplicationProperties::builder()
        .insert("topic", m.topic.clone())
        .insert("messageId", app_id)
        .insert("generateTime", m.generate_time);
    for (k, v) in &m.extra_properties {
        let v = match v {
            ExtraValue::String(s) => SimpleValue::String(s.clone()),
            ExtraValue::Long(n) => SimpleValue::Long(*n),
            ExtraValue::Int(n) => SimpleValue::Int(*n),
            ExtraValue::Bool(b) => SimpleValue::Bool(*b),
            ExtraValue::Binary(b) => SimpleValue::Binary(Binary::from(b.clone())),
        };
        props = props.insert(k.clone(), v);
    }
    Message::builder()
        .properties(Properties::builder().message_id(prop_id).build())
        .application_properties(props.build())
        .data(Binary::from(m.body.clone()))
        .build()
}
