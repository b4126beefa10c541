//! `--metrics-listen`: Prometheus text at /metrics, /healthz and /readyz, scraped from the real
//! binary running against the emulator over TLS.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{json_message, Client, World};
use iot_sub::emulator::Drop;

const T: Duration = Duration::from_secs(20);

/// A loopback port nothing listens on (bound, read, released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// One HTTP/1.1 request; (status, content-type, body). Retries the connect until the server
/// is up (the binary binds the port a moment after it starts).
fn request(port: u16, method: &str, path: &str) -> (u16, String, String) {
    let deadline = Instant::now() + T;
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot connect to the metrics port {port}: {e}"),
        }
    };
    stream.set_read_timeout(Some(T)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head}"));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (code, content_type, body.to_string())
}

fn get(port: u16, path: &str) -> (u16, String) {
    let (code, _, body) = request(port, "GET", path);
    (code, body)
}

/// The value of the sample `series` (a name, with its labels if any) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().expect("a number"))
    })
}

/// Scrapes until `series` satisfies `ok`; returns that scrape.
fn scrape_until(port: u16, series: &str, ok: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + T;
    loop {
        let (code, text) = get(port, "/metrics");
        assert_eq!(code, 200, "{text}");
        if sample(&text, series).is_some_and(&ok) {
            return text;
        }
        if Instant::now() > deadline {
            panic!("{series} never as expected:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_health_follows_the_link() {
    let world = World::start().await;
    const N: usize = 25;
    for i in 0..N {
        world.emulator.publish(json_message(i));
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut client = Client::listen(&world.profile(""), &["--metrics-listen", &addr]);
    client.read_lines(N, T);
    assert!(
        world.emulator.wait_accepted(N, T).await,
        "{:?}",
        world.emulator.stats()
    );
    client.wait_stderr(&format!("addr={addr}"), 1, T);

    let text = scrape_until(port, "iot_sub_messages_accepted_total", |v| v == N as f64);
    let n = N as f64;
    let value = |series: &str| {
        sample(&text, series).unwrap_or_else(|| panic!("{series} in the scrape:\n{text}"))
    };
    assert!(value("iot_sub_messages_received_total") >= n);
    assert_eq!(value("iot_sub_messages_written_total"), n);
    assert_eq!(value("iot_sub_messages_duplicate_total"), 0.0);
    assert_eq!(value("iot_sub_messages_rejected_total"), 0.0);
    assert_eq!(value("iot_sub_messages_released_total"), 0.0);
    assert_eq!(value("iot_sub_connected_links"), 1.0);
    assert_eq!(value("iot_sub_up"), 1.0);
    assert_eq!(value("iot_sub_delivery_delay_seconds_count"), n);
    // Device times in the test messages are long past: every sample is in the last bucket.
    assert_eq!(
        value("iot_sub_delivery_delay_seconds_bucket{le=\"+Inf\"}"),
        n
    );
    assert_eq!(
        value("iot_sub_delivery_delay_seconds_bucket{le=\"60\"}"),
        0.0
    );
    assert!(value("iot_sub_link_credit{connection=\"test-client\"}") > 0.0);
    assert!(value("iot_sub_in_flight") >= 0.0);
    assert!(
        text.contains("# TYPE iot_sub_delivery_delay_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("# HELP iot_sub_messages_written_total "),
        "{text}"
    );

    let (code, content_type, _) = request(port, "GET", "/metrics");
    assert_eq!(code, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert_eq!(get(port, "/readyz"), (200, "ready\n".to_string()));
    assert_eq!(get(port, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(port, "/metrics?x=1").0, 200);
    assert_eq!(get(port, "/nope").0, 404);
    assert_eq!(request(port, "POST", "/metrics").0, 405);

    // Stopping closes the port with the run.
    client.signal("TERM");
    assert!(client.wait(T).success(), "{}", client.stderr());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_counted_and_not_written() {
    let world = World::start().await;
    world.emulator.set_duplicate_probability(1.0);
    const N: usize = 20;
    for i in 0..N {
        world.emulator.publish(json_message(i));
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _client = Client::listen(&world.profile(""), &["--metrics-listen", &addr]);
    assert!(
        world.emulator.wait_accepted(N, T).await,
        "{:?}",
        world.emulator.stats()
    );
    let text = scrape_until(port, "iot_sub_messages_duplicate_total", |v| v == N as f64);
    assert_eq!(
        sample(&text, "iot_sub_messages_written_total"),
        Some(N as f64),
        "{text}"
    );
    assert!(sample(&text, "iot_sub_messages_received_total").unwrap() >= 2.0 * N as f64);
    assert_eq!(
        sample(&text, "iot_sub_delivery_delay_seconds_count"),
        Some(N as f64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_any_link_not_ready_but_healthy_and_failures_counted_by_cause() {
    let world = World::start().await;
    let port = free_port();
    // A bare port means loopback.
    let profile = world.profile("backoff_initial = \"200ms\"");
    let client =
        Client::listen_with_secret(&profile, &["--metrics-listen", &port.to_string()], "wrong");
    client.wait_stderr("LOGIN REJECTED", 1, T);
    scrape_until(
        port,
        "iot_sub_reconnects_total{cause=\"login_rejected\"}",
        |v| v >= 1.0,
    );
    let (code, body) = get(port, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no receiver link"), "{body}");
    // Still within the grace before a run without links counts as unhealthy.
    assert_eq!(get(port, "/healthz").0, 200);
    let text = get(port, "/metrics").1;
    assert_eq!(
        sample(&text, "iot_sub_connected_links"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(sample(&text, "iot_sub_up"), Some(1.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_is_an_error_at_start_and_a_bad_address_a_usage_error() {
    let world = World::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut client = Client::listen(&world.profile(""), &["--metrics-listen", &addr]);
    let status = client.wait(T);
    assert_eq!(status.code(), Some(1), "{}", client.stderr());
    assert!(
        client
            .stderr()
            .contains(&format!("cannot listen for metrics on {addr}")),
        "{}",
        client.stderr()
    );

    let mut client = Client::listen(&world.profile(""), &["--metrics-listen", "localhost"]);
    assert_eq!(client.wait(T).code(), Some(2), "{}", client.stderr());
    assert!(
        client.stderr().contains("--metrics-listen"),
        "{}",
        client.stderr()
    );
}

/// Reconnects leave no task behind: after the server drops the connection again and again
/// (both ways), the runtime's alive-task gauge comes back to where it was with one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alive_tasks_come_back_to_their_level_after_reconnects() {
    const DROPS: usize = 8;
    // Scrape connections and closing tasks may still be around; one leaked task per reconnect
    // (DROPS in all) is well past this.
    const SLACK: f64 = 3.0;
    let world = World::start().await;
    let port = free_port();
    let profile = world.profile("backoff_initial = \"50ms\"\nbackoff_max = \"200ms\"");
    let client = Client::listen(&profile, &["--metrics-listen", &port.to_string()]);
    world.emulator.publish(json_message(0));
    assert!(
        world.emulator.wait_accepted(1, T).await,
        "{}",
        client.stderr()
    );
    let text = scrape_until(port, "iot_sub_connected_links", |v| v == 1.0);
    let baseline = sample(&text, "iot_sub_tokio_alive_tasks")
        .unwrap_or_else(|| panic!("iot_sub_tokio_alive_tasks in the scrape:\n{text}"));
    assert!(baseline >= 1.0, "the scrape itself runs in a task:\n{text}");

    for i in 1..=DROPS {
        let how = if i % 2 == 1 {
            Drop::ServerClose
        } else {
            Drop::TcpReset
        };
        world.emulator.drop_connections(how);
        client.wait_stderr("receiver link attached", i + 1, T);
        // The new link carries messages before the next drop.
        world.emulator.publish(json_message(i));
        assert!(
            world.emulator.wait_accepted(i + 1, T).await,
            "{:?}\n{}",
            world.emulator.stats(),
            client.stderr()
        );
    }
    scrape_until(
        port,
        "iot_sub_reconnects_total{cause=\"server_closed\"}",
        |v| v >= (DROPS / 2) as f64,
    );
    scrape_until(port, "iot_sub_tokio_alive_tasks", |v| v <= baseline + SLACK);
}
