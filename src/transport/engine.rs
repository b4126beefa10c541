//! Our receiving end of one AMQP 1.0 connection: the connection, its one session and its one
//! receiver link, driven from the caller's task with fe2o3-amqp's types and codec on the wire.
//!
//! fe2o3-amqp's own client runs a task for the connection and one for the session, and passes
//! every frame through channels between them and the link; with 64 connections that hand-off
//! cost more than everything else together (bench/README.md, "Where the time goes"). Here a
//! delivery goes from the read buffer to the caller in the same poll, settlements are sent as
//! ranges, and credit is topped up so that unsettled deliveries plus credit never exceed the
//! configured credit.
//!
//! Every read and write makes progress in `self`, so [`Receiver::recv`] and
//! [`Receiver::flush`] are cancel-safe: a partly written frame is finished by the next call.

use std::collections::HashSet;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use fe2o3_amqp::frames::amqp::FrameBody;
use fe2o3_amqp::frames::sasl;
use fe2o3_amqp::types::definitions::{self, AmqpError, ReceiverSettleMode, Role, SenderSettleMode};
use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
use fe2o3_amqp::types::messaging::{
    Accepted, Body, DeliveryState, Message, Rejected, Released, Source, Target,
};
use fe2o3_amqp::types::performatives::{
    Attach, Begin, Close, Detach, Disposition, End, Flow, Open,
};
use fe2o3_amqp::types::primitives::{Binary, Symbol, Value};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{timeout, Instant};

use super::frames::{self, TransferHead, AMQP_HEADER, MIN_MAX_FRAME_SIZE, SASL_HEADER, TLS_HEADER};
use super::{remote_error, LinkError, CLOSE_TIMEOUT, SEND_TIMEOUT};

/// Largest frame we accept; the .NET sample uses 8 KiB, large bodies come in several frames.
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Our session's incoming window, renewed with every Flow we send.
const INCOMING_WINDOW: u32 = 1 << 16;
/// A delivery larger than this is not kept: it is read to its end and rejected.
pub const MAX_MESSAGE_SIZE: usize = 256 * 1024 * 1024;
/// The one link's handle, and the channel of our one session.
const HANDLE: u32 = 0;
const CHANNEL: u16 = 0;
/// After a write fails, how long to keep reading for the frame that says why.
const EXPLAIN_WITHIN: Duration = Duration::from_secs(1);

/// One complete delivery.
pub struct Delivery {
    /// Its delivery-id, which settles it.
    pub id: u32,
    /// The message, or why it does not decode (it is to be rejected).
    pub message: Result<Message<Body<Value>>, String>,
}

/// A delivery whose transfer frames are still arriving.
struct Partial {
    id: u32,
    settled: bool,
    payload: BytesMut,
    oversize: bool,
}

/// What the server said in its Open.
#[derive(Debug, Clone, Copy)]
pub struct ServerOpen {
    /// Its idle-time-out in milliseconds (`None`: it advertises none).
    pub idle_time_out: Option<u32>,
}

/// One connection, its session and its receiver link, at whatever stage the handshake reached.
pub struct Receiver<Io> {
    io: Io,
    rbuf: BytesMut,
    /// Frames queued, not yet written.
    out: BytesMut,
    /// Written into `io` but not yet flushed.
    unflushed: bool,
    /// The largest frame we take: 512 bytes until the Open is agreed.
    max_frame: usize,
    last_read: Instant,
    last_write: Instant,
    /// Nothing read for this long: the peer is silent.
    silent_after: Option<Duration>,
    /// Nothing written for this long: send an empty frame.
    heartbeat: Option<Duration>,
    /// Wakes the connection for those two; see [`Receiver::read_more`].
    timer: Pin<Box<tokio::time::Sleep>>,

    /// The session's next incoming transfer-id, and transfers since our last Flow.
    next_incoming_id: u32,
    transfers_since_flow: u32,

    /// The configured credit: deliveries held plus link credit never exceed it.
    credit: u32,
    /// Our view of the sender's delivery-count.
    delivery_count: u32,
    /// The delivery-count up to which the sender may send (delivery-count + link-credit when
    /// we last sent a Flow).
    horizon: u32,
    /// Received unsettled and not yet settled by us.
    unsettled: u32,
    /// Deliveries the sender settled itself: nothing to send for them.
    presettled: HashSet<u32>,
    partial: Option<Partial>,
    next_delivery_id: u32,
}

impl<Io> std::fmt::Debug for Receiver<Io> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("credit", &self.credit)
            .field("unsettled", &self.unsettled)
            .finish_non_exhaustive()
    }
}

fn io_lost(e: &std::io::Error) -> LinkError {
    LinkError::Lost(e.to_string())
}

fn frame_error(e: frames::FrameError) -> LinkError {
    LinkError::Protocol(e.to_string())
}

/// The error a Detach, End or Close carries, as what ended the link.
fn closed(what: &'static str, error: Option<definitions::Error>) -> LinkError {
    match error {
        Some(e) => remote_error(what, &e),
        None => LinkError::RemoteClosedCleanly(what),
    }
}

fn header_mismatch(h: [u8; 8]) -> LinkError {
    let words = match h {
        AMQP_HEADER => " (AMQP without SASL)",
        TLS_HEADER => " (AMQP's own TLS upgrade)",
        _ => "",
    };
    LinkError::Protocol(format!(
        "the server answered with an unexpected protocol header {h:?}{words}"
    ))
}

fn frame_name(body: &FrameBody) -> &'static str {
    match body {
        FrameBody::Open(_) => "Open",
        FrameBody::Begin(_) => "Begin",
        FrameBody::Attach(_) => "Attach",
        FrameBody::Flow(_) => "Flow",
        FrameBody::Transfer { .. } => "Transfer",
        FrameBody::Disposition(_) => "Disposition",
        FrameBody::Detach(_) => "Detach",
        FrameBody::End(_) => "End",
        FrameBody::Close(_) => "Close",
        FrameBody::Empty => "empty",
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin> Receiver<Io> {
    /// A connection over `io` (TLS already done), before the SASL header.
    pub fn new(io: Io, credit: u32) -> Self {
        let now = Instant::now();
        Receiver {
            io,
            rbuf: BytesMut::with_capacity(64 * 1024),
            out: BytesMut::with_capacity(4096),
            unflushed: false,
            max_frame: MIN_MAX_FRAME_SIZE,
            last_read: now,
            last_write: now,
            silent_after: None,
            heartbeat: None,
            timer: Box::pin(tokio::time::sleep_until(far_future())),
            next_incoming_id: 0,
            transfers_since_flow: 0,
            credit: credit.max(1),
            delivery_count: 0,
            horizon: 0,
            unsettled: 0,
            presettled: HashSet::new(),
            partial: None,
            next_delivery_id: 0,
        }
    }

    /// The stream underneath (for the TLS details `check` shows).
    pub fn io(&self) -> &Io {
        &self.io
    }

    // ---- handshake: each step has no deadline of its own; the caller bounds them ----------

    /// SASL PLAIN. A refused login is [`LinkError::LoginRejected`].
    pub async fn sasl_plain(
        &mut self,
        hostname: &str,
        username: &str,
        password: &str,
    ) -> Result<(), LinkError> {
        self.out.extend_from_slice(&SASL_HEADER);
        self.flush_now().await?;
        let header = self.read_header().await?;
        if header != SASL_HEADER {
            return Err(header_mismatch(header));
        }
        match self.read_sasl().await? {
            sasl::Frame::Mechanisms(_) => {}
            other => return Err(unexpected_sasl(&other)),
        }
        let mut response = Vec::with_capacity(2 + username.len() + password.len());
        response.push(0);
        response.extend_from_slice(username.as_bytes());
        response.push(0);
        response.extend_from_slice(password.as_bytes());
        let init = SaslInit {
            mechanism: Symbol::from("PLAIN"),
            initial_response: Some(Binary::from(response)),
            hostname: Some(hostname.to_string()),
        };
        frames::put_sasl(&mut self.out, sasl::Frame::Init(init));
        let sent = self.flush_now().await;
        // The frame held the password: do not keep it in the buffer's spare capacity.
        self.out = BytesMut::with_capacity(4096);
        sent?;
        match self.read_sasl().await? {
            sasl::Frame::Outcome(o) if o.code == SaslCode::Ok => Ok(()),
            sasl::Frame::Outcome(o) => Err(LinkError::LoginRejected {
                detail: format!("SASL outcome {:?}", o.code),
            }),
            other => Err(unexpected_sasl(&other)),
        }
    }

    /// The AMQP header and Open. `idle_time_out` goes into the Open exactly; the peer counts
    /// as silent after twice that.
    pub async fn open(
        &mut self,
        container_id: &str,
        hostname: &str,
        idle_time_out: Duration,
    ) -> Result<ServerOpen, LinkError> {
        let idle_ms = u32::try_from(idle_time_out.as_millis()).unwrap_or(u32::MAX);
        self.out.extend_from_slice(&AMQP_HEADER);
        let open = Open {
            container_id: container_id.to_string(),
            hostname: Some(hostname.to_string()),
            max_frame_size: MAX_FRAME_SIZE.into(),
            channel_max: 0.into(),
            idle_time_out: (idle_ms > 0).then_some(idle_ms),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        frames::put_amqp(&mut self.out, CHANNEL, &open);
        self.flush_now().await?;
        let header = self.read_header().await?;
        if header != AMQP_HEADER {
            return Err(header_mismatch(header));
        }
        let server = loop {
            match self.read_frame().await? {
                FrameBody::Open(open) => break open,
                FrameBody::Close(c) => return Err(closed("connection", c.error)),
                FrameBody::Empty => {}
                other => return Err(unexpected("the server's Open", &other)),
            }
        };
        self.max_frame = MAX_FRAME_SIZE as usize;
        let server_idle = server.idle_time_out.filter(|ms| *ms > 0);
        let advertised = server.idle_time_out;
        if idle_ms > 0 {
            self.silent_after = Some(Duration::from_millis(u64::from(idle_ms) * 2));
        }
        // Heard from within the shorter of the two idle-time-outs, at half of it: the server's
        // rule, and ours for servers that advertise none but still drop quiet clients.
        let beat = [server_idle, (idle_ms > 0).then_some(idle_ms)]
            .into_iter()
            .flatten()
            .min();
        self.heartbeat = beat.map(|ms| Duration::from_millis(u64::from(ms / 2).max(1)));
        Ok(ServerOpen {
            idle_time_out: advertised,
        })
    }

    /// Begins the session.
    pub async fn begin(&mut self) -> Result<(), LinkError> {
        let begin = Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: INCOMING_WINDOW,
            outgoing_window: INCOMING_WINDOW,
            handle_max: HANDLE.into(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        frames::put_amqp(&mut self.out, CHANNEL, &begin);
        self.flush_now().await?;
        loop {
            match self.read_frame().await? {
                FrameBody::Begin(b) => {
                    self.next_incoming_id = b.next_outgoing_id;
                    return Ok(());
                }
                FrameBody::End(e) => return Err(closed("session", e.error)),
                FrameBody::Close(c) => return Err(closed("connection", c.error)),
                FrameBody::Empty | FrameBody::Flow(_) => {}
                other => return Err(unexpected("the server's Begin", &other)),
            }
        }
    }

    /// Attaches the receiver link on `source` and grants the credit.
    pub async fn attach(&mut self, name: &str, source: &str) -> Result<(), LinkError> {
        let attach = Attach {
            name: name.to_string(),
            handle: HANDLE.into(),
            role: Role::Receiver,
            snd_settle_mode: SenderSettleMode::Mixed,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: Some(Box::new(Source::builder().address(source).build())),
            target: Some(Box::new(Target::builder().build().into())),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: None,
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        frames::put_amqp(&mut self.out, CHANNEL, &attach);
        self.flush_now().await?;
        let mut refused = false;
        loop {
            match self.read_frame().await? {
                // A refused link is attached without a source and detached at once (with the
                // reason, if any).
                FrameBody::Attach(a) if a.source.is_none() => refused = true,
                FrameBody::Attach(a) => {
                    // The sender's count starts where it says (0 unless it resumes).
                    self.delivery_count = a.initial_delivery_count.unwrap_or(0);
                    break;
                }
                FrameBody::Detach(d) => {
                    return Err(match d.error {
                        Some(e) => remote_error("link", &e),
                        None if refused => LinkError::RemoteClosed {
                            what: "link",
                            condition: "refused".into(),
                            description: format!(": no source `{source}` on the server"),
                        },
                        None => LinkError::RemoteClosedCleanly("link"),
                    })
                }
                FrameBody::End(e) => return Err(closed("session", e.error)),
                FrameBody::Close(c) => return Err(closed("connection", c.error)),
                FrameBody::Empty | FrameBody::Flow(_) | FrameBody::Disposition(_) => {}
                other => return Err(unexpected("the server's Attach", &other)),
            }
        }
        self.put_flow();
        self.flush_now().await
    }

    // ---- receiving ---------------------------------------------------------------------------

    /// The next delivery: from what is already read, else after reading more. Sends the
    /// heartbeat when due and reports a silent peer. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Delivery, LinkError> {
        loop {
            if let Some(d) = self.try_recv()? {
                return Ok(d);
            }
            self.read_more().await?;
        }
    }

    /// Keeps the connection alive while the caller cannot take deliveries: writes what is
    /// queued, sends heartbeats, and reads into the buffer (frames are handled on the next
    /// [`Receiver::recv`]); returns only when the connection fails. Cancel-safe.
    pub async fn keep_alive(&mut self) -> LinkError {
        loop {
            if let Err(e) = self.read_more().await {
                // A Close (or End, Detach) read meanwhile says why better than the EOF.
                return self.said_in_buffer().unwrap_or(e);
            }
        }
    }

    /// The next delivery among the frames already read, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<Delivery>, LinkError> {
        while let Some(frame) =
            frames::split_frame(&mut self.rbuf, self.max_frame).map_err(frame_error)?
        {
            let delivered = match frames::quick_transfer(&frame) {
                Some((head, at)) => self.on_transfer(head, &frame[at..]),
                None => {
                    let body = frames::decode_amqp(frame).map_err(frame_error)?.body;
                    self.on_frame(body)?
                }
            };
            if let Some(d) = delivered {
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    /// Link credit the sender has now.
    pub fn credit(&self) -> u32 {
        let left = self.horizon.wrapping_sub(self.delivery_count);
        // A sender that counted past what we granted leaves nothing.
        if left > self.credit {
            0
        } else {
            left
        }
    }

    /// Accepts these deliveries (settled at once: Aliyun's "at least once").
    pub fn accept(&mut self, ids: &mut [u32]) {
        self.settle(ids, DeliveryState::Accepted(Accepted {}));
    }

    /// Releases these deliveries: the server sends them again.
    pub fn release(&mut self, ids: &mut [u32]) {
        self.settle(ids, DeliveryState::Released(Released {}));
    }

    /// Rejects one delivery with `amqp:decode-error` and the reason.
    pub fn reject(&mut self, id: u32, reason: String) {
        let error = definitions::Error::new(AmqpError::DecodeError, Some(reason), None);
        self.settle(
            &mut [id],
            DeliveryState::Rejected(Rejected { error: Some(error) }),
        );
    }

    /// Writes what is queued, within [`SEND_TIMEOUT`]. A failed write reports what the
    /// server said before it went, when it said something. Cancel-safe.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        if self.out.is_empty() && !self.unflushed {
            return Ok(());
        }
        // Usually the socket takes it all at once: no timer needed for that.
        let first = poll_fn(|cx| Poll::Ready(self.poll_write_out(cx))).await;
        match first {
            Poll::Ready(Ok(())) => return Ok(()),
            Poll::Ready(Err(e)) => return Err(self.explain(e).await),
            Poll::Pending => {}
        }
        match timeout(SEND_TIMEOUT, self.flush_now()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.explain(e).await),
            Err(_) => Err(LinkError::Timeout {
                step: "sending settlements",
                after: SEND_TIMEOUT,
            }),
        }
    }

    /// Detaches the link, ends the session and closes the connection, one after the other,
    /// waiting for each answer within [`CLOSE_TIMEOUT`]; returns what did not go well, in
    /// words. (One step at a time: a server may drop what it has not yet settled on its side
    /// when the Close arrives, so the link and session end first.)
    pub async fn close(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        // Which of detach, end and close the server has answered (a Close answers all).
        let mut answered = [false; 3];
        for step in 0..3 {
            if answered[step] {
                continue;
            }
            let name = ["detach", "end", "close"][step];
            match step {
                0 => frames::put_amqp(
                    &mut self.out,
                    CHANNEL,
                    &Detach {
                        handle: HANDLE.into(),
                        closed: true,
                        error: None,
                    },
                ),
                1 => frames::put_amqp(&mut self.out, CHANNEL, &End { error: None }),
                _ => frames::put_amqp(&mut self.out, CHANNEL, &Close { error: None }),
            }
            let waited = timeout(CLOSE_TIMEOUT, async {
                self.flush_now().await?;
                while !answered[step] {
                    match self.next_frame().await? {
                        FrameBody::Detach(d) => {
                            answered[0] = true;
                            note_error(&mut problems, "detach", "link", d.error);
                        }
                        FrameBody::End(e) => {
                            answered[..2].fill(true);
                            note_error(&mut problems, "end", "session", e.error);
                        }
                        FrameBody::Close(c) => {
                            answered = [true; 3];
                            note_error(&mut problems, "close", "connection", c.error);
                        }
                        _ => {}
                    }
                }
                Ok::<(), LinkError>(())
            })
            .await;
            match waited {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    problems.push(format!("{name}: {e}"));
                    break;
                }
                Err(_) => {
                    problems.push(format!("{name}: no answer within {CLOSE_TIMEOUT:?}"));
                    break;
                }
            }
        }
        let _ = timeout(
            CLOSE_TIMEOUT,
            tokio::io::AsyncWriteExt::shutdown(&mut self.io),
        )
        .await;
        problems
    }

    // ---- frames ------------------------------------------------------------------------------

    /// Handles one frame of an attached link; a complete delivery is returned.
    fn on_frame(&mut self, body: FrameBody) -> Result<Option<Delivery>, LinkError> {
        match body {
            FrameBody::Transfer {
                performative,
                payload,
            } => Ok(self.on_transfer(TransferHead::from(&performative), &payload)),
            FrameBody::Flow(flow) => {
                self.on_flow(&flow);
                Ok(None)
            }
            FrameBody::Disposition(_) | FrameBody::Empty => Ok(None),
            FrameBody::Detach(d) => Err(closed("link", d.error)),
            FrameBody::End(e) => Err(closed("session", e.error)),
            FrameBody::Close(c) => Err(closed("connection", c.error)),
            other => Err(unexpected("an attached link", &other)),
        }
    }

    fn on_transfer(&mut self, t: TransferHead, payload: &[u8]) -> Option<Delivery> {
        self.next_incoming_id = self.next_incoming_id.wrapping_add(1);
        self.transfers_since_flow += 1;
        if self.transfers_since_flow >= INCOMING_WINDOW / 2 {
            self.put_flow();
        }
        let mut partial = match self.partial.take() {
            Some(p) => p,
            None => {
                // The first frame of a delivery: it takes one credit.
                let id = t.delivery_id.unwrap_or(self.next_delivery_id);
                self.next_delivery_id = id.wrapping_add(1);
                self.delivery_count = self.delivery_count.wrapping_add(1);
                if !t.more && !t.aborted {
                    // One frame, the usual case: no copy.
                    return Some(self.delivered(id, t.settled == Some(true), payload));
                }
                Partial {
                    id,
                    settled: false,
                    payload: BytesMut::new(),
                    oversize: false,
                }
            }
        };
        if t.aborted {
            // Abandoned by the sender: nothing to settle, but its credit is gone.
            self.top_up();
            return None;
        }
        partial.settled |= t.settled == Some(true);
        if partial.payload.len() + payload.len() > MAX_MESSAGE_SIZE {
            partial.oversize = true;
            partial.payload = BytesMut::new();
        }
        if !partial.oversize {
            partial.payload.extend_from_slice(payload);
        }
        if t.more {
            self.partial = Some(partial);
            return None;
        }
        if partial.oversize {
            self.track(partial.id, partial.settled);
            return Some(Delivery {
                id: partial.id,
                message: Err(format!(
                    "the message is larger than {} MiB",
                    MAX_MESSAGE_SIZE >> 20
                )),
            });
        }
        Some(self.delivered(partial.id, partial.settled, &partial.payload))
    }

    fn delivered(&mut self, id: u32, settled: bool, payload: &[u8]) -> Delivery {
        self.track(id, settled);
        let reader = serde_amqp::read::SliceReader::new(payload);
        Delivery {
            id,
            message: Body::<Value>::decode_message_from_reader(reader).map_err(|e| e.to_string()),
        }
    }

    fn track(&mut self, id: u32, settled: bool) {
        if settled {
            self.presettled.insert(id);
        } else {
            self.unsettled += 1;
        }
    }

    fn on_flow(&mut self, flow: &Flow) {
        if flow.handle.is_some() {
            if let Some(count) = flow.delivery_count {
                // The sender's count is the truth (it may have advanced it, e.g. on drain).
                self.delivery_count = count;
                self.top_up();
            }
        }
        if flow.echo {
            // The answer carries our state; asking for an echo back would ping-pong.
            self.put_flow();
        }
    }

    /// Queues a Disposition per run of consecutive ids, then tops up the credit.
    fn settle(&mut self, ids: &mut [u32], state: DeliveryState) {
        ids.sort_unstable();
        let mut run: Option<(u32, u32)> = None;
        for &id in ids.iter() {
            if !self.presettled.is_empty() && self.presettled.remove(&id) {
                continue;
            }
            self.unsettled = self.unsettled.saturating_sub(1);
            run = match run {
                Some((first, last)) if last.wrapping_add(1) == id => Some((first, id)),
                Some((first, last)) => {
                    self.put_disposition(first, last, &state);
                    Some((id, id))
                }
                None => Some((id, id)),
            };
        }
        if let Some((first, last)) = run {
            self.put_disposition(first, last, &state);
        }
        self.top_up();
    }

    fn put_disposition(&mut self, first: u32, last: u32, state: &DeliveryState) {
        let disposition = Disposition {
            role: Role::Receiver,
            first,
            last: (last != first).then_some(last),
            settled: true,
            state: Some(state.clone()),
            batchable: false,
        };
        frames::put_amqp(&mut self.out, CHANNEL, &disposition);
    }

    /// Grants more credit once a quarter of the configured credit (at least one) can be given
    /// back, or when the sender has none left.
    fn top_up(&mut self) {
        let room = self.credit.saturating_sub(self.held());
        let left = self.credit();
        if room > left && (room - left >= (self.credit / 4).max(1) || left == 0) {
            self.put_flow();
        }
    }

    /// Deliveries received and not yet settled by us, pre-settled ones the caller has not
    /// finished with, and one still arriving: what the credit must leave room for.
    fn held(&self) -> u32 {
        self.unsettled + self.presettled.len() as u32 + u32::from(self.partial.is_some())
    }

    /// Queues a Flow carrying the session's window and the link's credit (as much as the
    /// unsettled deliveries leave room for).
    fn put_flow(&mut self) {
        let credit = self.credit.saturating_sub(self.held());
        self.horizon = self.delivery_count.wrapping_add(credit);
        self.transfers_since_flow = 0;
        let flow = Flow {
            next_incoming_id: Some(self.next_incoming_id),
            incoming_window: INCOMING_WINDOW,
            next_outgoing_id: 0,
            outgoing_window: INCOMING_WINDOW,
            handle: Some(HANDLE.into()),
            delivery_count: Some(self.delivery_count),
            link_credit: Some(credit),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        };
        frames::put_amqp(&mut self.out, CHANNEL, &flow);
    }

    // ---- I/O ---------------------------------------------------------------------------------

    /// Writes and flushes everything queued (no deadline of its own).
    async fn flush_now(&mut self) -> Result<(), LinkError> {
        poll_fn(|cx| self.poll_write_out(cx)).await
    }

    /// Reads at least once more, writing what is queued meanwhile; sends the heartbeat when
    /// due; fails when the peer has been silent too long.
    async fn read_more(&mut self) -> Result<(), LinkError> {
        // One timer per connection, moved only to an earlier deadline: reads and writes push
        // the real deadlines later, so a timer that fires early is re-armed, not a timer set
        // and cancelled on every read.
        if let Some(due) = self.next_deadline() {
            if due < self.timer.deadline() {
                self.timer.as_mut().reset(due);
            }
        }
        let timer_fired = poll_fn(|cx| {
            if let Poll::Ready(r) = self.poll_io(cx) {
                return Poll::Ready(r.map(|()| false));
            }
            match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Ok(true)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await?;
        if timer_fired {
            let now = Instant::now();
            if let Some(after) = self.silent_after {
                if now >= self.last_read + after {
                    return Err(LinkError::Silent(after));
                }
            }
            if let Some(every) = self.heartbeat {
                if now >= self.last_write + every {
                    if self.out.is_empty() {
                        frames::put_empty(&mut self.out);
                    }
                    // Counts as written now: the write itself happens in the next poll.
                    self.last_write = now;
                }
            }
            let next = self.next_deadline().unwrap_or_else(far_future);
            self.timer.as_mut().reset(next);
        }
        Ok(())
    }

    /// The earlier of the silent-peer deadline and the heartbeat's.
    fn next_deadline(&self) -> Option<Instant> {
        let silent_at = self.silent_after.map(|d| self.last_read + d);
        let beat_at = self.heartbeat.map(|d| self.last_write + d);
        match (silent_at, beat_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LinkError>> {
        while !self.out.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(LinkError::Lost(
                        "the connection took no more bytes".into(),
                    )))
                }
                Poll::Ready(Ok(n)) => {
                    self.out.advance(n);
                    self.unflushed = true;
                    self.last_write = Instant::now();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(io_lost(&e))),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.unflushed {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(io_lost(&e))),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Makes write progress, and is ready once a read brought bytes.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LinkError>> {
        if let Poll::Ready(Err(e)) = self.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        self.poll_read(cx)
    }

    /// Reads what is there into the buffer; ready once bytes came (or EOF, an error).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LinkError>> {
        if self.rbuf.capacity() - self.rbuf.len() < 16 * 1024 {
            self.rbuf.reserve(64 * 1024);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(LinkError::Lost(
                "the server closed the connection without an AMQP close".into(),
            ))),
            Poll::Ready(Ok(_)) => {
                self.last_read = Instant::now();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(io_lost(&e))),
            Poll::Pending => Poll::Pending,
        }
    }

    async fn read_header(&mut self) -> Result<[u8; 8], LinkError> {
        loop {
            if let Some(h) = frames::split_header(&mut self.rbuf) {
                return Ok(h);
            }
            self.read_more().await?;
        }
    }

    async fn read_sasl(&mut self) -> Result<sasl::Frame, LinkError> {
        loop {
            if let Some(f) =
                frames::split_frame(&mut self.rbuf, self.max_frame).map_err(frame_error)?
            {
                return frames::decode_sasl(f).map_err(frame_error);
            }
            self.read_more().await?;
        }
    }

    /// The next frame, whatever it is (handshake and close).
    async fn next_frame(&mut self) -> Result<FrameBody, LinkError> {
        loop {
            if let Some(f) =
                frames::split_frame(&mut self.rbuf, self.max_frame).map_err(frame_error)?
            {
                return Ok(frames::decode_amqp(f).map_err(frame_error)?.body);
            }
            self.read_more().await?;
        }
    }

    /// The next frame that is not a heartbeat (handshake).
    async fn read_frame(&mut self) -> Result<FrameBody, LinkError> {
        loop {
            match self.next_frame().await? {
                FrameBody::Empty => {}
                body => return Ok(body),
            }
        }
    }

    /// A write failed: the server may have said why just before (a Close with the cloud's
    /// error code, say). Reads briefly for that; else the write's own error stands.
    async fn explain(&mut self, failed: LinkError) -> LinkError {
        let said = timeout(EXPLAIN_WITHIN, async {
            loop {
                if let Some(e) = self.said_in_buffer() {
                    return e;
                }
                if let Err(e) = poll_fn(|cx| self.poll_read(cx)).await {
                    return e;
                }
            }
        })
        .await;
        match said {
            Ok(
                e @ (LinkError::RemoteClosed { .. }
                | LinkError::RemoteClosedCleanly(_)
                | LinkError::LoginRejected { .. }),
            ) => e,
            _ => failed,
        }
    }

    /// The connection-ending frame among those already read, if any (the deliveries before
    /// it are dropped unsettled: the server sends them again).
    fn said_in_buffer(&mut self) -> Option<LinkError> {
        loop {
            match self.try_recv() {
                Ok(Some(_unsettled)) => continue,
                Ok(None) => return None,
                Err(e) => return Some(e),
            }
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

fn note_error(
    problems: &mut Vec<String>,
    step: &str,
    what: &'static str,
    error: Option<definitions::Error>,
) {
    if let Some(e) = error {
        problems.push(format!("{step}: {}", remote_error(what, &e)));
    }
}

fn unexpected(waiting_for: &str, body: &FrameBody) -> LinkError {
    LinkError::Protocol(format!(
        "unexpected {} frame while waiting for {waiting_for}",
        frame_name(body)
    ))
}

fn unexpected_sasl(frame: &sasl::Frame) -> LinkError {
    let name = match frame {
        sasl::Frame::Mechanisms(_) => "mechanisms",
        sasl::Frame::Init(_) => "init",
        sasl::Frame::Challenge(_) => "challenge",
        sasl::Frame::Response(_) => "response",
        sasl::Frame::Outcome(_) => "outcome",
    };
    LinkError::Protocol(format!("unexpected SASL {name} frame"))
}
