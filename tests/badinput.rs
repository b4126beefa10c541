//! End to end: malformed and odd deliveries (bad property types, invalid encodings put on the
//! wire byte for byte, missing fields, odd bodies, huge messages) through the real binary.
//! Each is either rejected with a log line naming why, or written as a correct line; nothing
//! panics, the link never stalls and never drops, and good messages keep flowing.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{ids, json_message, Client, World};
use iot_sub::emulator::{DeviceMessage, Emulator, ExtraValue};

const T: Duration = Duration::from_secs(30);

/// Hand encoding of AMQP 1.0 values and message sections (AMQP 1.0 part 1 §1.6, part 3 §3.2),
/// independent of the library under test, so invalid encodings can be written too.
mod amqp {
    pub fn str_bytes(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![0xb1]; // str32-utf8
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
        out
    }

    pub fn string(s: &str) -> Vec<u8> {
        str_bytes(s.as_bytes())
    }

    pub fn long(n: i64) -> Vec<u8> {
        let mut out = vec![0x81];
        out.extend_from_slice(&n.to_be_bytes());
        out
    }

    pub fn ulong(n: u64) -> Vec<u8> {
        let mut out = vec![0x80];
        out.extend_from_slice(&n.to_be_bytes());
        out
    }

    pub fn binary(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![0xb0]; // vbin32
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
        out
    }

    fn compound(code: u8, count: usize, items: &[u8]) -> Vec<u8> {
        let mut out = vec![code];
        out.extend_from_slice(&(items.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(&(count as u32).to_be_bytes());
        out.extend_from_slice(items);
        out
    }

    pub fn list(items: &[Vec<u8>]) -> Vec<u8> {
        compound(0xd0, items.len(), &items.concat())
    }

    pub fn map(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let body: Vec<u8> = pairs
            .iter()
            .flat_map(|(k, v)| [k.clone(), v.clone()])
            .flatten()
            .collect();
        compound(0xd1, pairs.len() * 2, &body)
    }

    /// A described value with a small-ulong descriptor code.
    pub fn described(code: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![0x00, 0x53, code];
        out.extend_from_slice(value);
        out
    }

    /// application-properties with string keys.
    pub fn application_properties(pairs: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let pairs: Vec<_> = pairs.iter().map(|(k, v)| (string(k), v.clone())).collect();
        described(0x74, &map(&pairs))
    }

    /// properties with only message-id set.
    pub fn properties_with_message_id(id: &[u8]) -> Vec<u8> {
        described(0x73, &list(&[id.to_vec()]))
    }

    pub fn data(bytes: &[u8]) -> Vec<u8> {
        described(0x75, &binary(bytes))
    }

    pub fn amqp_value(value: &[u8]) -> Vec<u8> {
        described(0x77, value)
    }

    pub fn amqp_sequence(items: &[Vec<u8>]) -> Vec<u8> {
        described(0x76, &list(items))
    }
}

/// The usual three properties (string topic and id, long generateTime) plus `extra`.
fn props(topic: &[u8], id: &str, extra: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut all = vec![
        ("topic", amqp::str_bytes(topic)),
        ("messageId", amqp::string(id)),
        ("generateTime", amqp::long(1_714_528_800_000)),
    ];
    all.extend(extra.iter().cloned());
    amqp::application_properties(&all)
}

const TOPIC: &[u8] = b"/a1Bad/dev1/user/raw";

/// Polls the emulator until it has recorded `n` rejections.
async fn wait_rejected(emulator: &Emulator, n: u64) {
    let deadline = Instant::now() + T;
    while emulator.stats().rejected < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} rejections: {:?}",
            emulator.stats().rejected,
            emulator.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `bad` (each must be rejected, naming `reason` on stderr) and `writable` (each
/// must be written), interleaved with good messages, through a link with credit 4; checks
/// which lines come out, the log, the emulator's rejections and that one connection did all.
async fn run(
    world: &World,
    bad: Vec<(&str, Publish)>,
    writable: Vec<Publish>,
) -> HashMap<String, serde_json::Value> {
    let mut want = HashSet::new();
    let mut wanted_reasons = Vec::new();
    let publish = |p: Publish| match p {
        Publish::Typed(m) => world.emulator.publish(m),
        Publish::Encoded(id, sections) => world.emulator.publish_encoded(id, sections),
    };
    for (i, (reason, p)) in bad.into_iter().enumerate() {
        wanted_reasons.push(reason);
        publish(p);
        let good = json_message(i);
        want.insert(good.message_id.clone());
        world.emulator.publish(good);
    }
    for p in writable {
        want.insert(p.id().to_string());
        publish(p);
    }
    let rejects = wanted_reasons.len() as u64;
    // Credit 4: a delivery left unsettled on any path would stall the link within four.
    let profile = world.profile("credit = 4");
    let mut client = Client::listen(&profile, &["--count", &want.len().to_string()]);
    let lines = client.read_lines(want.len(), T);
    assert!(client.wait(T).success(), "{}", client.stderr());
    let got: HashSet<String> = ids(&lines).into_iter().collect();
    assert_eq!(
        got, want,
        "exactly the good and writable messages are written"
    );

    wait_rejected(&world.emulator, rejects).await;
    let stderr = client.stderr();
    assert!(!stderr.contains("panicked"), "{stderr}");
    for reason in wanted_reasons {
        assert!(
            stderr.contains(reason),
            "no log line with `{reason}`:\n{stderr}"
        );
    }
    assert!(
        stderr.matches("rejecting a delivery").count() as u64 >= rejects,
        "one log line per rejection:\n{stderr}"
    );
    let stats = world.emulator.stats();
    assert_eq!(
        stats.connections_accepted, 1,
        "no bad delivery cost the connection: {stats:?}"
    );
    lines
        .into_iter()
        .map(|l| (l["messageId"].as_str().unwrap().to_string(), l))
        .collect()
}

enum Publish {
    Typed(DeviceMessage),
    Encoded(String, Vec<u8>),
}

impl Publish {
    fn id(&self) -> &str {
        match self {
            Publish::Typed(m) => &m.message_id,
            Publish::Encoded(id, _) => id,
        }
    }
}

fn typed(id: &str, extra: Vec<(&str, ExtraValue)>, body: &[u8]) -> Publish {
    Publish::Typed(DeviceMessage {
        topic: String::from_utf8(TOPIC.to_vec()).unwrap(),
        message_id: id.to_string(),
        generate_time: 1_714_528_800_000,
        body: body.to_vec(),
        extra_properties: extra.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    })
}

fn encoded(id: &str, sections: Vec<Vec<u8>>) -> Publish {
    Publish::Encoded(id.to_string(), sections.concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_fields_of_the_wrong_type_are_rejected() {
    let world = World::start().await;
    let body = br#"{"a":1}"#;
    let bad = vec![
        (
            "field `topic`: integer",
            typed("t-long", vec![("topic", ExtraValue::Long(7))], body),
        ),
        (
            "field `topic`: binary",
            typed(
                "t-bin",
                vec![("topic", ExtraValue::Binary(b"/a/b".to_vec()))],
                body,
            ),
        ),
        (
            "field `messageId`: boolean is not an id",
            typed("m-bool", vec![("messageId", ExtraValue::Bool(false))], body),
        ),
        (
            "field `messageId`: binary is not an id",
            typed(
                "m-bin",
                vec![("messageId", ExtraValue::Binary(vec![1, 2]))],
                body,
            ),
        ),
        (
            "field `generateTime`: string is not milliseconds",
            typed(
                "g-str",
                vec![("generateTime", ExtraValue::String("yesterday".into()))],
                body,
            ),
        ),
        (
            "field `generateTime`: binary is not milliseconds",
            typed(
                "g-bin",
                vec![("generateTime", ExtraValue::Binary(vec![0; 8]))],
                body,
            ),
        ),
        (
            "field `generateTime`: integer is not milliseconds",
            encoded(
                "g-ulong",
                vec![
                    amqp::application_properties(&[
                        ("topic", amqp::str_bytes(TOPIC)),
                        ("messageId", amqp::string("g-ulong")),
                        ("generateTime", amqp::ulong(u64::MAX)),
                    ]),
                    amqp::data(body),
                ],
            ),
        ),
        (
            "field `topic`: described value",
            encoded(
                "t-described",
                vec![
                    amqp::application_properties(&[
                        ("topic", amqp::described(0x99, &amqp::str_bytes(TOPIC))),
                        ("messageId", amqp::string("t-described")),
                    ]),
                    amqp::data(body),
                ],
            ),
        ),
    ];
    // A numeric id, a numeric-string generateTime and a described value among the other
    // properties are fine.
    let writable = vec![
        typed(
            "s-time",
            vec![("generateTime", ExtraValue::String(" 1714528800123 ".into()))],
            body,
        ),
        encoded(
            "odd-extra",
            vec![
                props(
                    TOPIC,
                    "odd-extra",
                    &[("weird", amqp::described(0x42, &amqp::long(5)))],
                ),
                amqp::data(body),
            ],
        ),
    ];
    let lines = run(&world, bad, writable).await;
    assert_eq!(lines["s-time"]["generateTime"], 1714528800123i64);
    assert_eq!(
        lines["odd-extra"]["properties"],
        serde_json::json!({"weird": null})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_encodings_on_the_wire_are_rejected_not_fatal() {
    let world = World::start().await;
    let body = amqp::data(br#"{"a":1}"#);
    let bad = vec![
        // Not UTF-8 (0xff never occurs in UTF-8) in an AMQP str: fe2o3 cannot decode it.
        (
            "cannot decode the message",
            encoded(
                "utf8-topic",
                vec![
                    props(b"/a1Bad/\xff\xfe/user/raw", "utf8-topic", &[]),
                    body.clone(),
                ],
            ),
        ),
        // A UTF-8 sequence cut short at the end of the string.
        (
            "cannot decode the message",
            encoded(
                "utf8-cut",
                vec![props(b"/a1Bad/dev\xe2\x82", "utf8-cut", &[]), body.clone()],
            ),
        ),
        // A list and a map where application-properties allow only simple values.
        (
            "cannot decode the message",
            encoded(
                "list-prop",
                vec![
                    props(
                        TOPIC,
                        "list-prop",
                        &[("tags", amqp::list(&[amqp::long(1)]))],
                    ),
                    body.clone(),
                ],
            ),
        ),
        (
            "cannot decode the message",
            encoded(
                "map-prop",
                vec![
                    props(
                        TOPIC,
                        "map-prop",
                        &[("nested", amqp::map(&[(amqp::string("k"), amqp::long(1))]))],
                    ),
                    body.clone(),
                ],
            ),
        ),
        // A key that is not a string.
        (
            "cannot decode the message",
            encoded(
                "long-key",
                vec![
                    amqp::described(
                        0x74,
                        &amqp::map(&[
                            (amqp::string("topic"), amqp::str_bytes(TOPIC)),
                            (amqp::long(1), amqp::string("x")),
                        ]),
                    ),
                    body.clone(),
                ],
            ),
        ),
        // The map says it is longer than the message.
        (
            "cannot decode the message",
            encoded(
                "cut-short",
                vec![{
                    let mut p = props(TOPIC, "cut-short", &[]);
                    p.truncate(p.len() - 5);
                    p
                }],
            ),
        ),
        // A map header claiming 2^32-1 entries in a few bytes (no allocation of that size).
        (
            "cannot decode the message",
            encoded(
                "huge-count",
                vec![
                    amqp::described(
                        0x74,
                        &[
                            0xd1, 0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0x40, 0x40, 0x40, 0x40,
                        ],
                    ),
                    body.clone(),
                ],
            ),
        ),
        // Sizes and counts serde_amqp subtracts from without checking (a debug build panics
        // there unless Cargo.toml turns its overflow checks off, as release builds have them).
        (
            "cannot decode the message",
            encoded(
                "map8-size-0",
                vec![amqp::described(0x74, &[0xc1, 0x00, 0x00]), body.clone()],
            ),
        ),
        (
            "cannot decode the message",
            encoded(
                "map8-odd-count",
                vec![
                    amqp::described(0x74, &[0xc1, 0x02, 0x01, 0x40]),
                    body.clone(),
                ],
            ),
        ),
        (
            "cannot decode the message",
            encoded(
                "list8-size-0",
                vec![
                    props(TOPIC, "list8-size-0", &[]),
                    // An amqp-sequence section holding a list8 whose size byte is 0.
                    amqp::described(0x76, &[0xc0, 0x00, 0x00]),
                ],
            ),
        ),
        // A section descriptor that does not exist.
        (
            "cannot decode the message",
            encoded(
                "no-such-section",
                vec![
                    props(TOPIC, "no-such-section", &[]),
                    amqp::described(0x7f, &amqp::long(1)),
                ],
            ),
        ),
    ];
    // Control: the same hand encoding with valid bytes is written, so the rejections above
    // are about the bytes, not about the injection.
    let writable = vec![encoded(
        "control",
        vec![
            props("/a1Bad/dév1/user/raw".as_bytes(), "control", &[]),
            body.clone(),
        ],
    )];
    let lines = run(&world, bad, writable).await;
    assert_eq!(lines["control"]["topic"], "/a1Bad/dév1/user/raw");
    assert_eq!(lines["control"]["deviceName"], "dév1");
    assert_eq!(lines["control"]["body"], serde_json::json!({"a": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_fields_and_odd_bodies() {
    let world = World::start().await;
    let bad = vec![
        (
            "no `topic` application property",
            encoded(
                "no-topic",
                vec![
                    amqp::application_properties(&[("messageId", amqp::string("no-topic"))]),
                    amqp::data(b"{}"),
                ],
            ),
        ),
        (
            "no `messageId` application property and no properties.message-id",
            encoded(
                "no-id",
                vec![
                    amqp::application_properties(&[("topic", amqp::str_bytes(TOPIC))]),
                    amqp::data(b"{}"),
                ],
            ),
        ),
        (
            "no `topic` application property",
            encoded("no-properties-at-all", vec![amqp::data(b"{}")]),
        ),
        (
            "unsupported body: amqp-sequence",
            encoded(
                "sequence",
                vec![
                    props(TOPIC, "sequence", &[]),
                    amqp::amqp_sequence(&[amqp::long(1)]),
                ],
            ),
        ),
        (
            "unsupported body: amqp-value that is not binary or string",
            encoded(
                "value-long",
                vec![
                    props(TOPIC, "value-long", &[]),
                    amqp::amqp_value(&amqp::long(1)),
                ],
            ),
        ),
        (
            "unsupported body: amqp-value that is not binary or string",
            encoded(
                "value-list",
                vec![
                    props(TOPIC, "value-list", &[]),
                    amqp::amqp_value(&amqp::list(&[])),
                ],
            ),
        ),
    ];
    let invalid_utf8 = vec![0xc3, 0x28, 0xa0, 0xa1, 0xff];
    let writable = vec![
        // The id only in the properties section (a ulong, as some clouds send).
        encoded(
            "42",
            vec![
                amqp::properties_with_message_id(&amqp::ulong(42)),
                amqp::application_properties(&[("topic", amqp::str_bytes(TOPIC))]),
                amqp::data(b"{}"),
            ],
        ),
        // No body section of its own: only the empty amqp-value fe2o3 writes for "no body".
        encoded("no-body", vec![props(TOPIC, "no-body", &[])]),
        typed("empty-body", vec![], b""),
        encoded(
            "value-string",
            vec![
                props(TOPIC, "value-string", &[]),
                amqp::amqp_value(&amqp::string("on")),
            ],
        ),
        encoded(
            "value-binary",
            vec![
                props(TOPIC, "value-binary", &[]),
                amqp::amqp_value(&amqp::binary(&[0, 1])),
            ],
        ),
        typed("bad-utf8-body", vec![], &invalid_utf8),
        typed("bad-json-body", vec![], br#"{"temp": 21.5,"#),
        typed("nul-body", vec![], b"{\"a\":1}\0"),
    ];
    let lines = run(&world, bad, writable).await;
    let body = |id: &str| (lines[id]["bodyEncoding"].clone(), lines[id]["body"].clone());
    assert_eq!(lines["42"]["topic"], std::str::from_utf8(TOPIC).unwrap());
    assert_eq!(body("no-body"), ("text".into(), "".into()));
    assert_eq!(body("empty-body"), ("text".into(), "".into()));
    assert_eq!(body("value-string"), ("text".into(), "on".into()));
    assert_eq!(body("value-binary"), ("base64".into(), "AAE=".into()));
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(
        body("bad-utf8-body"),
        ("base64".into(), b64.encode(&invalid_utf8).into())
    );
    assert_eq!(
        body("bad-json-body"),
        ("text".into(), r#"{"temp": 21.5,"#.into())
    );
    assert_eq!(
        body("nul-body"),
        ("base64".into(), b64.encode(b"{\"a\":1}\0").into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_property_counts_and_keys_are_written() {
    let world = World::start().await;
    // Both bigger than the 64 KiB max-frame-size of either side: the transfers span frames.
    let many = DeviceMessage {
        topic: String::from_utf8(TOPIC.to_vec()).unwrap(),
        message_id: "many-props".into(),
        generate_time: 1_714_528_800_000,
        body: b"1".to_vec(),
        extra_properties: (0..20_000)
            .map(|i| (format!("p{i}"), ExtraValue::Long(i)))
            .collect(),
    };
    let long_key = "k".repeat(200_000);
    let long_value = "v".repeat(300_000);
    let writable = vec![
        Publish::Typed(many),
        typed(
            "long-key",
            vec![(long_key.as_str(), ExtraValue::String(long_value.clone()))],
            b"1",
        ),
    ];
    let lines = run(&world, Vec::new(), writable).await;
    let props = lines["many-props"]["properties"].as_object().unwrap();
    assert_eq!(props.len(), 20_000);
    assert_eq!(props["p19999"], 19_999);
    assert_eq!(
        lines["long-key"]["properties"][&long_key],
        long_value.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bodies_span_many_frames_and_arrive_whole() {
    let world = World::start().await;
    let mut json = Vec::with_capacity(1 << 20);
    json.extend_from_slice(b"{\"samples\":[");
    let mut i = 0u64;
    while json.len() < (1 << 20) - 32 {
        json.extend_from_slice(format!("{i},").as_bytes());
        i += 1;
    }
    json.extend_from_slice(b"0]}");
    let binary: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let writable = vec![
        typed("one-mib-json", vec![], &json),
        typed("sixteen-mib-binary", vec![], &binary),
        Publish::Typed(json_message(1)),
    ];
    let lines = run(&world, Vec::new(), writable).await;
    let got_json = &lines["one-mib-json"];
    assert_eq!(got_json["bodyEncoding"], "json");
    assert_eq!(
        serde_json::to_vec(&got_json["body"]).unwrap(),
        serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(&json).unwrap()).unwrap()
    );
    let got_binary = &lines["sixteen-mib-binary"];
    assert_eq!(got_binary["bodyEncoding"], "base64");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(got_binary["body"].as_str().unwrap())
        .unwrap();
    // At most 64 KiB per frame on either side: that is over 256 transfer frames.
    assert!(decoded == binary, "the 16 MiB body arrives byte for byte");
}

/// A string whose length field claims ~4 GiB while the message holds a few bytes. Unpatched,
/// the AMQP decoder allocated the claimed size first; under an address-space limit (like
/// `LimitAS=` or a small device) that aborted the process, and the cloud redelivered the
/// message to the restarted one: a crash loop. vendor/serde_amqp/PATCH.md has the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_claiming_gigabytes_is_rejected_without_allocating_it() {
    let world = World::start().await;
    let mut liar = vec![0xb1]; // str32-utf8
    liar.extend_from_slice(&0xF000_0000u32.to_be_bytes());
    liar.extend_from_slice(b"short");
    let sections = [
        props(TOPIC, "liar", &[("note", liar)]),
        amqp::data(br#"{"a":1}"#),
    ]
    .concat();
    world
        .emulator
        .publish_encoded(String::from("liar"), sections);
    let good = json_message(1);
    world.emulator.publish(good.clone());

    let profile = world.profile("credit = 4");
    // 1 GiB of address space: plenty for iot-sub, far short of the claimed 3.75 GiB.
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "ulimit -v 1048576 && exec \"$0\" \"$@\""])
        .arg(common::bin())
        .args(["listen", "--config"])
        .arg(&profile)
        .args(["--profile", "t", "--count", "1"])
        .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", common::KEY_SECRET)
        .env("RUST_LOG", "info");
    let mut client = Client::spawn(cmd);
    let lines = client.read_lines(1, T);
    let status = client.wait(T);
    let stderr = client.stderr();
    assert!(status.success(), "{status:?}\n{stderr}");
    assert_eq!(ids(&lines), vec![good.message_id]);
    wait_rejected(&world.emulator, 1).await;
    assert!(stderr.contains("rejecting a delivery"), "{stderr}");
    assert!(!stderr.contains("memory allocation"), "{stderr}");
}
