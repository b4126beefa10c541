//! Fuzz target: arbitrary bytes as a transfer's payload, decoded the way iot-sub's receiving end
//! does (`transport/engine.rs`), then through `message::decode` and every output format.
//! It must never panic; a decoded delivery gives a `DecodeError` or one line of JSON.

#![no_main]

use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use iot_sub::format::Format;
use iot_sub::message::{decode, BodyMode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let reader = serde_amqp::read::SliceReader::new(payload);
    // A payload that does not decode is rejected by the receiving end.
    let Ok(message) = Body::<Value>::decode_message_from_reader(reader) else {
        return;
    };
    let view = match decode(&message) {
        Ok(view) => view,
        Err(reason) => {
            assert!(!reason.to_string().contains('\n'));
            return;
        }
    };
    let template: Format =
        "{topic} {messageId} {generateTime} {properties} {properties.qos} {body}"
            .parse()
            .expect("a valid template");
    let mut out = Vec::new();
    for mode in [
        BodyMode::Auto,
        BodyMode::Json,
        BodyMode::Text,
        BodyMode::Base64,
    ] {
        out.clear();
        view.write_json(mode, &mut out);
        assert_eq!(
            out.iter().position(|b| *b == b'\n'),
            Some(out.len() - 1),
            "one line"
        );
        let line: serde_json::Value = serde_json::from_slice(&out).expect("the line is JSON");
        assert_eq!(line["topic"].as_str(), Some(view.topic));
        assert_eq!(line["messageId"].as_str(), view.message_id.as_deref());
        out.clear();
        template.render(&view, mode, &mut out);
        assert_eq!(
            out.iter().position(|b| *b == b'\n'),
            Some(out.len() - 1),
            "one line"
        );
        out.clear();
        Format::Pretty.render(&view, mode, &mut out);
    }
});
