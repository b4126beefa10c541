//! Turns one AMQP delivery into one JSON line: the stable output schema lives here.
//!
//! Schema (one object per line, keys always in this order):
//! `{"topic":..,"messageId":..,"generateTime":..,"productKey":..,"deviceName":..,"properties":{..},"bodyEncoding":..,"body":..}`
//! - `messageId` is a string (an integer id on the wire is written in decimal), taken from the
//!   application property `messageId`, else from the AMQP `properties.message-id`.
//! - `generateTime` is integer milliseconds since the epoch, or `null` when absent.
//! - `productKey` and `deviceName` come from the topic's shape, `null` when it has none.
//!
//! Two mappings, chosen per profile kind ([`Mapping`]): [`decode`] for Alibaba Cloud, which
//! requires the `topic` and an id; [`decode_generic`] for any AMQP 1.0 broker, which falls back
//! to the AMQP properties section and the source address and never refuses a message for
//! lacking Aliyun's fields:
//! - `topic`: application property `topic`, else `properties.subject`, else the source address.
//! - `messageId`: application property `messageId`, else `properties.message-id`, else `null`
//!   (and duplicate suppression skips the message).
//! - `generateTime`: application property `generateTime`, else `properties.creation-time`, else
//!   `null`.
//! - `productKey`, `deviceName`: from the topic's shape only when the topic came from the
//!   `topic` application property (a subject or a queue address names no device).
//! - `properties` holds every other application property.
//! - `bodyEncoding` is `json` (body embedded as JSON), `text` (body is a string: the bytes are
//!   UTF-8 with no control characters but tab, CR and LF) or `base64` (the raw bytes, base64).

use std::fmt;

use base64::Engine;

use crate::json;
use fe2o3_amqp::types::messaging::{Body, Message, MessageId};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// Why a delivery was not turned into a line (it is then rejected, with this as the reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// No `topic` application property.
    MissingTopic,
    /// Neither a `messageId` application property nor `properties.message-id`.
    MissingMessageId,
    /// A property has a type this schema cannot carry for that field.
    BadField(&'static str, String),
    /// The body is an AMQP sequence or a non-binary, non-string value.
    UnsupportedBody(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::MissingTopic => f.write_str("no `topic` application property"),
            DecodeError::MissingMessageId => {
                f.write_str("no `messageId` application property and no properties.message-id")
            }
            DecodeError::BadField(field, why) => write!(f, "field `{field}`: {why}"),
            DecodeError::UnsupportedBody(kind) => write!(f, "unsupported body: {kind}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// How the body is written (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEncoding {
    /// Valid JSON, embedded as a JSON value.
    Json,
    /// Text (UTF-8 without control characters but tab, CR, LF), embedded as a string.
    Text,
    /// Anything else, base64 (standard alphabet, padded).
    Base64,
}

impl BodyEncoding {
    /// The name used in the output.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyEncoding::Json => "json",
            BodyEncoding::Text => "text",
            BodyEncoding::Base64 => "base64",
        }
    }
}

/// `--body`: how to choose the body's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyMode {
    /// JSON if it parses, else text if it is text, else base64.
    #[default]
    Auto,
    /// JSON if it parses, else as `Auto` would write it.
    Json,
    /// A string whenever the bytes are UTF-8 (control characters escaped), else base64.
    Text,
    /// Always base64.
    Base64,
}

impl std::str::FromStr for BodyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BodyMode::Auto),
            "json" => Ok(BodyMode::Json),
            "text" => Ok(BodyMode::Text),
            "base64" => Ok(BodyMode::Base64),
            _ => Err(format!(
                "unknown body mode `{s}` (auto | json | text | base64)"
            )),
        }
    }
}

/// How deliveries are read: chosen once per profile kind, the same for every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapping {
    /// Alibaba Cloud: [`decode`].
    Alibaba,
    /// Any AMQP 1.0 broker: [`decode_generic`], with the profile's source address as the last
    /// resort for the topic.
    Generic {
        /// The receiver's source address.
        source: String,
    },
}

impl Mapping {
    /// Reads one message the way this mapping says.
    #[inline]
    pub fn decode<'a>(
        &'a self,
        message: &'a Message<Body<Value>>,
    ) -> Result<View<'a>, DecodeError> {
        match self {
            Mapping::Alibaba => decode(message),
            Mapping::Generic { source } => decode_generic(message, source),
        }
    }
}

/// The fields of one message, borrowed from the delivery where possible.
#[derive(Debug)]
pub struct View<'a> {
    /// Application property `topic` (generic brokers: see the module doc).
    pub topic: &'a str,
    /// The message id, as text; `None` only from a generic broker's message without one.
    pub message_id: Option<std::borrow::Cow<'a, str>>,
    /// Milliseconds since the epoch.
    pub generate_time: Option<i64>,
    /// From the topic's shape.
    pub product_key: Option<&'a str>,
    /// From the topic's shape.
    pub device_name: Option<&'a str>,
    /// The body's bytes.
    pub body: std::borrow::Cow<'a, [u8]>,
    props: Option<&'a fe2o3_amqp::types::primitives::OrderedMap<String, SimpleValue>>,
}

/// Reads the schema's fields out of a message, or says why it cannot.
pub fn decode(message: &Message<Body<Value>>) -> Result<View<'_>, DecodeError> {
    let props = message.application_properties.as_ref().map(|p| &p.0);
    // A linear scan: a handful of properties, looked up three times, is cheaper than hashing.
    let get =
        |key: &str| props.and_then(|p| p.iter().find(|(k, _)| k.as_str() == key).map(|(_, v)| v));

    let topic = match get("topic") {
        Some(SimpleValue::String(s)) => s.as_str(),
        Some(SimpleValue::Symbol(s)) => s.0.as_str(),
        Some(other) => return Err(DecodeError::BadField("topic", type_name(other).into())),
        None => return Err(DecodeError::MissingTopic),
    };
    let message_id = match get("messageId") {
        Some(v) => property_id(v)?,
        None => match message
            .properties
            .as_ref()
            .and_then(|p| p.message_id.as_ref())
        {
            Some(id) => amqp_id(id),
            None => return Err(DecodeError::MissingMessageId),
        },
    };
    let generate_time = match get("generateTime") {
        None | Some(SimpleValue::Null) => None,
        Some(v) => Some(millis(v).ok_or_else(|| {
            DecodeError::BadField(
                "generateTime",
                format!("{} is not milliseconds", type_name(v)),
            )
        })?),
    };
    let (product_key, device_name) = crate::topic::device_of(topic);
    let body = body_bytes(&message.body)?;
    Ok(View {
        topic,
        message_id: Some(message_id),
        generate_time,
        product_key,
        device_name,
        body,
        props,
    })
}

/// Reads a generic AMQP 1.0 broker's message (see the module doc for the fallbacks). Only a
/// property of a type the schema cannot carry, or an unsupported body, is an error.
pub fn decode_generic<'a>(
    message: &'a Message<Body<Value>>,
    source: &'a str,
) -> Result<View<'a>, DecodeError> {
    let props = message.application_properties.as_ref().map(|p| &p.0);
    let get = |key: &str| props.and_then(|p| p.get(key));
    let amqp = message.properties.as_ref();

    let (topic, from_property) = match get("topic") {
        Some(SimpleValue::String(s)) => (s.as_str(), true),
        Some(SimpleValue::Symbol(s)) => (s.0.as_str(), true),
        Some(other) => return Err(DecodeError::BadField("topic", type_name(other).into())),
        None => match amqp.and_then(|p| p.subject.as_deref()) {
            Some(subject) => (subject, false),
            None => (source, false),
        },
    };
    let message_id = match get("messageId") {
        Some(v) => Some(property_id(v)?),
        None => amqp.and_then(|p| p.message_id.as_ref()).map(amqp_id),
    };
    let generate_time = match get("generateTime") {
        None | Some(SimpleValue::Null) => amqp
            .and_then(|p| p.creation_time.as_ref())
            .map(|t| t.milliseconds()),
        Some(v) => Some(millis(v).ok_or_else(|| {
            DecodeError::BadField(
                "generateTime",
                format!("{} is not milliseconds", type_name(v)),
            )
        })?),
    };
    let (product_key, device_name) = if from_property {
        crate::topic::device_of(topic)
    } else {
        (None, None)
    };
    let body = body_bytes(&message.body)?;
    Ok(View {
        topic,
        message_id,
        generate_time,
        product_key,
        device_name,
        body,
        props,
    })
}

/// The application property `messageId` as text.
fn property_id(v: &SimpleValue) -> Result<std::borrow::Cow<'_, str>, DecodeError> {
    match v {
        SimpleValue::String(s) => Ok(s.as_str().into()),
        v => id_text(v).map(Into::into).ok_or_else(|| {
            DecodeError::BadField("messageId", format!("{} is not an id", type_name(v)))
        }),
    }
}

/// The AMQP `properties.message-id` as text.
fn amqp_id(id: &MessageId) -> std::borrow::Cow<'_, str> {
    match id {
        MessageId::String(s) => s.as_str().into(),
        MessageId::Ulong(n) => n.to_string().into(),
        MessageId::Uuid(u) => uuid_text(u.as_inner()).into(),
        MessageId::Binary(b) => base64::engine::general_purpose::STANDARD.encode(b).into(),
    }
}

impl View<'_> {
    /// The body as it goes into the output, chosen by `mode`.
    pub fn body_out(&self, mode: BodyMode) -> (BodyEncoding, BodyOut<'_>) {
        classify_body(&self.body, mode)
    }

    /// Application properties other than topic, messageId and generateTime, as JSON values.
    pub fn other_properties(&self) -> impl Iterator<Item = (&str, &SimpleValue)> + '_ {
        self.props
            .into_iter()
            .flat_map(|p| p.iter())
            .filter(|(k, _)| !SCHEMA_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v))
    }

    /// One application property by name (any, including the schema's).
    pub fn property(&self, key: &str) -> Option<&SimpleValue> {
        self.props.and_then(|p| p.get(key))
    }

    /// Appends the JSON line (with its `\n`). Written by hand, key by key, because this is the
    /// hot path; `tests::hand_written_line_matches_serde` holds it to serde_json's output.
    pub fn write_json(&self, mode: BodyMode, out: &mut Vec<u8>) {
        let (encoding, body) = self.body_out(mode);
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(b"{\"topic\":");
        json::quote(out, self.topic);
        out.extend_from_slice(b",\"messageId\":");
        match &self.message_id {
            Some(id) => json::quote(out, id),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"generateTime\":");
        match self.generate_time {
            Some(t) => out.extend_from_slice(digits.format(t).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        for (key, value) in [
            (&b",\"productKey\":"[..], self.product_key),
            (b",\"deviceName\":", self.device_name),
        ] {
            out.extend_from_slice(key);
            match value {
                Some(v) => json::quote(out, v),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.extend_from_slice(b",\"properties\":");
        if self.other_properties().next().is_none() {
            out.extend_from_slice(b"{}");
        } else {
            // Writing to a Vec cannot fail, and every value here serializes.
            let _ = serde_json::to_writer(&mut *out, &OtherProperties(self.props));
        }
        out.extend_from_slice(b",\"bodyEncoding\":\"");
        out.extend_from_slice(encoding.as_str().as_bytes());
        out.extend_from_slice(b"\",\"body\":");
        match &body {
            BodyOut::Json(raw) => out.extend_from_slice(raw.as_bytes()),
            BodyOut::JsonOneLine(raw) => out.extend_from_slice(raw.as_bytes()),
            BodyOut::Text(t) => json::quote(out, t),
            BodyOut::Base64(b) => json::quote(out, b),
        }
        out.extend_from_slice(b"}\n");
    }
}

/// Appends the JSON line for `message` to `out` (default body mode), or says why it cannot.
/// On error `out` is left as it was.
pub fn write_line(message: &Message<Body<Value>>, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    decode(message)?.write_json(BodyMode::Auto, out);
    Ok(())
}

/// The body's bytes: Data sections concatenated; an amqp-value of binary or string taken as is;
/// no body, or an amqp-value of null, is empty.
fn body_bytes(body: &Body<Value>) -> Result<std::borrow::Cow<'_, [u8]>, DecodeError> {
    use std::borrow::Cow;
    match body {
        Body::Data(batch) => {
            if batch.len() == 1 {
                Ok(Cow::Borrowed(batch[0].0.as_slice()))
            } else {
                Ok(Cow::Owned(
                    batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
                ))
            }
        }
        Body::Value(v) => match &v.0 {
            Value::Binary(b) => Ok(Cow::Borrowed(b.as_slice())),
            Value::String(s) => Ok(Cow::Borrowed(s.as_bytes())),
            // How AMQP libraries (fe2o3 among them) encode a message without a body.
            Value::Null => Ok(Cow::Borrowed(&[])),
            _ => Err(DecodeError::UnsupportedBody(
                "amqp-value that is not binary or string",
            )),
        },
        Body::Sequence(_) => Err(DecodeError::UnsupportedBody("amqp-sequence")),
        Body::Empty => Ok(Cow::Borrowed(&[])),
    }
}

/// The body as it goes into the output.
pub enum BodyOut<'a> {
    /// Embedded JSON, as received (already one line; validated).
    Json(&'a str),
    /// Embedded JSON whose raw line breaks were replaced by spaces (validated).
    JsonOneLine(String),
    /// A string.
    Text(&'a str),
    /// Base64 of the bytes.
    Base64(String),
}

impl BodyOut<'_> {
    /// The body as text: compact JSON, the string itself, or the base64.
    pub fn as_text(&self) -> &str {
        match self {
            BodyOut::Json(raw) => raw,
            BodyOut::JsonOneLine(raw) => raw,
            BodyOut::Text(t) => t,
            BodyOut::Base64(b) => b,
        }
    }
}

/// Binary data that happens to be valid UTF-8 (NUL, other C0 controls, DEL) is not text.
fn is_text(text: &str) -> bool {
    !text
        .bytes()
        .any(|b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')) || b == 0x7f)
}

/// Every byte printable ASCII or a tab: then the bytes are text, UTF-8, and hold no line
/// break, which settles three checks in one pass. Branch-free per chunk so it vectorises.
fn is_plain_ascii(bytes: &[u8]) -> bool {
    bytes.chunks(64).all(|chunk| {
        chunk.iter().fold(0u8, |bad, &b| {
            bad | (u8::from(b.wrapping_sub(0x20) >= 0x5f) & u8::from(b != b'\t'))
        }) == 0
    })
}

fn classify_body(bytes: &[u8], mode: BodyMode) -> (BodyEncoding, BodyOut<'_>) {
    let base64 = || {
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        (BodyEncoding::Base64, BodyOut::Base64(b64))
    };
    let text = match (mode, std::str::from_utf8(bytes)) {
        (BodyMode::Base64, _) | (_, Err(_)) => return base64(),
        (BodyMode::Text, Ok(text)) => return (BodyEncoding::Text, BodyOut::Text(text)),
        (_, Ok(text)) => text,
    };
    // Printable ASCII settles "is text" and "has no line break" in one pass.
    let plain = is_plain_ascii(bytes);
    let is_text = plain || is_text(text);
    match json::value_span(text) {
        Some(raw) if is_text || mode == BodyMode::Json => {
            // Inside valid JSON a raw CR or LF can only be insignificant whitespace (strings
            // must escape them), so replacing them by spaces keeps the value on one line.
            if plain || !raw.contains(['\n', '\r']) {
                (BodyEncoding::Json, BodyOut::Json(raw))
            } else {
                let one_line = raw.replace(['\n', '\r'], " ");
                (BodyEncoding::Json, BodyOut::JsonOneLine(one_line))
            }
        }
        _ if is_text => (BodyEncoding::Text, BodyOut::Text(text)),
        _ => base64(),
    }
}

/// The application properties other than the three schema fields.
struct OtherProperties<'a>(
    Option<&'a fe2o3_amqp::types::primitives::OrderedMap<String, SimpleValue>>,
);

const SCHEMA_KEYS: [&str; 3] = ["topic", "messageId", "generateTime"];

impl Serialize for OtherProperties<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        if let Some(props) = self.0 {
            for (k, v) in props.iter() {
                if !SCHEMA_KEYS.contains(&k.as_str()) {
                    map.serialize_entry(k, &JsonSimple(v))?;
                }
            }
        }
        map.end()
    }
}

/// An application property value as JSON: numbers as numbers, binary as base64, timestamps as
/// milliseconds, decimals and described values as `null` (they have no faithful JSON form).
pub struct JsonSimple<'a>(pub &'a SimpleValue);

impl Serialize for JsonSimple<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            SimpleValue::Null => s.serialize_none(),
            SimpleValue::Bool(b) => s.serialize_bool(*b),
            SimpleValue::Ubyte(n) => s.serialize_u8(*n),
            SimpleValue::Ushort(n) => s.serialize_u16(*n),
            SimpleValue::Uint(n) => s.serialize_u32(*n),
            SimpleValue::Ulong(n) => s.serialize_u64(*n),
            SimpleValue::Byte(n) => s.serialize_i8(*n),
            SimpleValue::Short(n) => s.serialize_i16(*n),
            SimpleValue::Int(n) => s.serialize_i32(*n),
            SimpleValue::Long(n) => s.serialize_i64(*n),
            SimpleValue::Float(f) => s.serialize_f32(f.into_inner()),
            SimpleValue::Double(f) => s.serialize_f64(f.into_inner()),
            SimpleValue::Char(c) => s.serialize_char(*c),
            SimpleValue::Timestamp(t) => s.serialize_i64(t.milliseconds()),
            SimpleValue::Uuid(u) => s.serialize_str(&uuid_text(u.as_inner())),
            SimpleValue::Binary(b) => {
                s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
            }
            SimpleValue::String(t) => s.serialize_str(t),
            SimpleValue::Symbol(t) => s.serialize_str(&t.0),
            SimpleValue::Decimal32(_)
            | SimpleValue::Decimal64(_)
            | SimpleValue::Decimal128(_)
            | SimpleValue::Described(_) => s.serialize_none(),
        }
    }
}

fn id_text(v: &SimpleValue) -> Option<String> {
    Some(match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Uuid(u) => uuid_text(u.as_inner()),
        _ => return None,
    })
}

fn millis(v: &SimpleValue) -> Option<i64> {
    match v {
        SimpleValue::Long(n) => Some(*n),
        SimpleValue::Ulong(n) => i64::try_from(*n).ok(),
        SimpleValue::Int(n) => Some(i64::from(*n)),
        SimpleValue::Uint(n) => Some(i64::from(*n)),
        SimpleValue::Timestamp(t) => Some(t.milliseconds()),
        SimpleValue::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn uuid_text(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn type_name(v: &SimpleValue) -> &'static str {
    match v {
        SimpleValue::Null => "null",
        SimpleValue::Bool(_) => "boolean",
        SimpleValue::Binary(_) => "binary",
        SimpleValue::String(_) | SimpleValue::Symbol(_) | SimpleValue::Char(_) => "string",
        SimpleValue::Float(_) | SimpleValue::Double(_) => "floating-point number",
        SimpleValue::Decimal32(_) | SimpleValue::Decimal64(_) | SimpleValue::Decimal128(_) => {
            "decimal"
        }
        SimpleValue::Timestamp(_) => "timestamp",
        SimpleValue::Uuid(_) => "uuid",
        SimpleValue::Described(_) => "described value",
        _ => "integer",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line as serde_json writes it from a struct: the reference for the hand-written one.
    #[derive(Serialize)]
    struct Line<'a> {
        topic: &'a str,
        #[serde(rename = "messageId")]
        message_id: Option<&'a str>,
        #[serde(rename = "generateTime")]
        generate_time: Option<i64>,
        #[serde(rename = "productKey")]
        product_key: Option<&'a str>,
        #[serde(rename = "deviceName")]
        device_name: Option<&'a str>,
        properties: OtherProperties<'a>,
        #[serde(rename = "bodyEncoding")]
        body_encoding: &'static str,
        body: Box<serde_json::value::RawValue>,
    }

    fn reference_line(v: &View<'_>, mode: BodyMode) -> String {
        let (encoding, body) = v.body_out(mode);
        let body = match encoding {
            BodyEncoding::Json => body.as_text().to_string(),
            _ => serde_json::to_string(body.as_text()).unwrap(),
        };
        let line = Line {
            topic: v.topic,
            message_id: v.message_id.as_deref(),
            generate_time: v.generate_time,
            product_key: v.product_key,
            device_name: v.device_name,
            properties: OtherProperties(v.props),
            body_encoding: encoding.as_str(),
            body: serde_json::value::RawValue::from_string(body).unwrap(),
        };
        serde_json::to_string(&line).unwrap() + "\n"
    }

    #[test]
    fn hand_written_line_matches_serde() {
        let mut rng = fastrand::Rng::with_seed(11);
        let odd = [
            "a\"b",
            "tab\there",
            "\u{1}",
            "é✓",
            "/x/y",
            "",
            "back\\slash",
        ];
        for i in 0..3_000 {
            let pick = |rng: &mut fastrand::Rng| odd[rng.usize(..odd.len())].to_string();
            let topic = match i % 3 {
                0 => format!(
                    "/{}/{}/thing/event/property/post",
                    pick(&mut rng),
                    pick(&mut rng)
                ),
                1 => pick(&mut rng),
                _ => "/as/mqtt/status/pk/dn".to_string(),
            };
            let mut props = vec![
                ("topic", SimpleValue::String(topic)),
                (
                    "messageId",
                    SimpleValue::String(format!("{}{}", i, pick(&mut rng))),
                ),
            ];
            if rng.bool() {
                props.push(("generateTime", SimpleValue::Long(rng.i64(..))));
            }
            if rng.bool() {
                props.push(("qos", SimpleValue::Int(rng.i32(..))));
                props.push((
                    odd[rng.usize(..odd.len())],
                    SimpleValue::String(pick(&mut rng)),
                ));
            }
            let bodies: [&[u8]; 6] = [
                br#"{"a":[1,2.5e3,"x\"y"],"b":null}"#,
                b"{\r\n \"a\": 1\n}",
                b"plain text",
                b"\x00\x01binary\xff",
                "caf\u{e9} \u{7f}".as_bytes(),
                b"",
            ];
            let body = bodies[rng.usize(..bodies.len())];
            let m = message(props, data(body));
            let mut v = decode(&m).unwrap();
            if i % 10 == 0 {
                // A generic broker's message may have no id at all.
                v.message_id = None;
            }
            for mode in [
                BodyMode::Auto,
                BodyMode::Json,
                BodyMode::Text,
                BodyMode::Base64,
            ] {
                let mut out = Vec::new();
                v.write_json(mode, &mut out);
                assert_eq!(String::from_utf8(out).unwrap(), reference_line(&v, mode));
            }
        }
    }
    use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Data, Properties};
    use fe2o3_amqp::types::primitives::Binary;

    fn message(props: Vec<(&str, SimpleValue)>, body: Body<Value>) -> Message<Body<Value>> {
        let mut ap = ApplicationProperties::builder();
        for (k, v) in props {
            ap = ap.insert(k, v);
        }
        Message::builder()
            .application_properties(ap.build())
            .body(body)
            .build()
    }

    fn data(bytes: &[u8]) -> Body<Value> {
        Body::Data(vec![Data(Binary::from(bytes.to_vec()))].into())
    }

    fn line(m: &Message<Body<Value>>) -> serde_json::Value {
        let mut out = Vec::new();
        write_line(m, &mut out).unwrap();
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(
            out.iter().filter(|b| **b == b'\n').count(),
            1,
            "exactly one line"
        );
        serde_json::from_slice(&out).unwrap()
    }

    fn base() -> Vec<(&'static str, SimpleValue)> {
        vec![
            (
                "topic",
                SimpleValue::String("/a1/dev1/thing/event/property/post".into()),
            ),
            (
                "messageId",
                SimpleValue::String("1765432109876543210".into()),
            ),
            ("generateTime", SimpleValue::Long(1714528800123)),
        ]
    }

    #[test]
    fn json_body_is_embedded_and_schema_is_stable() {
        let m = message(base(), data(br#"{"items":{"Power":{"value":"on"}}}"#));
        let mut out = Vec::new();
        write_line(&m, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"topic\":\"/a1/dev1/thing/event/property/post\",\"messageId\":\"1765432109876543210\",\
             \"generateTime\":1714528800123,\"productKey\":\"a1\",\"deviceName\":\"dev1\",\
             \"properties\":{},\"bodyEncoding\":\"json\",\
             \"body\":{\"items\":{\"Power\":{\"value\":\"on\"}}}}\n"
        );
    }

    #[test]
    fn multi_line_json_body_stays_on_one_line() {
        let m = message(
            base(),
            data(b"{\r\n  \"a\": \"x\\ny\",\n  \"b\": [1,\n2]\n}\n"),
        );
        let v = line(&m);
        assert_eq!(v["bodyEncoding"], "json");
        assert_eq!(v["body"]["a"], "x\ny");
        assert_eq!(v["body"]["b"][1], 2);
    }

    #[test]
    fn text_and_binary_bodies() {
        let v = line(&message(base(), data("temp=21.5 °C\n".as_bytes())));
        assert_eq!(v["bodyEncoding"], "text");
        assert_eq!(v["body"], "temp=21.5 °C\n");

        // Valid UTF-8, but control bytes: binary, not text.
        let v = line(&message(base(), data(&[0u8, 1, 2])));
        assert_eq!(v["bodyEncoding"], "base64");
        assert_eq!(v["body"], "AAEC");

        let raw = [0u8, 159, 146, 150, 0, 1];
        let v = line(&message(base(), data(&raw)));
        assert_eq!(v["bodyEncoding"], "base64");
        let back = base64::engine::general_purpose::STANDARD
            .decode(v["body"].as_str().unwrap())
            .unwrap();
        assert_eq!(back, raw);

        let v = line(&message(base(), Body::Empty));
        assert_eq!(v["bodyEncoding"], "text");
        assert_eq!(v["body"], "");
    }

    #[test]
    fn body_modes_force_an_encoding() {
        let m = message(base(), data(br#"{"a":1}"#));
        let v = decode(&m).unwrap();
        let enc = |mode| v.body_out(mode).0;
        assert_eq!(enc(BodyMode::Auto), BodyEncoding::Json);
        assert_eq!(enc(BodyMode::Text), BodyEncoding::Text);
        assert_eq!(enc(BodyMode::Base64), BodyEncoding::Base64);
        assert_eq!(v.body_out(BodyMode::Text).1.as_text(), r#"{"a":1}"#);
        let m = message(base(), data(b"a\x01b"));
        let v = decode(&m).unwrap();
        assert_eq!(v.body_out(BodyMode::Auto).0, BodyEncoding::Base64);
        assert_eq!(v.body_out(BodyMode::Text).0, BodyEncoding::Text);
        assert_eq!(v.body_out(BodyMode::Json).0, BodyEncoding::Base64);
        assert_eq!("base64".parse::<BodyMode>(), Ok(BodyMode::Base64));
        assert!("hex".parse::<BodyMode>().is_err());
    }

    #[test]
    fn amqp_value_bodies_and_many_data_sections() {
        let v = line(&message(
            base(),
            Body::Value(AmqpValue(Value::String("hi".into()))),
        ));
        assert_eq!(v["body"], "hi");
        let two = Body::Data(
            vec![
                Data(Binary::from(b"[1,".to_vec())),
                Data(Binary::from(b"2]".to_vec())),
            ]
            .into(),
        );
        let v = line(&message(base(), two));
        assert_eq!(v["body"], serde_json::json!([1, 2]));
        let mut out = Vec::new();
        let err = write_line(
            &message(base(), Body::Value(AmqpValue(Value::Int(3)))),
            &mut out,
        );
        assert!(matches!(err, Err(DecodeError::UnsupportedBody(_))));
        assert!(out.is_empty());
        // An amqp-value of null is how a message without a body is usually encoded.
        let v = line(&message(base(), Body::Value(AmqpValue(Value::Null))));
        assert_eq!(
            (&v["bodyEncoding"], &v["body"]),
            (&"text".into(), &"".into())
        );
    }

    #[test]
    fn other_properties_and_id_types() {
        let mut p = base();
        p[1] = ("messageId", SimpleValue::Long(42));
        p[2] = ("generateTime", SimpleValue::String("1714528800123".into()));
        p.push(("qos", SimpleValue::Int(1)));
        p.push(("tag", SimpleValue::String("a\"b".into())));
        p.push(("raw", SimpleValue::Binary(vec![1u8, 2].into())));
        let v = line(&message(p, data(b"1")));
        assert_eq!(v["messageId"], "42");
        assert_eq!(v["generateTime"], 1714528800123i64);
        assert_eq!(
            v["properties"],
            serde_json::json!({"qos":1,"tag":"a\"b","raw":"AQI="})
        );
    }

    #[test]
    fn message_id_falls_back_to_properties_section() {
        let props: Vec<_> = base()
            .into_iter()
            .filter(|(k, _)| *k != "messageId")
            .collect();
        let mut m = message(props, data(b"{}"));
        let mut out = Vec::new();
        assert_eq!(write_line(&m, &mut out), Err(DecodeError::MissingMessageId));
        m.properties = Some(Properties {
            message_id: Some(MessageId::String("p-1".into())),
            ..Default::default()
        });
        assert_eq!(line(&m)["messageId"], "p-1");
    }

    #[test]
    fn generic_mapping_falls_back_to_the_properties_section_and_the_source() {
        use fe2o3_amqp::types::primitives::Timestamp;
        const SOURCE: &str = "/amq/queue/orders";
        let generic = Mapping::Generic {
            source: SOURCE.into(),
        };
        let render = |m: &Message<Body<Value>>| {
            let mut out = Vec::new();
            generic
                .decode(m)
                .unwrap()
                .write_json(BodyMode::Auto, &mut out);
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()
        };

        // Nothing but a body: the source address, no id, no time; still written.
        let bare = message(vec![], data(b"hello"));
        let v = render(&bare);
        assert_eq!(v["topic"], SOURCE);
        assert_eq!(v["messageId"], serde_json::Value::Null);
        assert_eq!(v["generateTime"], serde_json::Value::Null);
        assert_eq!(v["productKey"], serde_json::Value::Null);
        assert_eq!(v["body"], "hello");
        assert_eq!(decode(&bare).unwrap_err(), DecodeError::MissingTopic);

        // The AMQP properties section: subject, message-id, creation-time. A subject shaped
        // like a device topic still names no device.
        let mut m = message(vec![("seq", SimpleValue::Int(7))], data(b"{}"));
        m.properties = Some(Properties {
            message_id: Some(MessageId::Ulong(99)),
            subject: Some("/a1/dev1/user/x".into()),
            creation_time: Some(Timestamp::from_milliseconds(1714528800123)),
            ..Default::default()
        });
        let v = render(&m);
        assert_eq!(v["topic"], "/a1/dev1/user/x");
        assert_eq!(v["messageId"], "99");
        assert_eq!(v["generateTime"], 1714528800123i64);
        assert_eq!(v["deviceName"], serde_json::Value::Null);
        assert_eq!(v["properties"], serde_json::json!({"seq": 7}));

        // Aliyun's application properties win, and then the topic's shape counts.
        let mut m = message(base(), data(b"{}"));
        m.properties = Some(Properties {
            message_id: Some(MessageId::String("other".into())),
            subject: Some("subject".into()),
            ..Default::default()
        });
        let v = render(&m);
        assert_eq!(v["topic"], "/a1/dev1/thing/event/property/post");
        assert_eq!(v["messageId"], "1765432109876543210");
        assert_eq!(v["generateTime"], 1714528800123i64);
        assert_eq!(v["productKey"], "a1");
        assert_eq!(line(&m), v, "same line as the Alibaba mapping");

        // A property of a type the schema cannot carry is still an error.
        let bad = message(vec![("topic", SimpleValue::Int(1))], data(b"1"));
        assert!(matches!(
            generic.decode(&bad),
            Err(DecodeError::BadField("topic", _))
        ));
    }

    #[test]
    fn missing_or_bad_fields_are_errors() {
        let mut out = Vec::new();
        let no_topic: Vec<_> = base().into_iter().filter(|(k, _)| *k != "topic").collect();
        assert_eq!(
            write_line(&message(no_topic, data(b"1")), &mut out),
            Err(DecodeError::MissingTopic)
        );
        let mut p = base();
        p[2] = ("generateTime", SimpleValue::Bool(true));
        assert!(matches!(
            write_line(&message(p, data(b"1")), &mut out),
            Err(DecodeError::BadField("generateTime", _))
        ));
        let mut p = base();
        p[2] = ("generateTime", SimpleValue::Null);
        assert_eq!(
            line(&message(p, data(b"1")))["generateTime"],
            serde_json::Value::Null
        );
        assert!(out.is_empty());
    }
}
