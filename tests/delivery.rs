//! What happens to the stream: --exec, --exec-each, dedup, filters, formats, stop conditions,
//! several connections, reordering. The real binary against the emulator over TLS.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{ids, json_message, rss_kib, Client, World};
use iot_sub::emulator::DeviceMessage;

const T: Duration = Duration::from_secs(30);

fn ids_in_file(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            v["messageId"].as_str().unwrap().to_string()
        })
        .collect()
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn message_on(topic: &str, i: usize) -> DeviceMessage {
    DeviceMessage {
        topic: topic.to_string(),
        ..json_message(i)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_child_that_exits_mid_stream_is_restarted_and_nothing_is_lost() {
    let world = World::start().await;
    const N: usize = 200;
    for i in 0..N {
        world.emulator.publish(json_message(i));
    }
    let out = world.dir.path().join("out.jsonl");
    // Reads line by line and exits after 25 lines: eight restarts for 200 messages.
    let child = format!(
        "n=0; while IFS= read -r line; do printf '%s\\n' \"$line\" >> '{}'; n=$((n+1)); [ $n -ge 25 ] && exit 7; done",
        out.display()
    );
    let profile = world.profile("");
    let mut client = Client::listen(&profile, &["--exec", &child]);
    assert!(
        world.emulator.wait_accepted(N, T).await,
        "{:?}\n{}",
        world.emulator.stats(),
        client.stderr()
    );
    client.signal("TERM");
    assert!(client.wait(T).success());
    assert!(
        client.rest_of_lines(T).is_empty(),
        "nothing on iot-sub's own stdout"
    );
    let got: HashSet<String> = ids_in_file(&out).into_iter().collect();
    let want: HashSet<String> = (0..N).map(|i| json_message(i).message_id).collect();
    assert_eq!(got, want, "every message reached a child");
    let stderr = client.stderr();
    assert!(
        stderr.matches("exec: child started").count() >= 8,
        "{stderr}"
    );
    assert!(
        stderr.contains("exit status: 7"),
        "the child's exit status is logged: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_child_slower_than_the_link_holds_credit_and_loses_nothing() {
    let world = World::start().await;
    const N: usize = 400;
    for i in 0..N {
        world.emulator.publish(json_message(i));
    }
    let out = world.dir.path().join("slow.jsonl");
    let child = format!(
        "while IFS= read -r line; do sleep 0.005; printf '%s\\n' \"$line\" >> '{}'; done",
        out.display()
    );
    let profile = world.profile("credit = 20");
    let mut client = Client::listen(&profile, &["--exec", &child]);
    // While the child is busy, the emulator can only have the link credit in flight.
    let mut max_in_flight = 0;
    let mut rss_early = None;
    let mut rss_late = 0;
    let deadline = Instant::now() + T;
    while world.emulator.stats().accepted < N as u64 {
        max_in_flight = max_in_flight.max(world.emulator.stats().in_flight);
        let accepted = world.emulator.stats().accepted;
        let rss = rss_kib(client.child.id());
        if accepted >= 50 && rss_early.is_none() {
            rss_early = Some(rss);
        }
        if accepted >= 300 {
            rss_late = rss_late.max(rss);
        }
        assert!(Instant::now() < deadline, "{:?}", world.emulator.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // iot-sub keeps at most `credit` deliveries unsettled with its sink. AMQP credit limits
    // transfers, not unsettled deliveries: fe2o3 grants the full credit again after credit/2
    // settlements, so up to one more credit's worth can be buffered in the link, plus the one
    // message the emulator holds while it waits for credit. Bounded, whatever the child's pace.
    assert!(
        max_in_flight <= 41,
        "credit bounds what is in flight: {max_in_flight}"
    );
    let rss_early = rss_early.expect("sampled early");
    assert!(
        rss_late <= rss_early + 1024,
        "memory stays flat while the child lags: {rss_early} KiB early, {rss_late} KiB late"
    );
    client.signal("TERM");
    assert!(client.wait(T).success());
    let got = ids_in_file(&out);
    assert_eq!(got.len(), N, "each once");
    assert_eq!(got.into_iter().collect::<HashSet<_>>().len(), N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_each_runs_a_command_per_message_with_metadata_and_bounded_concurrency() {
    let world = World::start().await;
    let dir = world.dir.path().join("each");
    std::fs::create_dir(&dir).unwrap();
    const N: usize = 12;
    for i in 0..N {
        world.emulator.publish(json_message(i));
    }
    // Records its metadata and body, and the most commands seen running at once.
    let cmd = format!(
        "d='{d}'; touch \"$d/run.$$\"; ls \"$d\" | grep -c '^run\\.' >> \"$d/concurrency\"; \
         cat > \"$d/$IOT_SUB_MESSAGE_ID.body\"; \
         printf '%s|%s|%s|%s' \"$IOT_SUB_TOPIC\" \"$IOT_SUB_PRODUCT_KEY\" \"$IOT_SUB_DEVICE_NAME\" \"$IOT_SUB_GENERATE_TIME\" > \"$d/$IOT_SUB_MESSAGE_ID.meta\"; \
         sleep 0.2; rm \"$d/run.$$\"",
        d = dir.display()
    );
    let profile = world.profile("");
    let mut client = Client::listen(
        &profile,
        &[
            "--exec-each",
            &cmd,
            "--jobs",
            "3",
            "--count",
            &N.to_string(),
        ],
    );
    let status = client.wait(T);
    assert!(status.success(), "{status:?}\n{}", client.stderr());
    assert!(world.emulator.wait_accepted(N, T).await);
    for i in 0..N {
        let m = json_message(i);
        let body = std::fs::read(dir.join(format!("{}.body", m.message_id))).unwrap();
        assert_eq!(body, m.body);
        let meta = std::fs::read_to_string(dir.join(format!("{}.meta", m.message_id))).unwrap();
        assert_eq!(
            meta,
            format!("{}|a1Test|dev{}|{}", m.topic, i % 7, m.generate_time)
        );
    }
    let most = std::fs::read_to_string(dir.join("concurrency"))
        .unwrap()
        .lines()
        .map(|l| l.trim().parse::<u32>().unwrap())
        .max()
        .unwrap();
    assert!(most <= 3, "at most --jobs at once: {most}");
    assert!(most >= 2, "commands do run in parallel: {most}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_each_failure_releases_the_message_for_redelivery() {
    let world = World::start().await;
    world.emulator.publish(json_message(1));
    world.emulator.publish(json_message(2));
    let marker = world.dir.path().join("failed-once");
    let done = world.dir.path().join("done");
    // Fails the first time for message 1, succeeds afterwards.
    let cmd = format!(
        "if [ \"$IOT_SUB_MESSAGE_ID\" = '{id1}' ] && [ ! -e '{m}' ]; then touch '{m}'; exit 3; fi; echo \"$IOT_SUB_MESSAGE_ID\" >> '{d}'",
        id1 = json_message(1).message_id,
        m = marker.display(),
        d = done.display()
    );
    let profile = world.profile("");
    let mut client = Client::listen(&profile, &["--exec-each", &cmd, "--count", "2"]);
    assert!(client.wait(T).success(), "{}", client.stderr());
    let done_ids: Vec<String> = std::fs::read_to_string(&done)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(done_ids.len(), 2, "{done_ids:?}");
    assert!(
        world.emulator.stats().released >= 1,
        "{:?}",
        world.emulator.stats()
    );
    assert!(world.emulator.delivery_counts()[&json_message(1).message_id] >= 2);
    assert!(
        client.stderr().contains("exit status: 3"),
        "{}",
        client.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_suppressed_by_default_and_kept_with_no_dedup() {
    let world = World::start().await;
    world.emulator.set_duplicate_probability(1.0);
    const N: usize = 50;
    for i in 0..N {
        world.emulator.publish(json_message(i));
    }
    let profile = world.profile("");
    let mut client = Client::listen(&profile, &["--idle-exit", "1500ms"]);
    let lines = client.rest_of_lines(T);
    assert!(client.wait(T).success());
    assert!(
        world.emulator.stats().transfers_sent >= 2 * N as u64,
        "{:?}",
        world.emulator.stats()
    );
    let got = ids(&lines);
    assert_eq!(got.len(), N, "each message once");
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), N);
    assert!(
        client.stderr().contains(&format!("duplicates={N}")),
        "{}",
        client.stderr()
    );

    for i in N..2 * N {
        world.emulator.publish(json_message(i));
    }
    let mut client = Client::listen(&profile, &["--idle-exit", "1500ms", "--no-dedup"]);
    let lines = client.rest_of_lines(T);
    assert!(client.wait(T).success());
    assert_eq!(lines.len(), 2 * N, "every copy written without dedup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliveries_after_a_reconnect_do_not_reach_the_output_twice() {
    let world = World::start().await;
    const N: usize = 3000;
    for i in 0..N {
        world.emulator.publish(json_message(i));
    }
    let profile =
        world.profile("backoff_initial = \"50ms\"\nbackoff_max = \"200ms\"\ncredit = 1000");
    let mut client = Client::listen(&profile, &[]);
    for at in [500, 1200, 2000] {
        assert!(world.emulator.wait_accepted(at, T).await);
        world
            .emulator
            .drop_connections(iot_sub::emulator::Drop::TcpReset);
    }
    assert!(
        world.emulator.wait_accepted(N, T).await,
        "{:?}",
        world.emulator.stats()
    );
    client.signal("TERM");
    assert!(client.wait(T).success());
    let lines = client.rest_of_lines(T);
    let redelivered = world
        .emulator
        .delivery_counts()
        .values()
        .filter(|c| **c > 1)
        .count();
    let got = ids(&lines);
    assert_eq!(
        got.len(),
        N,
        "{redelivered} redelivered, yet each message written once"
    );
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_filters_choose_what_is_written_and_everything_is_accepted() {
    let world = World::start().await;
    let topics = [
        "/a1Test/dev1/thing/event/property/post",
        "/a1Test/dev2/thing/event/property/post",
        "/a1Test/dev2/thing/event/alarm/post",
        "/as/mqtt/status/a1Test/dev2",
        "/a1Other/devX/thing/event/property/post",
        "/a1Test/dev2/user/raw",
    ];
    for (i, t) in topics.iter().enumerate() {
        world.emulator.publish(message_on(t, i));
    }
    let profile = world.profile("");
    let mut client = Client::listen(
        &profile,
        &[
            "--topic",
            "/+/+/thing/event/+/post",
            "--topic",
            "/as/mqtt/status/#",
            "--exclude-topic",
            "/a1Test/dev1/#",
            "--idle-exit",
            "1s",
        ],
    );
    let lines = client.rest_of_lines(T);
    assert!(client.wait(T).success());
    let got: Vec<&str> = lines.iter().map(|l| l["topic"].as_str().unwrap()).collect();
    let want = [topics[1], topics[2], topics[3], topics[4]];
    assert_eq!(
        got.iter().collect::<HashSet<_>>(),
        want.iter().collect::<HashSet<_>>()
    );
    assert_eq!(
        world.emulator.stats().accepted,
        topics.len() as u64,
        "filtered-out messages are accepted too"
    );
    let status = lines.iter().find(|l| l["topic"] == topics[3]).unwrap();
    assert_eq!(status["productKey"], "a1Test");
    assert_eq!(status["deviceName"], "dev2");
    assert!(
        client.stderr().contains("filtered=2"),
        "{}",
        client.stderr()
    );

    let out = std::process::Command::new(common::bin())
        .args(["listen", "--profile", "t", "--topic", "/a/#/b", "--config"])
        .arg(&profile)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a bad filter is a usage error");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`#` must be a whole level and the last one")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_pretty_and_body_modes() {
    let world = World::start().await;
    world.emulator.publish(json_message(3));
    let profile = world.profile("");
    let mut client = Client::listen(
        &profile,
        &[
            "--count",
            "1",
            "--format",
            "{deviceName} {generateTime} {bodyEncoding} {body}",
            "--body",
            "base64",
        ],
    );
    let raw = client.read_raw_lines(1, T);
    assert!(client.wait(T).success());
    let m = json_message(3);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&m.body);
    assert_eq!(raw[0], format!("dev3 {} base64 {b64}", m.generate_time));

    world.emulator.publish(json_message(4));
    let mut client = Client::listen(&profile, &["--count", "1", "--format", "pretty"]);
    let block = client.read_raw_lines(5, T);
    assert!(client.wait(T).success());
    assert!(
        block[0].ends_with("  /a1Test/dev4/thing/event/property/post"),
        "{block:?}"
    );
    assert!(
        block[0].starts_with("2024-05-01T02:00:00.004Z"),
        "{block:?}"
    );
    assert!(
        block[1].contains("productKey=a1Test deviceName=dev4"),
        "{block:?}"
    );
    assert_eq!(block[2], "  {");

    let out = std::process::Command::new(common::bin())
        .args([
            "listen",
            "--profile",
            "t",
            "--format",
            "{topic} {devicename}",
            "--config",
        ])
        .arg(&profile)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown template field `{devicename}`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_conditions_have_their_exit_statuses() {
    let world = World::start().await;
    for i in 0..5 {
        world.emulator.publish(json_message(i));
    }
    let profile = world.profile("");
    // --idle-exit after the backlog is drained: 0.
    let started = Instant::now();
    let mut client = Client::listen(&profile, &["--idle-exit", "1s"]);
    assert_eq!(client.rest_of_lines(T).len(), 5);
    assert_eq!(client.wait(T).code(), Some(0));
    assert!(started.elapsed() >= Duration::from_secs(1));

    // --count not reached before --idle-exit: 3.
    world.emulator.publish(json_message(5));
    let mut client = Client::listen(&profile, &["--idle-exit", "1s", "--count", "10"]);
    assert_eq!(client.rest_of_lines(T).len(), 1);
    assert_eq!(client.wait(T).code(), Some(3), "{}", client.stderr());

    // --duration: 0, after about that long, even with messages flowing.
    let started = Instant::now();
    let mut client = Client::listen(&profile, &["--duration", "2s"]);
    assert_eq!(client.wait(T).code(), Some(0));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );

    // --duration before --count: 3.
    let mut client = Client::listen(&profile, &["--duration", "1s", "--count", "1"]);
    assert_eq!(client.wait(T).code(), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_share_the_work_with_their_own_client_ids() {
    let world = World::start().await;
    const N: usize = 4000;
    for i in 0..N {
        world.emulator.publish(json_message(i));
    }
    let profile = world.profile("connections = 4");
    let mut client = Client::listen(&profile, &[]);
    wait_for("four connections", T, || {
        world.emulator.stats().live_connections == 4
    });
    assert!(
        world.emulator.wait_accepted(N, T).await,
        "{:?}",
        world.emulator.stats()
    );
    client.signal("TERM");
    assert!(client.wait(T).success());
    let lines = client.rest_of_lines(T);
    assert_eq!(ids(&lines).into_iter().collect::<HashSet<_>>().len(), N);
    let stderr = client.stderr();
    for i in 1..=4 {
        assert!(
            stderr.contains(&format!("client_id=test-client-{i}")),
            "{stderr}"
        );
    }
}

/// A connection that receives one message at a time still settles many deliveries per
/// Disposition frame: it collects the sink's accepts on its timer (src/receive.rs) instead of
/// sending them as each write completes. Sent as they came, that is one frame per delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_receiving_one_message_at_a_time_settles_many_per_disposition() {
    let world = World::start().await;
    let profile = world.profile("");
    let mut client = Client::listen(&profile, &[]);
    wait_for("the connection", T, || {
        world.emulator.stats().live_connections == 1
    });
    // One message every 2 ms for 1.5 s: each delivery arrives on its own.
    let mut published = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    for _ in 0..750 {
        tick.tick().await;
        world.emulator.publish(json_message(published));
        published += 1;
    }
    assert!(
        world.emulator.wait_accepted(published, T).await,
        "{:?}",
        world.emulator.stats()
    );
    let stats = world.emulator.stats();
    client.signal("TERM");
    assert!(client.wait(T).success());
    assert_eq!(
        ids(&client.rest_of_lines(T)).len(),
        published,
        "every message written once"
    );
    // About 25 per frame (50 ms at 500 msgs/s); 10 leaves room for a slow machine.
    assert!(
        stats.dispositions_received > 0 && stats.dispositions_received * 10 <= stats.accepted,
        "{} Disposition frames for {} accepted deliveries: {stats:?}",
        stats.dispositions_received,
        stats.accepted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorder_window_writes_in_generate_time_order() {
    let world = World::start().await;
    // Published newest first: the cloud does not keep order either.
    for i in (0..40).rev() {
        world.emulator.publish(json_message(i));
    }
    let profile = world.profile("");
    let mut client = Client::listen(&profile, &["--reorder-window", "500ms", "--count", "40"]);
    let lines = client.read_lines(40, T);
    assert!(client.wait(T).success());
    let times: Vec<i64> = lines
        .iter()
        .map(|l| l["generateTime"].as_i64().unwrap())
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted);
    assert!(world.emulator.wait_accepted(40, T).await);

    let out = std::process::Command::new(common::bin())
        .args([
            "listen",
            "--profile",
            "t",
            "--reorder-window",
            "25s",
            "--config",
        ])
        .arg(&profile)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 20s"));
}

/// stdout is written three ways depending on what it is (src/sink/stdout.rs): a file and
/// /dev/null directly, a pipe with non-blocking writes that wait when it is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_as_a_file_dev_null_and_a_full_pipe_loses_nothing() {
    let world = World::start().await;
    // ~1 KiB lines: 600 of them overflow a 64 KiB pipe many times over.
    let big = |i: usize| DeviceMessage {
        body: format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(1000)).into_bytes(),
        ..json_message(i)
    };
    const N: usize = 600;
    for i in 0..N {
        world.emulator.publish(big(i));
    }
    let profile = world.profile("");
    let run = |stdout: std::process::Stdio, count: usize| {
        std::process::Command::new(common::bin())
            .args(["listen", "--config"])
            .arg(&profile)
            .args(["--profile", "t", "--count", &count.to_string()])
            .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", common::KEY_SECRET)
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("iot-sub starts")
    };

    // A regular file.
    let file = world.dir.path().join("out.jsonl");
    let out = run(std::fs::File::create(&file).unwrap().into(), 200);
    let done = out.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let in_file = ids_in_file(&file);
    assert_eq!(in_file.len(), 200);

    // /dev/null: the accepts are the only trace.
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let done = run(null.into(), 200).wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(world.emulator.wait_accepted(400, T).await);

    // A pipe nobody reads for a while: writes hit EAGAIN, then resume where they stopped.
    let mut child = run(std::process::Stdio::piped(), 200);
    let stdout = child.stdout.take().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        world.emulator.stats().accepted < N as u64,
        "nothing read yet, so not everything can be accepted"
    );
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    let text = reader.join().unwrap();
    let done = child.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let mut seen: HashSet<String> = in_file.into_iter().collect();
    let mut piped = 0;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["body"]["pad"].as_str().map(str::len), Some(1000));
        seen.insert(v["messageId"].as_str().unwrap().to_string());
        piped += 1;
    }
    assert_eq!(piped, 200);
    assert!(world.emulator.wait_accepted(N, T).await);
    // Everything in the file and the pipe, plus the 200 that went to /dev/null.
    assert_eq!(seen.len(), 400);
}
