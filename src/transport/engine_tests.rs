//! The receiving end against a scripted AMQP 1.0 server on an in-memory pipe: the protocol
//! cases the emulator (fe2o3's acceptor) never produces — deliveries split over frames,
//! aborted and pre-settled deliveries, echo flows — and the exact frames the client answers
//! with (settlement ranges, the credit bound, the server's close words).

use std::time::Duration;

use bytes::BytesMut;
use fe2o3_amqp::frames::amqp::FrameBody;
use fe2o3_amqp::frames::sasl;
use fe2o3_amqp::types::definitions::{self, ConnectionError, Role};
use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
use fe2o3_amqp::types::messaging::{Body, DeliveryState, Message, Source};
use fe2o3_amqp::types::performatives::{Attach, Begin, Close, Flow, Open, Transfer};
use fe2o3_amqp::types::primitives::{Array, Symbol, Value};
use fe2o3_amqp::types::sasl::{SaslCode, SaslMechanisms, SaslOutcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::timeout;

use super::engine::Receiver;
use super::frames::{self, AMQP_HEADER, SASL_HEADER};
use super::LinkError;

const T: Duration = Duration::from_secs(5);
/// An amqp-value section holding the string "hi": a message that decodes.
const PAYLOAD: &[u8] = &[0x00, 0x53, 0x77, 0xa1, 0x02, b'h', b'i'];

/// The server's end of the pipe.
struct Peer {
    io: DuplexStream,
    buf: BytesMut,
}

impl Peer {
    async fn write(&mut self, f: impl FnOnce(&mut BytesMut)) {
        let mut out = BytesMut::new();
        f(&mut out);
        self.io.write_all(&out).await.unwrap();
    }

    async fn read_some(&mut self) {
        let n = timeout(T, self.io.read_buf(&mut self.buf))
            .await
            .expect("the client sent something in time")
            .unwrap();
        assert!(n > 0, "the client closed the pipe");
    }

    async fn header(&mut self) -> [u8; 8] {
        loop {
            if let Some(h) = frames::split_header(&mut self.buf) {
                return h;
            }
            self.read_some().await;
        }
    }

    async fn raw_frame(&mut self) -> BytesMut {
        loop {
            if let Some(f) = frames::split_frame(&mut self.buf, 1 << 20).unwrap() {
                return f;
            }
            self.read_some().await;
        }
    }

    /// The client's next frame that is not a heartbeat.
    async fn frame(&mut self) -> FrameBody {
        loop {
            match frames::decode_amqp(self.raw_frame().await).unwrap().body {
                FrameBody::Empty => {}
                body => return body,
            }
        }
    }

    async fn transfer(
        &mut self,
        id: Option<u32>,
        settled: bool,
        more: bool,
        aborted: bool,
        payload: &[u8],
    ) {
        let t = Transfer {
            handle: 0u32.into(),
            delivery_id: id,
            delivery_tag: id.map(|i| i.to_be_bytes().to_vec().into()),
            message_format: id.map(|_| 0),
            settled: settled.then_some(true),
            more,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted,
            batchable: false,
        };
        self.write(|out| {
            let start = out.len();
            frames::put_amqp(out, 0, &t);
            out.extend_from_slice(payload);
            let size = (out.len() - start) as u32;
            out[start..start + 4].copy_from_slice(&size.to_be_bytes());
        })
        .await;
    }
}

/// A client attached with `credit` to a scripted server that accepted everything; the
/// server has read the client's first Flow, whose credit is returned.
async fn attached(credit: u32) -> (Receiver<DuplexStream>, Peer, u32) {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let client = tokio::spawn(async move {
        let mut rx = Receiver::new(client_io, credit);
        rx.sasl_plain("localhost", "user", "pass").await?;
        rx.open("client", "localhost", Duration::from_secs(30))
            .await?;
        rx.begin().await?;
        rx.attach("client-receiver", "queue").await?;
        Ok::<_, LinkError>(rx)
    });
    let mut peer = Peer {
        io: server_io,
        buf: BytesMut::new(),
    };
    assert_eq!(peer.header().await, SASL_HEADER);
    peer.write(|out| {
        out.extend_from_slice(&SASL_HEADER);
        let mechanisms = SaslMechanisms {
            sasl_server_mechanisms: Array::from(vec![Symbol::from("PLAIN")]),
        };
        frames::put_sasl(out, sasl::Frame::Mechanisms(mechanisms));
    })
    .await;
    let init = frames::decode_sasl(peer.raw_frame().await).unwrap();
    assert!(matches!(init, sasl::Frame::Init(_)), "{init:?}");
    peer.write(|out| {
        let outcome = SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        };
        frames::put_sasl(out, sasl::Frame::Outcome(outcome));
    })
    .await;
    assert_eq!(peer.header().await, AMQP_HEADER);
    assert!(matches!(peer.frame().await, FrameBody::Open(_)));
    peer.write(|out| {
        out.extend_from_slice(&AMQP_HEADER);
        let open = Open {
            container_id: "server".into(),
            hostname: None,
            max_frame_size: 65_536.into(),
            channel_max: 0.into(),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        frames::put_amqp(out, 0, &open);
    })
    .await;
    assert!(matches!(peer.frame().await, FrameBody::Begin(_)));
    peer.write(|out| {
        let begin = Begin {
            remote_channel: Some(0),
            next_outgoing_id: 0,
            incoming_window: 1000,
            outgoing_window: 1000,
            handle_max: 0u32.into(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        frames::put_amqp(out, 0, &begin);
    })
    .await;
    let FrameBody::Attach(attach) = peer.frame().await else {
        panic!("no attach")
    };
    assert_eq!(attach.role, Role::Receiver);
    peer.write(|out| {
        let reply = Attach {
            role: Role::Sender,
            source: Some(Box::new(Source::builder().address("queue").build())),
            initial_delivery_count: Some(0),
            ..attach
        };
        frames::put_amqp(out, 0, &reply);
    })
    .await;
    let FrameBody::Flow(flow) = peer.frame().await else {
        panic!("no flow after attach")
    };
    let rx = timeout(T, client).await.unwrap().unwrap().unwrap();
    (rx, peer, flow.link_credit.unwrap())
}

fn one_message() -> Message<Body<Value>> {
    let reader = serde_amqp::read::SliceReader::new(PAYLOAD);
    Body::<Value>::decode_message_from_reader(reader).unwrap()
}

async fn recv(rx: &mut Receiver<DuplexStream>) -> super::engine::Delivery {
    timeout(T, rx.recv())
        .await
        .expect("a delivery in time")
        .unwrap()
}

#[tokio::test]
async fn a_delivery_split_over_frames_arrives_once_and_settlements_are_ranges() {
    let (mut rx, mut peer, credit) = attached(10).await;
    assert_eq!(credit, 10);
    peer.transfer(Some(0), false, true, false, &PAYLOAD[..3])
        .await;
    peer.transfer(None, false, true, false, &PAYLOAD[3..5])
        .await;
    peer.transfer(None, false, false, false, &PAYLOAD[5..])
        .await;
    peer.transfer(Some(1), false, false, false, PAYLOAD).await;
    peer.transfer(Some(2), false, false, false, PAYLOAD).await;
    peer.transfer(Some(4), false, false, false, PAYLOAD).await;
    for want in [0, 1, 2, 4] {
        let d = recv(&mut rx).await;
        assert_eq!(d.id, want);
        // The split one too: its three pieces make the one message, whole.
        let message = d.message.expect("decodes");
        assert_eq!(
            format!("{:?}", message.body),
            format!("{:?}", one_message().body)
        );
    }
    rx.accept(&mut [4, 1, 0, 2]);
    timeout(T, rx.flush()).await.unwrap().unwrap();
    let mut ranges = Vec::new();
    while ranges.len() < 2 {
        if let FrameBody::Disposition(d) = peer.frame().await {
            assert_eq!(d.role, Role::Receiver);
            assert!(d.settled);
            assert!(matches!(d.state, Some(DeliveryState::Accepted(_))));
            ranges.push((d.first, d.last));
        }
    }
    assert_eq!(ranges, [(0, Some(2)), (4, None)]);
}

#[tokio::test]
async fn an_aborted_delivery_is_dropped_and_its_credit_comes_back() {
    let (mut rx, mut peer, _) = attached(2).await;
    peer.transfer(Some(0), false, true, false, PAYLOAD).await;
    peer.transfer(None, false, false, true, PAYLOAD).await;
    peer.transfer(Some(1), false, true, false, PAYLOAD).await;
    peer.transfer(None, false, false, true, PAYLOAD).await;
    // Both credits went on aborted deliveries: the client must grant them again.
    let granted = timeout(T, async {
        loop {
            tokio::select! {
                d = rx.recv() => panic!("an aborted delivery was delivered: {:?}", d.map(|d| d.id)),
                f = peer.frame() => if let FrameBody::Flow(f) = f {
                    if f.link_credit.unwrap_or(0) > 0 && f.delivery_count == Some(2) {
                        return f.link_credit;
                    }
                },
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(granted, Some(2));
    peer.transfer(Some(2), false, false, false, PAYLOAD).await;
    assert_eq!(recv(&mut rx).await.id, 2);
}

#[tokio::test]
async fn a_pre_settled_delivery_gets_no_disposition() {
    let (mut rx, mut peer, _) = attached(10).await;
    peer.transfer(Some(0), true, false, false, PAYLOAD).await;
    peer.transfer(Some(1), false, false, false, PAYLOAD).await;
    assert_eq!(recv(&mut rx).await.id, 0);
    assert_eq!(recv(&mut rx).await.id, 1);
    rx.accept(&mut [0, 1]);
    timeout(T, rx.flush()).await.unwrap().unwrap();
    let disposition = loop {
        if let FrameBody::Disposition(d) = peer.frame().await {
            break d;
        }
    };
    assert_eq!((disposition.first, disposition.last), (1, None));
}

#[tokio::test]
async fn credit_never_exceeds_what_is_unsettled_plus_granted() {
    let (mut rx, mut peer, credit) = attached(5).await;
    assert_eq!(credit, 5);
    for id in 0..5 {
        peer.transfer(Some(id), false, false, false, PAYLOAD).await;
    }
    for id in 0..5 {
        assert_eq!(recv(&mut rx).await.id, id);
    }
    assert_eq!(rx.credit(), 0);
    // Two settled, three still held: two credits back, not five.
    rx.accept(&mut [0, 1]);
    timeout(T, rx.flush()).await.unwrap().unwrap();
    let flow = loop {
        if let FrameBody::Flow(f) = peer.frame().await {
            break f;
        }
    };
    assert_eq!((flow.delivery_count, flow.link_credit), (Some(5), Some(2)));
}

#[tokio::test]
async fn an_echo_flow_is_answered() {
    let (mut rx, mut peer, _) = attached(10).await;
    peer.write(|out| {
        let flow = Flow {
            next_incoming_id: Some(0),
            incoming_window: 1000,
            next_outgoing_id: 0,
            outgoing_window: 1000,
            handle: Some(0u32.into()),
            delivery_count: Some(0),
            link_credit: Some(10),
            available: Some(0),
            drain: false,
            echo: true,
            properties: None,
        };
        frames::put_amqp(out, 0, &flow);
    })
    .await;
    let answered = timeout(T, async {
        loop {
            tokio::select! {
                d = rx.recv() => panic!("no delivery was sent: {:?}", d.map(|d| d.id)),
                f = peer.frame() => if let FrameBody::Flow(f) = f {
                    return f;
                },
            }
        }
    })
    .await
    .unwrap();
    assert!(!answered.echo);
    assert_eq!(answered.link_credit, Some(10));
}

#[tokio::test]
async fn the_servers_close_is_reported_in_its_own_words() {
    let (mut rx, mut peer, _) = attached(10).await;
    peer.write(|out| {
        let error = definitions::Error::new(
            ConnectionError::ConnectionForced,
            Some("9602 test".to_string()),
            None,
        );
        frames::put_amqp(out, 0, &Close { error: Some(error) });
    })
    .await;
    drop(peer);
    match timeout(T, rx.recv()).await.unwrap() {
        Err(LinkError::RemoteClosed {
            what,
            condition,
            description,
        }) => {
            assert_eq!(what, "connection");
            assert_eq!(condition, "amqp:connection:forced");
            assert_eq!(description, ": 9602 test");
        }
        other => panic!("{:?}", other.map(|d| d.id)),
    }
}
