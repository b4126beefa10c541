//! Property tests of the paths untrusted input takes: a transfer frame through the receiving
//! end's quick reader (which must agree with fe2o3-amqp's decoder or step aside), a delivery
//! (typed, or as wire bytes decoded the way the receiving end does) through `message::decode`
//! and every output format, and config text through `config::parse`. They never panic; a
//! delivery gives a `DecodeError` or exactly one line of valid JSON whose fields round-trip;
//! config gives a profile or a one-line error.

use base64::Engine;
use fe2o3_amqp::frames::amqp::FrameBody;
use fe2o3_amqp::types::definitions::ReceiverSettleMode;
use fe2o3_amqp::types::messaging::message::__private::Serializable;
use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
use fe2o3_amqp::types::messaging::{
    AmqpSequence, AmqpValue, ApplicationProperties, Batch, Body, Data, Message, MessageId,
    Properties,
};
use fe2o3_amqp::types::performatives::Transfer;
use fe2o3_amqp::types::primitives::{
    Binary, Dec128, Dec32, Dec64, SimpleValue, Symbol, Timestamp, Uuid, Value,
};
use iot_sub::format::Format;
use iot_sub::message::{decode, write_line, BodyEncoding, BodyMode, DecodeError};
use iot_sub::transport::frames;
use proptest::collection::vec;
use proptest::prelude::*;
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;

const SCHEMA_KEYS: [&str; 3] = ["topic", "messageId", "generateTime"];

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn simple_value() -> impl Strategy<Value = SimpleValue> {
    prop_oneof![
        Just(SimpleValue::Null),
        any::<bool>().prop_map(SimpleValue::Bool),
        any::<u8>().prop_map(SimpleValue::Ubyte),
        any::<u16>().prop_map(SimpleValue::Ushort),
        any::<u32>().prop_map(SimpleValue::Uint),
        any::<u64>().prop_map(SimpleValue::Ulong),
        any::<i8>().prop_map(SimpleValue::Byte),
        any::<i16>().prop_map(SimpleValue::Short),
        any::<i32>().prop_map(SimpleValue::Int),
        any::<i64>().prop_map(SimpleValue::Long),
        any::<f32>().prop_map(|f| SimpleValue::Float(f.into())),
        any::<f64>().prop_map(|f| SimpleValue::Double(f.into())),
        any::<[u8; 4]>().prop_map(|b| SimpleValue::Decimal32(Dec32::from(b))),
        any::<[u8; 8]>().prop_map(|b| SimpleValue::Decimal64(Dec64::from(b))),
        any::<[u8; 16]>().prop_map(|b| SimpleValue::Decimal128(Dec128::from(b))),
        any::<char>().prop_map(SimpleValue::Char),
        any::<i64>().prop_map(|ms| SimpleValue::Timestamp(Timestamp::from_milliseconds(ms))),
        any::<[u8; 16]>().prop_map(|b| SimpleValue::Uuid(Uuid::from(b))),
        vec(any::<u8>(), 0..40).prop_map(|b| SimpleValue::Binary(Binary::from(b))),
        any::<String>().prop_map(SimpleValue::String),
        "[ -~]{0,20}".prop_map(|s| SimpleValue::Symbol(Symbol::from(s))),
        (any::<u64>(), any::<i64>()).prop_map(|(code, n)| SimpleValue::Described(Box::new(
            Described {
                descriptor: Descriptor::Code(code),
                value: Value::Long(n),
            }
        ))),
    ]
}

/// Topics: mostly shaped like the cloud's, with odd characters, or anything at all.
fn topic_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "/[a-zA-Z0-9]{0,8}/[a-zA-Z0-9_é\\-]{0,8}/(thing/event/property/post|user/[a-z]{0,5})",
        "/as/mqtt/status/[a-zA-Z0-9]{0,6}/.{0,6}",
        "/sys/.{0,6}/.{0,6}/.{0,10}",
        any::<String>(),
    ]
}

/// A field that is usually the right type and sometimes anything.
fn field(right: impl Strategy<Value = SimpleValue>) -> impl Strategy<Value = Option<SimpleValue>> {
    prop_oneof![
        6 => right.prop_map(Some),
        1 => Just(None),
        2 => simple_value().prop_map(Some),
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            vec((any::<String>(), inner), 0..6)
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Body bytes: binary, text, JSON (compact, or pretty over several lines), JSON-ish text.
fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..120),
        any::<String>().prop_map(String::into_bytes),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        json_value().prop_map(|v| serde_json::to_vec_pretty(&v).unwrap()),
        json_value().prop_map(|v| serde_json::to_string_pretty(&v)
            .unwrap()
            .replace('\n', "\r\n")
            .into_bytes()),
        "[\\[\\]{}\",:0-9a-z \\n\\r\\t\\\\]{0,30}".prop_map(String::into_bytes),
    ]
}

fn body() -> impl Strategy<Value = Body<Value>> {
    prop_oneof![
        6 => body_bytes().prop_map(|b| Body::Data(Batch::new(vec![Data(Binary::from(b))]))),
        1 => vec(body_bytes(), 0..4).prop_map(|parts| Body::Data(Batch::new(
            parts.into_iter().map(|b| Data(Binary::from(b))).collect::<Vec<_>>()
        ))),
        1 => any::<String>().prop_map(|s| Body::Value(AmqpValue(Value::String(s)))),
        1 => vec(any::<u8>(), 0..40).prop_map(|b| Body::Value(AmqpValue(Value::Binary(Binary::from(b))))),
        1 => Just(Body::Value(AmqpValue(Value::Null))),
        1 => any::<i64>().prop_map(|n| Body::Value(AmqpValue(Value::Long(n)))),
        1 => vec(any::<i32>(), 0..4).prop_map(|v| Body::Sequence(Batch::new(vec![AmqpSequence(
            v.into_iter().map(Value::Int).collect()
        )]))),
        1 => Just(Body::Empty),
    ]
}

fn message_id() -> impl Strategy<Value = MessageId> {
    prop_oneof![
        any::<String>().prop_map(MessageId::String),
        any::<u64>().prop_map(MessageId::Ulong),
        any::<[u8; 16]>().prop_map(|b| MessageId::Uuid(Uuid::from(b))),
        vec(any::<u8>(), 0..20).prop_map(|b| MessageId::Binary(Binary::from(b))),
    ]
}

/// A delivery as the receiver sees it after decoding.
#[derive(Debug, Clone)]
struct Case {
    topic: Option<SimpleValue>,
    id: Option<SimpleValue>,
    time: Option<SimpleValue>,
    others: Vec<(String, SimpleValue)>,
    amqp_id: Option<MessageId>,
    body: Body<Value>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        field(topic_text().prop_map(SimpleValue::String)),
        field(prop_oneof![
            "[0-9]{1,19}".prop_map(SimpleValue::String),
            any::<i64>().prop_map(SimpleValue::Long),
            any::<String>().prop_map(SimpleValue::String),
        ]),
        field(any::<i64>().prop_map(SimpleValue::Long)),
        vec(
            (
                prop_oneof![any::<String>(), "[a-z]{1,8}", Just("topic".to_string())],
                simple_value(),
            ),
            0..6,
        ),
        proptest::option::of(message_id()),
        body(),
    )
        .prop_map(|(topic, id, time, others, amqp_id, body)| Case {
            topic,
            id,
            time,
            others,
            amqp_id,
            body,
        })
}

impl Case {
    fn message(&self) -> Message<Body<Value>> {
        let mut ap = ApplicationProperties::builder();
        for (k, v) in [
            ("topic", &self.topic),
            ("messageId", &self.id),
            ("generateTime", &self.time),
        ] {
            if let Some(v) = v {
                ap = ap.insert(k, v.clone());
            }
        }
        for (k, v) in &self.others {
            ap = ap.insert(k.clone(), v.clone());
        }
        let mut m = Message::builder()
            .application_properties(ap.build())
            .body(self.body.clone())
            .build();
        if let Some(id) = &self.amqp_id {
            m.properties = Some(Properties {
                message_id: Some(id.clone()),
                ..Default::default()
            });
        }
        m
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// The bytes of the body, as the output must carry them, or `None` if it cannot be written.
fn body_of(body: &Body<Value>) -> Option<Vec<u8>> {
    match body {
        Body::Data(batch) => Some(batch.iter().flat_map(|d| d.0.iter().copied()).collect()),
        Body::Value(AmqpValue(Value::String(s))) => Some(s.clone().into_bytes()),
        Body::Value(AmqpValue(Value::Binary(b))) => Some(b.to_vec()),
        Body::Value(AmqpValue(Value::Null)) | Body::Empty => Some(Vec::new()),
        _ => None,
    }
}

/// Parses one output line: exactly one `\n`, at the end, and a JSON object before it.
fn parse_line(out: &[u8]) -> serde_json::Map<String, serde_json::Value> {
    assert_eq!(out.last(), Some(&b'\n'), "{}", String::from_utf8_lossy(out));
    assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1, "one line");
    match serde_json::from_slice(out) {
        Ok(serde_json::Value::Object(map)) => map,
        other => panic!(
            "not a JSON object: {other:?}: {}",
            String::from_utf8_lossy(out)
        ),
    }
}

/// An application property of `m`.
fn get<'a>(m: &'a Message<Body<Value>>, key: &str) -> Option<&'a SimpleValue> {
    m.application_properties.as_ref().and_then(|p| p.get(key))
}

/// Everything the line must say about `m`, for one body mode.
fn check_line(m: &Message<Body<Value>>, case: &Case, mode: BodyMode, out: &[u8]) {
    let line = parse_line(out);
    let keys: Vec<&str> = line.keys().map(String::as_str).collect();
    for key in [
        "topic",
        "messageId",
        "generateTime",
        "productKey",
        "deviceName",
        "properties",
        "bodyEncoding",
        "body",
    ] {
        assert!(keys.contains(&key), "{key} missing in {line:?}");
    }
    assert_eq!(keys.len(), 8, "{keys:?}");

    // The topic, as sent.
    let topic = match get(m, "topic") {
        Some(SimpleValue::String(s)) => s.clone(),
        Some(SimpleValue::Symbol(s)) => s.0.clone(),
        other => panic!("written with topic {other:?}"),
    };
    assert_eq!(line["topic"], topic.as_str());

    // The id: the application property where it is one, else the AMQP message-id.
    let expected_id = match (get(m, "messageId"), &case.amqp_id) {
        (Some(SimpleValue::String(s)), _) => Some(s.clone()),
        (Some(SimpleValue::Long(n)), _) => Some(n.to_string()),
        (Some(SimpleValue::Ulong(n)), _) => Some(n.to_string()),
        (Some(SimpleValue::Int(n)), _) => Some(n.to_string()),
        (Some(SimpleValue::Uint(n)), _) => Some(n.to_string()),
        (Some(SimpleValue::Symbol(s)), _) => Some(s.0.clone()),
        (Some(_), _) => None, // uuid: formatting checked in unit tests
        (None, Some(MessageId::String(s))) => Some(s.clone()),
        (None, Some(MessageId::Ulong(n))) => Some(n.to_string()),
        (None, Some(MessageId::Binary(b))) => {
            Some(base64::engine::general_purpose::STANDARD.encode(b.as_slice()))
        }
        (None, _) => None,
    };
    assert!(line["messageId"].is_string());
    if let Some(id) = expected_id {
        assert_eq!(line["messageId"], id.as_str());
    }

    match get(m, "generateTime") {
        Some(SimpleValue::Long(n)) => assert_eq!(line["generateTime"], *n),
        None | Some(SimpleValue::Null) => assert!(line["generateTime"].is_null()),
        Some(_) => assert!(line["generateTime"].is_i64()),
    }

    // Every other property, by name; strings, booleans and integers as they were.
    let props = line["properties"]
        .as_object()
        .expect("properties is an object");
    let sent: Vec<(&String, &SimpleValue)> = m
        .application_properties
        .as_ref()
        .map(|ap| {
            ap.0.iter()
                .filter(|(k, _)| !SCHEMA_KEYS.contains(&k.as_str()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(props.len(), sent.len());
    for (k, v) in sent {
        let got = &props[k.as_str()];
        match v {
            SimpleValue::String(s) => assert_eq!(got, s.as_str()),
            SimpleValue::Bool(b) => assert_eq!(got, b),
            SimpleValue::Long(n) => assert_eq!(got, n),
            SimpleValue::Ulong(n) => assert_eq!(got, n),
            SimpleValue::Binary(b) => assert_eq!(
                got,
                base64::engine::general_purpose::STANDARD
                    .encode(b.as_slice())
                    .as_str()
            ),
            _ => {}
        }
    }

    // The body, per bodyEncoding.
    let bytes = body_of(&m.body).expect("written only with a writable body");
    let encoding = line["bodyEncoding"]
        .as_str()
        .expect("bodyEncoding is a string");
    let utf8 = std::str::from_utf8(&bytes).ok();
    match encoding {
        "json" => {
            let want: serde_json::Value =
                serde_json::from_slice(&bytes).expect("json body is JSON");
            assert_eq!(line["body"], want);
            assert!(matches!(mode, BodyMode::Auto | BodyMode::Json));
        }
        "text" => {
            assert_eq!(line["body"], utf8.expect("text body is UTF-8"));
            assert!(!matches!(mode, BodyMode::Base64));
        }
        "base64" => {
            let got = base64::engine::general_purpose::STANDARD
                .decode(line["body"].as_str().expect("base64 body is a string"))
                .expect("base64 body decodes");
            assert_eq!(got, bytes);
            if mode == BodyMode::Text {
                assert!(utf8.is_none(), "UTF-8 is text in --body text");
            }
        }
        other => panic!("bodyEncoding {other}"),
    }
    if mode == BodyMode::Base64 {
        assert_eq!(encoding, "base64");
    }
    if mode == BodyMode::Auto && encoding != "json" {
        let is_json = utf8.is_some_and(|t| serde_json::from_str::<serde_json::Value>(t).is_ok());
        let printable = utf8.is_some_and(|t| {
            !t.bytes()
                .any(|b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')) || b == 0x7f)
        });
        assert!(
            !(is_json && printable),
            "printable JSON body written as {encoding}"
        );
    }
}

/// Runs `m` through decode and every output; returns the default line (or the error).
fn through_every_output(m: &Message<Body<Value>>, case: &Case) -> Result<Vec<u8>, DecodeError> {
    let mut default_line = Vec::new();
    let written = write_line(m, &mut default_line);
    let view = match decode(m) {
        Ok(view) => view,
        Err(e) => {
            assert_eq!(written, Err(e.clone()));
            assert!(default_line.is_empty(), "nothing written on error");
            let reason = e.to_string();
            assert!(!reason.is_empty() && !reason.contains('\n'), "{reason:?}");
            return Err(e);
        }
    };
    assert_eq!(written, Ok(()));
    for mode in [
        BodyMode::Auto,
        BodyMode::Json,
        BodyMode::Text,
        BodyMode::Base64,
    ] {
        let mut out = Vec::new();
        view.write_json(mode, &mut out);
        check_line(m, case, mode, &out);
        let (encoding, _) = view.body_out(mode);
        assert_eq!(parse_line(&out)["bodyEncoding"], encoding.as_str());
        if mode == BodyMode::Auto {
            assert_eq!(out, default_line);
        }
        let mut pretty = Vec::new();
        Format::Pretty.render(&view, mode, &mut pretty);
        assert!(pretty.ends_with(b"\n"));
        let template: Format = "{topic}\t{messageId} {generateTime} {productKey}/{deviceName} {properties} {properties.a} {bodyEncoding} {body}"
            .parse()
            .unwrap();
        let mut one = Vec::new();
        template.render(&view, mode, &mut one);
        assert_eq!(
            one.iter().filter(|b| **b == b'\n').count(),
            1,
            "a template line is one line"
        );
        assert!(one.ends_with(b"\n"));
    }
    if let Err(e) = std::str::from_utf8(&view.body) {
        assert_eq!(view.body_out(BodyMode::Text).0, BodyEncoding::Base64, "{e}");
    }
    Ok(default_line)
}

/// Decodes wire bytes the way the receiving end does (`transport::engine`).
fn decode_wire(bytes: &[u8]) -> Result<Message<Body<Value>>, serde_amqp::Error> {
    Body::<Value>::decode_message_from_reader(serde_amqp::read::SliceReader::new(bytes))
}

fn encode(m: &Message<Body<Value>>) -> Vec<u8> {
    serde_amqp::to_vec(&Serializable(m)).expect("a typed message encodes")
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {

    /// Any delivery gives a DecodeError or correct lines in every format and body mode.
    #[test]
    fn any_delivery_gives_an_error_or_one_correct_line(case in case()) {
        let m = case.message();
        let result = through_every_output(&m, &case);
        // A well-typed delivery is never refused.
        let well_typed = matches!(get(&m, "topic"), Some(SimpleValue::String(_)))
            && matches!(get(&m, "messageId"), Some(SimpleValue::String(_)))
            && matches!(get(&m, "generateTime"), None | Some(SimpleValue::Long(_)))
            && body_of(&case.body).is_some();
        prop_assert!(!well_typed || result.is_ok(), "{result:?}");
        if body_of(&case.body).is_none() {
            prop_assert!(result.is_err(), "an unwritable body was written");
        }
    }

    /// The same delivery encoded on the wire and decoded as the receiver does gives the same
    /// line or the same error.
    #[test]
    fn a_delivery_off_the_wire_gives_the_same_line(case in case()) {
        let m = case.message();
        let direct = through_every_output(&m, &case);
        let wire = decode_wire(&encode(&m)).expect("what fe2o3 encodes, it decodes");
        let mut via_wire = Vec::new();
        let result = write_line(&wire, &mut via_wire).map(|()| via_wire);
        prop_assert_eq!(result, direct);
    }

    /// Damaged encodings (bytes flipped, cut short, inserted) never panic: fe2o3 refuses them
    /// (the delivery is rejected) or they give an error or a correct line.
    #[test]
    fn damaged_wire_bytes_never_panic(
        case in case(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..6),
    ) {
        let mut bytes = encode(&case.message());
        for (at, byte, how) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match how {
                0 => bytes[i] = byte,
                1 => bytes.truncate(i),
                _ => bytes.insert(i, byte),
            }
        }
        if let Ok(m) = decode_wire(&bytes) {
            let mut out = Vec::new();
            if write_line(&m, &mut out).is_ok() {
                parse_line(&out);
            }
        }
    }

    /// Arbitrary bytes as a transfer payload never panic.
    #[test]
    fn arbitrary_wire_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        if let Ok(m) = decode_wire(&bytes) {
            let mut out = Vec::new();
            if write_line(&m, &mut out).is_ok() {
                parse_line(&out);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transfer frames
// ---------------------------------------------------------------------------------------------

fn transfer() -> impl Strategy<Value = Transfer> {
    let bool_field = prop_oneof![Just(None), any::<bool>().prop_map(Some)];
    (
        any::<u32>(),
        prop_oneof![Just(None), any::<u32>().prop_map(Some)],
        prop_oneof![Just(None), vec(any::<u8>(), 0..300).prop_map(Some)],
        prop_oneof![Just(None), any::<u32>().prop_map(Some)],
        bool_field,
        any::<(bool, bool, bool, bool)>(),
        prop_oneof![
            Just(None),
            Just(Some(ReceiverSettleMode::First)),
            Just(Some(ReceiverSettleMode::Second))
        ],
    )
        .prop_map(
            |(
                handle,
                delivery_id,
                tag,
                format,
                settled,
                (more, resume, aborted, batchable),
                mode,
            )| {
                Transfer {
                    handle: handle.into(),
                    delivery_id,
                    delivery_tag: tag.map(Binary::from),
                    message_format: format,
                    settled,
                    more,
                    rcv_settle_mode: mode,
                    state: None,
                    resume,
                    aborted,
                    batchable,
                }
            },
        )
}

/// A transfer frame after its size field: header (doff 2, AMQP, channel 0), performative,
/// payload.
fn transfer_frame(t: &Transfer, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![2u8, 0, 0, 0];
    frame.extend(serde_amqp::to_vec(t).expect("a transfer encodes"));
    frame.extend_from_slice(payload);
    frame
}

/// The quick reader either steps aside or reads exactly what fe2o3's decoder reads: the same
/// delivery-id, settled, more and aborted, and the same payload.
fn quick_agrees_with_fe2o3(frame: &[u8]) -> Result<(), TestCaseError> {
    let Some((head, at)) = frames::quick_transfer(frame) else {
        return Ok(());
    };
    match frames::decode_amqp(bytes::BytesMut::from(frame)).map(|f| f.body) {
        Ok(FrameBody::Transfer {
            performative,
            payload,
        }) => {
            prop_assert_eq!(head, frames::TransferHead::from(&performative));
            prop_assert_eq!(&payload[..], &frame[at..]);
        }
        Ok(other) => prop_assert!(false, "quick read a transfer, fe2o3 read {:?}", other),
        Err(e) => prop_assert!(false, "quick read {:?}, fe2o3 refused it: {}", head, e),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any transfer fe2o3's serializer writes is read the quick way, the same as fe2o3 reads it.
    #[test]
    fn the_quick_transfer_reader_reads_any_transfer_like_fe2o3(
        t in transfer(),
        payload in vec(any::<u8>(), 0..64),
    ) {
        let frame = transfer_frame(&t, &payload);
        prop_assert!(frames::quick_transfer(&frame).is_some());
        quick_agrees_with_fe2o3(&frame)?;
    }

    /// Damaged transfer frames: whatever the quick reader accepts, fe2o3 reads the same way.
    #[test]
    fn the_quick_transfer_reader_never_disagrees_on_damaged_frames(
        t in transfer(),
        payload in vec(any::<u8>(), 0..16),
        edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
    ) {
        let mut frame = transfer_frame(&t, &payload);
        for (at, byte, how) in edits {
            // The 4-byte header stays: the frame splitter has checked it by then.
            if frame.len() <= 4 {
                break;
            }
            let i = 4 + at.index(frame.len() - 4);
            match how {
                0 => frame[i] = byte,
                1 => frame.truncate(i),
                _ => frame.insert(i, byte),
            }
        }
        quick_agrees_with_fe2o3(&frame)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Config text
// ---------------------------------------------------------------------------------------------

const PROFILE_FIELDS: [&str; 25] = [
    "cloud",
    "emulator",
    "emulator_rate",
    "host",
    "iot_instance_id",
    "uid",
    "region",
    "port",
    "client_id",
    "consumer_group_id",
    "auth_mode",
    "sign_method",
    "idle_timeout",
    "credit",
    "connections",
    "source",
    "ca_file",
    "access_key_id",
    "access_key_secret",
    "security_token",
    "credential_command",
    "aliyun_profile",
    "backoff_initial",
    "backoff_max",
    "no_such_field",
];

fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<String>().prop_map(toml::Value::String),
        "[a-z:/|,={} \n\r\t\u{1b}]{0,8}".prop_map(toml::Value::String),
        "[0-9]{1,6}(ms|s|m|h|d|us|ns|y)?".prop_map(toml::Value::String),
        "(hmacsha1|hmacmd5|hmacsha256|aksign|ststoken|alibaba|\\{hostname\\}|\\{pid\\}|\\{|\\}){0,3}"
            .prop_map(toml::Value::String),
        any::<i64>().prop_map(toml::Value::Integer),
        (-10i64..70_000).prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..3).prop_map(toml::Value::Array),
            vec(
                (
                    prop_oneof![
                        Just("env".to_string()),
                        Just("file".to_string()),
                        Just("credential".to_string()),
                        any::<String>()
                    ],
                    inner
                ),
                0..3
            )
            .prop_map(|kv| toml::Value::Table(kv.into_iter().collect())),
        ]
    })
}

/// Asserts the config error is one line (it is printed as one line before exit 78).
fn check_config(text: &str, name: &str) {
    let file = std::path::Path::new("/etc/iot-sub/config.toml");
    for file in [None, Some(file)] {
        if let Err(e) = iot_sub::config::parse(text, name, file) {
            let shown = e.to_string();
            assert!(
                !shown.contains(['\n', '\r']),
                "a config error is one line: {shown:?}"
            );
            assert!(!e.message.is_empty());
        }
    }
}

proptest! {

    /// Any text at all: a profile or a one-line error, never a panic.
    #[test]
    fn any_config_text_gives_a_profile_or_a_one_line_error(
        text in prop_oneof![
            any::<String>(),
            "\\[profiles\\.[a-z\"\\n ]{0,6}\\]\\n([a-z_]{1,12} ?= ?[-0-9a-z\"{}\\[\\]., =\\n]{0,12}\\n){0,4}",
        ],
        name in prop_oneof![Just("p".to_string()), any::<String>()],
    ) {
        check_config(&text, &name);
    }

    /// Well-formed TOML with any values in the profile's fields, and any profile names.
    #[test]
    fn any_field_values_give_a_profile_or_a_one_line_error(
        fields in vec((proptest::sample::select(&PROFILE_FIELDS[..]), toml_value()), 0..8),
        name in prop_oneof![3 => Just("p".to_string()), 1 => any::<String>(), 1 => "[a-z\n\r`]{0,4}"],
        other_profile in proptest::option::of(prop_oneof![any::<String>(), "[a-z\n\r`]{0,4}"]),
    ) {
        let mut profile = toml::Table::new();
        for (k, v) in fields {
            profile.insert(k.to_string(), v);
        }
        let mut profiles = toml::Table::new();
        profiles.insert(name.clone(), toml::Value::Table(profile));
        if let Some(other) = other_profile {
            profiles.insert(other, toml::Value::Table(toml::Table::new()));
        }
        let mut root = toml::Table::new();
        root.insert("profiles".into(), toml::Value::Table(profiles));
        let text = toml::to_string(&root).expect("TOML serializes");
        check_config(&text, &name);
        check_config(&text, "p");
    }
}
