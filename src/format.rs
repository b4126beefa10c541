//! Output formats: JSON lines (default), a one-line template, and a readable multi-line view.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use crate::message::{BodyEncoding, BodyMode, JsonSimple, View};

/// `--format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line (the schema in `message`).
    Json,
    /// A readable block per message, for a person at a terminal.
    Pretty,
    /// One line per message from a template such as `{topic} {deviceName} {body}`.
    Template(Template),
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Format::Json),
            "pretty" => Ok(Format::Pretty),
            t if t.contains('{') => Template::parse(t).map(Format::Template),
            other => Err(format!(
                "unknown format `{other}`: use json, pretty, or a template with fields such as {{topic}} {{body}}"
            )),
        }
    }
}

impl Format {
    /// Appends `view` rendered in this format.
    pub fn render(&self, view: &View<'_>, body: BodyMode, out: &mut Vec<u8>) {
        match self {
            Format::Json => view.write_json(body, out),
            Format::Pretty => pretty(view, body, out),
            Format::Template(t) => t.render(view, body, out),
        }
    }
}

/// A field a template can name; the names are the JSON keys.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Topic,
    MessageId,
    GenerateTime,
    ProductKey,
    DeviceName,
    Properties,
    Property(String),
    BodyEncoding,
    Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// A parsed `--format` template. `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// The names a template can use.
pub const TEMPLATE_FIELDS: &str =
    "topic, messageId, generateTime, productKey, deviceName, properties, properties.NAME, bodyEncoding, body";

impl Template {
    /// Parses a template, rejecting unknown field names.
    pub fn parse(template: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(format!("unclosed `{{{name}` in the template"));
                    }
                    let field = match name.as_str() {
                        "topic" => Field::Topic,
                        "messageId" => Field::MessageId,
                        "generateTime" => Field::GenerateTime,
                        "productKey" => Field::ProductKey,
                        "deviceName" => Field::DeviceName,
                        "properties" => Field::Properties,
                        "bodyEncoding" => Field::BodyEncoding,
                        "body" => Field::Body,
                        p if p.starts_with("properties.") && p.len() > 11 => {
                            Field::Property(p[11..].to_string())
                        }
                        other => {
                            return Err(format!(
                                "unknown template field `{{{other}}}`; fields: {TEMPLATE_FIELDS}"
                            ))
                        }
                    };
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Field(field));
                }
                '}' => return Err("unmatched `}` in the template (write `}}` for a brace)".into()),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template { parts })
    }

    /// One line: values are written as text, with control characters escaped (`\n`, `\t`,
    /// `\u{1}`) so that a message is always exactly one line; missing values are empty.
    fn render(&self, view: &View<'_>, body: BodyMode, out: &mut Vec<u8>) {
        let mut line = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => line.push_str(t),
                Part::Field(f) => match f {
                    Field::Topic => escape_into(&mut line, view.topic),
                    Field::MessageId => {
                        escape_into(&mut line, view.message_id.as_deref().unwrap_or(""))
                    }
                    Field::GenerateTime => {
                        if let Some(t) = view.generate_time {
                            let _ = write!(line, "{t}");
                        }
                    }
                    Field::ProductKey => escape_into(&mut line, view.product_key.unwrap_or("")),
                    Field::DeviceName => escape_into(&mut line, view.device_name.unwrap_or("")),
                    Field::Properties => {
                        let map: serde_json::Map<String, serde_json::Value> = view
                            .other_properties()
                            .map(|(k, v)| {
                                (
                                    k.to_string(),
                                    serde_json::to_value(JsonSimple(v)).unwrap_or_default(),
                                )
                            })
                            .collect();
                        line.push_str(&serde_json::Value::Object(map).to_string());
                    }
                    Field::Property(name) => {
                        if let Some(v) = view.property(name) {
                            match serde_json::to_value(JsonSimple(v)) {
                                Ok(serde_json::Value::String(s)) => escape_into(&mut line, &s),
                                Ok(serde_json::Value::Null) | Err(_) => {}
                                Ok(other) => line.push_str(&other.to_string()),
                            }
                        }
                    }
                    Field::BodyEncoding => line.push_str(view.body_out(body).0.as_str()),
                    Field::Body => escape_into(&mut line, view.body_out(body).1.as_text()),
                },
            }
        }
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// Milliseconds since the epoch as RFC 3339, if they fall in the years 1970 to 9999 (beyond,
/// humantime's formatter fails rather than write them).
fn rfc3339(ms: i64) -> Option<String> {
    let at = UNIX_EPOCH.checked_add(Duration::from_millis(u64::try_from(ms).ok()?))?;
    let mut out = String::new();
    write!(out, "{}", humantime::format_rfc3339_millis(at)).ok()?;
    Some(out)
}

/// A block per message: time and topic, then the ids and properties, then the body indented.
fn pretty(view: &View<'_>, body: BodyMode, out: &mut Vec<u8>) {
    let mut s = String::new();
    let when = match view.generate_time {
        None => "-".to_string(),
        Some(ms) => rfc3339(ms).unwrap_or_else(|| ms.to_string()),
    };
    s.push_str(&when);
    s.push_str("  ");
    escape_into(&mut s, view.topic);
    s.push_str("\n  messageId=");
    escape_into(&mut s, view.message_id.as_deref().unwrap_or("-"));
    if let Some(pk) = view.product_key {
        s.push_str(" productKey=");
        escape_into(&mut s, pk);
    }
    if let Some(dn) = view.device_name {
        s.push_str(" deviceName=");
        escape_into(&mut s, dn);
    }
    for (k, v) in view.other_properties() {
        let value = serde_json::to_value(JsonSimple(v)).unwrap_or_default();
        let _ = write!(s, " {k}={value}");
    }
    let (encoding, text) = view.body_out(body);
    match encoding {
        BodyEncoding::Json => {
            let value: serde_json::Value = serde_json::from_str(text.as_text()).unwrap_or_default();
            let pretty = serde_json::to_string_pretty(&value).unwrap_or_default();
            s.push('\n');
            for line in pretty.lines() {
                s.push_str("  ");
                s.push_str(line);
                s.push('\n');
            }
        }
        BodyEncoding::Text => {
            s.push('\n');
            for line in text.as_text().lines() {
                s.push_str("  ");
                escape_into(&mut s, line);
                s.push('\n');
            }
        }
        BodyEncoding::Base64 => {
            let _ = writeln!(
                s,
                "\n  ({} bytes, base64) {}",
                view.body.len(),
                text.as_text()
            );
        }
    }
    s.push('\n');
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::decode;
    use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Data, Message};
    use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};

    fn msg(body: &[u8]) -> Message<Body<Value>> {
        Message::builder()
            .application_properties(
                ApplicationProperties::builder()
                    .insert("topic", "/a1/dev1/user/log")
                    .insert("messageId", "42")
                    .insert("generateTime", SimpleValue::Long(1714528800123))
                    .insert("qos", SimpleValue::Int(1))
                    .build(),
            )
            .body(Body::Data(vec![Data(Binary::from(body.to_vec()))].into()))
            .build()
    }

    fn render(format: &str, body: &[u8]) -> String {
        let f: Format = format.parse().unwrap();
        let m = msg(body);
        let mut out = Vec::new();
        f.render(&decode(&m).unwrap(), BodyMode::Auto, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn templates_use_the_json_field_names() {
        assert_eq!(
            render("{topic} {productKey}/{deviceName} {messageId}@{generateTime} q={properties.qos} {bodyEncoding} {body}", b"{\"t\": 1}"),
            "/a1/dev1/user/log a1/dev1 42@1714528800123 q=1 json {\"t\": 1}\n"
        );
        assert_eq!(
            render("{{{topic}}} {properties}", b"x"),
            "{/a1/dev1/user/log} {\"qos\":1}\n"
        );
        assert_eq!(
            render("{properties.missing}|{body}", b"two\nlines\t!"),
            "|two\\nlines\\t!\n"
        );
        assert_eq!(render("{body}", &[0, 1, 2]), "AAEC\n");
    }

    #[test]
    fn template_errors_name_the_field() {
        let e = "{topic} {device}".parse::<Format>().unwrap_err();
        assert!(e.contains("`{device}`") && e.contains("deviceName"), "{e}");
        assert!("{topic".parse::<Format>().unwrap_err().contains("unclosed"));
        assert!("a }".parse::<Format>().is_err());
        assert!("yaml".parse::<Format>().is_err());
    }

    #[test]
    fn pretty_is_a_readable_block() {
        let out = render("pretty", br#"{"items":{"T":1}}"#);
        assert!(
            out.starts_with("2024-05-01T02:00:00.123Z  /a1/dev1/user/log\n"),
            "{out}"
        );
        assert!(
            out.contains("messageId=42 productKey=a1 deviceName=dev1 qos=1"),
            "{out}"
        );
        assert!(out.contains("  {\n    \"items\": {\n"), "{out}");
        assert!(out.ends_with("}\n\n"), "{out}");
        let out = render("pretty", &[0xff, 0]);
        assert!(out.contains("(2 bytes, base64) /wA="), "{out}");
    }

    #[test]
    fn pretty_writes_times_beyond_the_year_9999_as_numbers() {
        assert_eq!(rfc3339(0).as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(rfc3339(253_402_300_800_000), None, "year 10000");
        assert_eq!(rfc3339(-1), None);
        let mut m = msg(b"x");
        let props = m.application_properties.as_mut().unwrap();
        props
            .0
            .insert("generateTime".into(), SimpleValue::Long(i64::MAX));
        let mut out = Vec::new();
        Format::Pretty.render(&decode(&m).unwrap(), BodyMode::Auto, &mut out);
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with("9223372036854775807  /a1/dev1/user/log\n"),
            "{out}"
        );
    }
}
