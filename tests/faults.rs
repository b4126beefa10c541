//! Fault suite: the real `iot-sub` binary against the emulator over real sockets while things
//! go wrong (server closes and resets, a killed emulator, a silent peer, vendor close codes,
//! duplicates and reordering, a slow or stalled stdout, SIGTERM at random moments). Every case
//! ends in the same zero-loss check, `assert_zero_loss`.
//!
//! Random choices come from a seed: `IOT_SUB_FAULT_SEED=N` replays one; otherwise a random
//! seed is printed at the start of each case (shown by `cargo test` when the case fails) and
//! in every zero-loss failure message.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ids, json_message, rss_kib, Client, World};
use iot_sub::emulator::{DeviceMessage, Drop, Emulator};

/// "Should happen" deadline for one step.
const T: Duration = Duration::from_secs(30);
/// Fast reconnects: these cases reconnect dozens of times.
const FAST_BACKOFF: &str = "backoff_initial = \"20ms\"\nbackoff_max = \"200ms\"";

// ---------------------------------------------------------------------------------------------
// The zero-loss checker
// ---------------------------------------------------------------------------------------------

/// How often a message may appear in the output.
enum Copies<'a> {
    /// Duplicate suppression on, one client run: every id exactly once.
    ExactlyOnce,
    /// No suppression (`--no-dedup`, or outputs of several runs together): an id appears at
    /// most as often as the emulator delivered it (messageId -> transfers), and an id it
    /// delivered once appears exactly once. Extra copies can only come from deliveries that
    /// were not accepted, since an accepted message is never delivered again.
    AtMostDelivered(&'a HashMap<String, u32>),
}

/// The invariants every case ends with. `sent`: every messageId the emulator was given;
/// `accepted`: the ids it recorded as accepted, in order; `output`: the messageIds of every
/// line the client(s) wrote. `case` names the case and its seed for the failure message.
fn assert_zero_loss(
    case: &str,
    sent: &[String],
    accepted: &[String],
    output: &[String],
    copies: Copies,
) {
    let sent_set: HashSet<&String> = sent.iter().collect();
    assert_eq!(
        sent_set.len(),
        sent.len(),
        "{case}: the test sent an id twice"
    );
    let mut written: HashMap<&String, u32> = HashMap::new();
    for id in output {
        *written.entry(id).or_default() += 1;
    }

    // Nothing invented.
    let strays: Vec<_> = written
        .keys()
        .filter(|id| !sent_set.contains(*id))
        .take(10)
        .collect();
    assert!(
        strays.is_empty(),
        "{case}: written but never sent: {strays:?}"
    );

    // Everything the emulator recorded as accepted was written, and each was accepted once.
    let mut accepted_set = HashSet::new();
    for id in accepted {
        assert!(accepted_set.insert(id), "{case}: {id} accepted twice");
        assert!(
            written.contains_key(id),
            "{case}: {id} accepted but never written"
        );
    }

    // Every message sent was accepted and written: zero loss.
    let not_accepted: Vec<_> = sent
        .iter()
        .filter(|id| !accepted_set.contains(id))
        .collect();
    assert!(
        not_accepted.is_empty(),
        "{case}: {} of {} sent never accepted, e.g. {:?}",
        not_accepted.len(),
        sent.len(),
        &not_accepted[..not_accepted.len().min(10)]
    );
    let lost: Vec<_> = sent.iter().filter(|id| !written.contains_key(id)).collect();
    assert!(
        lost.is_empty(),
        "{case}: {} of {} sent never written, e.g. {:?}",
        lost.len(),
        sent.len(),
        &lost[..lost.len().min(10)]
    );

    // Duplicates only where the emulator delivered more than once.
    match copies {
        Copies::ExactlyOnce => {
            let repeated: Vec<_> = written.iter().filter(|(_, n)| **n > 1).take(10).collect();
            assert!(
                repeated.is_empty(),
                "{case}: written more than once: {repeated:?}"
            );
        }
        Copies::AtMostDelivered(deliveries) => {
            for (id, n) in &written {
                let delivered = deliveries.get(*id).copied().unwrap_or(0);
                assert!(
                    *n <= delivered,
                    "{case}: {id} written {n} times but delivered {delivered} times"
                );
            }
        }
    }
}

/// Part of the invariant that holds at any moment: whatever the emulator recorded as accepted
/// has already been written (accepts follow writes).
fn assert_accepted_were_written(case: &str, accepted: &[String], output: &[String]) {
    let written: HashSet<&String> = output.iter().collect();
    let unwritten: Vec<_> = accepted
        .iter()
        .filter(|id| !written.contains(id))
        .take(10)
        .collect();
    assert!(
        unwritten.is_empty(),
        "{case}: accepted but not written: {unwritten:?}"
    );
}

/// The case's seed (from `IOT_SUB_FAULT_SEED`, else random), printed, and an RNG from it.
fn seeded(case: &str) -> (String, fastrand::Rng) {
    let seed = std::env::var("IOT_SUB_FAULT_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let label = format!("{case} (IOT_SUB_FAULT_SEED={seed})");
    eprintln!("fault case {label}");
    (label, fastrand::Rng::with_seed(seed))
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A message whose id is unique to this test file's range, `tag` keeping cases apart.
fn message(tag: usize, i: usize) -> DeviceMessage {
    let mut m = json_message(i);
    m.message_id = format!(
        "{}",
        1_800_000_000_000_000_000u64 + (tag as u64) * 1_000_000 + i as u64
    );
    m
}

fn message_ids(messages: &[DeviceMessage]) -> Vec<String> {
    messages.iter().map(|m| m.message_id.clone()).collect()
}

/// Polls `done` every 20 ms until it holds, failing after `within`.
async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `batch` and waits until the client has accepted a random part of it, so the next
/// fault lands while the rest is on the wire or in the client.
async fn publish_and_wait_partway(
    emulator: &Emulator,
    rng: &mut fastrand::Rng,
    batch: &[DeviceMessage],
    client: &Client,
) {
    let before = emulator.stats().accepted as usize;
    for m in batch {
        emulator.publish(m.clone());
    }
    let partway = before + rng.usize(1..=batch.len() / 2);
    assert!(
        emulator.wait_accepted(partway, T).await,
        "{:?}\n{}",
        emulator.stats(),
        client.stderr()
    );
}

/// Injects `how` into the live connection and waits for the client's next one to be up.
async fn drop_and_wait_for_reconnect(emulator: &Emulator, how: Drop, client: &Client) {
    let before = emulator.stats().connections_accepted;
    emulator.drop_connections(how);
    let deadline = Instant::now() + T;
    loop {
        let s = emulator.stats();
        if s.connections_accepted > before && s.live_connections == 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no reconnect: {s:?}\n{}",
            client.stderr()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stops a client with SIGTERM and returns the messageIds of everything it wrote.
fn stop_and_collect(client: &mut Client, mut lines: Vec<serde_json::Value>) -> Vec<String> {
    client.signal("TERM");
    let status = client.wait(T);
    assert!(status.success(), "{status:?}\n{}", client.stderr());
    lines.extend(client.rest_of_lines(T));
    ids(&lines)
}

/// The profile `t` of `world`, but connecting through `port` (a proxy in front of it).
fn profile_via(world: &World, port: u16, extra: &str) -> PathBuf {
    let profile = world.profile(extra);
    let text = std::fs::read_to_string(&profile).unwrap().replace(
        &format!("port = {}", world.emulator.local_addr().port()),
        &format!("port = {port}"),
    );
    std::fs::write(&profile, text).unwrap();
    profile
}

// ---------------------------------------------------------------------------------------------
// 1. Server closes (9602) and TCP resets at random points
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_server_closes_and_resets_mid_transfer_lose_nothing() {
    let (case, mut rng) = seeded("random_server_closes_and_resets");
    let world = World::start().await;
    let drops = rng.usize(20..=30);
    const BATCH: usize = 120;
    let messages: Vec<DeviceMessage> = (0..drops * BATCH).map(|i| message(1, i)).collect();
    // --no-dedup: every redelivered copy that reaches the client is written, so the duplicate
    // rule is exercised, not hidden.
    let profile = world.profile(&format!("{FAST_BACKOFF}\ncredit = 100"));
    let mut client = Client::listen(&profile, &["--no-dedup"]);
    let mut kinds = Vec::new();
    for batch in messages.chunks(BATCH) {
        publish_and_wait_partway(&world.emulator, &mut rng, batch, &client).await;
        let how = if rng.bool() {
            Drop::ServerClose
        } else {
            Drop::TcpReset
        };
        kinds.push(how.clone());
        drop_and_wait_for_reconnect(&world.emulator, how, &client).await;
    }
    assert!(
        world.emulator.wait_accepted(messages.len(), T).await,
        "{case}: {:?}\n{}",
        world.emulator.stats(),
        client.stderr()
    );
    let output = stop_and_collect(&mut client, Vec::new());
    let deliveries = world.emulator.delivery_counts();
    assert_zero_loss(
        &case,
        &message_ids(&messages),
        &world.emulator.accepted_ids(),
        &output,
        Copies::AtMostDelivered(&deliveries),
    );

    let stderr = client.stderr();
    let closes = kinds.iter().filter(|k| **k == Drop::ServerClose).count();
    assert_eq!(
        stderr
            .matches("9602: cloud actively closed the connection")
            .count(),
        closes,
        "{case}: each 9602 close is logged verbatim once:\n{stderr}"
    );
    assert_eq!(
        stderr.matches("receiver link attached").count(),
        drops + 1,
        "{case}: one reconnect per fault"
    );
    // The faults did hit deliveries in flight: some messages had to be sent again.
    assert!(
        deliveries.values().any(|n| *n > 1),
        "{case}: no delivery was interrupted; the case tested nothing"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The emulator process killed (SIGKILL) and restarted on the same port
// ---------------------------------------------------------------------------------------------

/// One `iot-sub emulate` process with a persistent identity and accept journal in `dir`.
struct StandaloneEmulator {
    process: Client,
    port: u16,
}

impl StandaloneEmulator {
    /// Starts on `port` (0: any), serving `feed` and recording accepts in `journal`.
    fn start(dir: &Path, port: u16) -> StandaloneEmulator {
        let mut emulate = Command::new(common::bin());
        emulate
            .args(["emulate", "--rate", "0", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--ca-out")
            .arg(dir.join("ca.pem"))
            .arg("--keep-identity")
            .arg(dir.join("identity.pem"))
            .arg("--from-file")
            .arg(dir.join("feed.jsonl"))
            .arg("--journal")
            .arg(dir.join("journal"))
            .args(["--redelivery-delay", "500ms"])
            .env("ALIBABA_CLOUD_ACCESS_KEY_ID", common::KEY_ID)
            .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", common::KEY_SECRET)
            .env("RUST_LOG", "info");
        let process = Client::spawn(emulate);
        process.wait_stderr("emulator ready", 1, T);
        let log = process.stderr();
        let port = log
            .split("addr=127.0.0.1:")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("port in {log}"));
        StandaloneEmulator { process, port }
    }

    fn kill(mut self) {
        self.process.child.kill().unwrap();
        self.process.child.wait().unwrap();
    }
}

fn journal_ids(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("journal"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_killed_and_restarted_on_the_same_port_loses_nothing() {
    let (case, mut rng) = seeded("emulator_killed_and_restarted");
    let dir = tempfile::tempdir().unwrap();
    const N: usize = 6000;
    let messages: Vec<DeviceMessage> = (0..N).map(|i| message(2, i)).collect();
    let feed: String = messages
        .iter()
        .map(|m| {
            format!(
                "{{\"topic\":\"{}\",\"messageId\":\"{}\",\"generateTime\":{},\"body\":{}}}\n",
                m.topic,
                m.message_id,
                m.generate_time,
                String::from_utf8_lossy(&m.body)
            )
        })
        .collect();
    std::fs::write(dir.path().join("feed.jsonl"), feed).unwrap();
    let mut emulator = StandaloneEmulator::start(dir.path(), 0);
    let port = emulator.port;
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[profiles.t]\nhost = \"localhost\"\nport = {port}\nca_file = \"ca.pem\"\n\
             consumer_group_id = \"DEFAULT_GROUP\"\nclient_id = \"test-client\"\n\
             access_key_id = \"{}\"\ncredit = 50\n{FAST_BACKOFF}\n",
            common::KEY_ID
        ),
    )
    .unwrap();
    // One client run throughout: its duplicate suppression covers what a restarted emulator
    // sends again because the accept never reached the killed one.
    let mut client = Client::listen(&config, &[]);
    let mut output: Vec<serde_json::Value> = Vec::new();
    let kills = rng.usize(3..=4);
    for k in 0..kills {
        // Kill once the client is some way into what this instance has to send.
        let journal_before = journal_ids(dir.path()).len();
        let left = N - journal_before;
        let at = journal_before + rng.usize(1..=(left / (kills - k + 1)).max(1));
        let deadline = Instant::now() + T;
        while journal_ids(dir.path()).len() < at {
            assert!(
                Instant::now() < deadline,
                "{case}: stuck at {at}\n{}",
                client.stderr()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        emulator.kill();
        // Whatever the dead emulator recorded as accepted must already be in the output (the
        // reader of the pipe may lag a moment behind the client's writes).
        let recorded = journal_ids(dir.path());
        assert!(
            recorded.len() < N,
            "{case}: kill {k} came after the transfer"
        );
        eprintln!(
            "{case}: killed the emulator with {} of {N} accepted",
            recorded.len()
        );
        let deadline = Instant::now() + T;
        loop {
            output.extend(client.lines_so_far());
            let written: HashSet<String> = ids(&output).into_iter().collect();
            if recorded.iter().all(|id| written.contains(id)) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_accepted_were_written(&case, &recorded, &ids(&output));
        emulator = StandaloneEmulator::start(dir.path(), port);
    }
    let deadline = Instant::now() + T;
    while journal_ids(dir.path()).len() < N {
        assert!(
            Instant::now() < deadline,
            "{case}: {} of {N} accepted\n{}",
            journal_ids(dir.path()).len(),
            client.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let output = stop_and_collect(&mut client, output);
    emulator.process.signal("INT");
    let stderr = client.stderr();
    let totals = stderr.lines().rfind(|l| l.contains("duplicates="));
    eprintln!("{case}: {}", totals.unwrap_or("no totals line"));
    assert_zero_loss(
        &case,
        &message_ids(&messages),
        &journal_ids(dir.path()),
        &output,
        Copies::ExactlyOnce,
    );
    assert!(
        client.stderr().matches("receiver link attached").count() > kills,
        "{case}: reconnected after each kill"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A silent peer: the connection stops carrying anything, with no FIN and no RST
// ---------------------------------------------------------------------------------------------

/// Publishes `messages` in order at a steady pace in the background until all are out or
/// `stop`; returns how many it published.
fn trickle(
    emulator: Arc<Emulator>,
    messages: Vec<DeviceMessage>,
    per_tick: usize,
    tick: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut published = 0;
        for chunk in messages.chunks(per_tick) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            for m in chunk {
                emulator.publish(m.clone());
            }
            published += chunk.len();
            tokio::time::sleep(tick).await;
        }
        published
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_detected_by_the_idle_timeout_and_nothing_is_lost() {
    let (case, _rng) = seeded("silent_peer");
    let world = World::start().await;
    let proxy = common::FreezingProxy::start(world.emulator.local_addr());
    // 30 s is the smallest idle-time-out the cloud (and the config) allows.
    let profile = profile_via(
        &world,
        proxy.port,
        &format!("idle_timeout = \"30s\"\n{FAST_BACKOFF}"),
    );
    let mut client = Client::listen(&profile, &[]);
    let emulator = Arc::new(world.emulator);
    // 20 messages every 100 ms for 75 s: messages keep coming before, during and after the
    // freeze, so some are sent into the silent connection and must come back.
    let messages: Vec<DeviceMessage> = (0..15_000).map(|i| message(3, i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let producer = trickle(
        emulator.clone(),
        messages.clone(),
        20,
        Duration::from_millis(100),
        stop.clone(),
    );
    assert!(emulator.wait_accepted(200, T).await, "{}", client.stderr());
    proxy.freeze_existing();
    let frozen_at = Instant::now();
    // fe2o3 gives up on a peer after twice the idle-time-out it advertised with no frame.
    client.wait_stderr("the peer is silent", 1, Duration::from_secs(80));
    let took = frozen_at.elapsed();
    assert!(
        took >= Duration::from_secs(55),
        "detected too early: {took:?}"
    );
    client.wait_stderr("receiver link attached", 2, T);
    let after_reconnect = emulator.stats().accepted;
    assert!(
        emulator
            .wait_accepted(after_reconnect as usize + 100, T)
            .await,
        "messages flow again after the reconnect"
    );
    stop.store(true, Ordering::Relaxed);
    let published = producer.await.unwrap();
    assert!(
        emulator.wait_accepted(published, T).await,
        "{case}: {:?}\n{}",
        emulator.stats(),
        client.stderr()
    );
    let output = stop_and_collect(&mut client, Vec::new());
    let sent = message_ids(&messages[..published]);
    assert_zero_loss(
        &case,
        &sent,
        &emulator.accepted_ids(),
        &output,
        Copies::ExactlyOnce,
    );
    // Deliveries were swallowed by the frozen connection and had to be sent again.
    assert!(
        emulator.delivery_counts().values().any(|n| *n > 1),
        "{case}: nothing was in flight in the silent connection"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Server-side closes with the cloud's error codes
// ---------------------------------------------------------------------------------------------

/// The reconnect delays (ms) the client logged, in order.
fn retry_delays(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|l| l.contains("connection failed; reconnecting"))
        .filter_map(|l| l.split("retry_in=").nth(1))
        .map(|rest| {
            let v = rest.split_whitespace().next().unwrap();
            humantime::parse_duration(v).unwrap().as_millis() as u64
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_closes_with_the_clouds_error_codes_are_logged_and_lose_nothing() {
    let (case, mut rng) = seeded("server_closes_with_error_codes");
    // Aliyun's cloud run log codes for a server-side end of a connection (aliyun-huawei.md §6).
    // The AMQP condition and description it sends are undocumented, so each code goes out
    // under a plausible condition, one of them a vendor symbol no AMQP library knows.
    let closes: [(&str, &str); 6] = [
        (
            "amqp:connection:forced",
            "9602: the cloud actively closed the connection (load balancing)",
        ),
        ("amqp:internal-error", "9399: internal error"),
        (
            "amqp:connection:forced",
            "1901: network error, please reconnect",
        ),
        (
            "amqp:connection:framing-error",
            "1902: internal communication error",
        ),
        (
            "com.aliyun.iot:internal",
            "1950: internal communication error",
        ),
        (
            "amqp:resource-limit-exceeded",
            "9324: throttled, rate limit reached",
        ),
    ];
    let world = World::start().await;
    const BATCH: usize = 150;
    let messages: Vec<DeviceMessage> = (0..closes.len() * BATCH).map(|i| message(4, i)).collect();
    // Short connections never reach the healthy period, so the backoff grows from 50 ms to
    // its 400 ms cap: drawn from [25, 50], [50, 100], [100, 200], [200, 400], ...
    let profile = world.profile("backoff_initial = \"50ms\"\nbackoff_max = \"400ms\"");
    let mut client = Client::listen(&profile, &[]);
    for (batch, (condition, description)) in messages.chunks(BATCH).zip(closes) {
        publish_and_wait_partway(&world.emulator, &mut rng, batch, &client).await;
        let how = Drop::Close {
            condition: condition.to_string(),
            description: description.to_string(),
        };
        drop_and_wait_for_reconnect(&world.emulator, how, &client).await;
    }
    assert!(
        world.emulator.wait_accepted(messages.len(), T).await,
        "{case}: {:?}\n{}",
        world.emulator.stats(),
        client.stderr()
    );
    let output = stop_and_collect(&mut client, Vec::new());
    assert_zero_loss(
        &case,
        &message_ids(&messages),
        &world.emulator.accepted_ids(),
        &output,
        Copies::ExactlyOnce,
    );

    let stderr = client.stderr();
    for (condition, description) in closes {
        // The whole condition and description, as the server sent them.
        let verbatim = format!("server closed the connection: {condition}: {description}");
        assert_eq!(
            stderr.matches(&verbatim).count(),
            1,
            "{case}: `{verbatim}` logged once:\n{stderr}"
        );
    }
    let delays = retry_delays(&stderr);
    assert_eq!(delays.len(), closes.len(), "{case}: {stderr}");
    let ceilings = [50, 100, 200, 400, 400, 400];
    for (d, c) in delays.iter().zip(ceilings) {
        assert!(
            *d >= c / 2 && *d <= c,
            "{case}: backoff {delays:?} outside [d/2, d] for d = {ceilings:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Duplicated and reordered deliveries
// ---------------------------------------------------------------------------------------------

async fn duplicated_and_reordered_deliveries(dedup: bool) {
    let (case, mut rng) = seeded(if dedup {
        "duplicates_and_reordering_with_dedup"
    } else {
        "duplicates_and_reordering_without_dedup"
    });
    let world = World::start().await;
    world
        .emulator
        .set_duplicate_probability(0.2 + rng.f64() * 0.3);
    world.emulator.set_reorder(true);
    let tag = if dedup { 50 } else { 51 };
    const N: usize = 3000;
    let messages: Vec<DeviceMessage> = (0..N).map(|i| message(tag, i)).collect();
    for m in &messages {
        world.emulator.publish(m.clone());
    }
    let profile = world.profile(FAST_BACKOFF);
    let args: &[&str] = if dedup { &[] } else { &["--no-dedup"] };
    let mut client = Client::listen(&profile, args);
    // A reset partway, so redeliveries mix with the injected duplicates.
    let at = rng.usize(N / 4..N / 2);
    assert!(
        world.emulator.wait_accepted(at, T).await,
        "{}",
        client.stderr()
    );
    drop_and_wait_for_reconnect(&world.emulator, Drop::TcpReset, &client).await;
    assert!(
        world.emulator.wait_accepted(N, T).await,
        "{case}: {:?}\n{}",
        world.emulator.stats(),
        client.stderr()
    );
    let output = stop_and_collect(&mut client, Vec::new());
    let deliveries = world.emulator.delivery_counts();
    let copies = if dedup {
        Copies::ExactlyOnce
    } else {
        Copies::AtMostDelivered(&deliveries)
    };
    assert_zero_loss(
        &case,
        &message_ids(&messages),
        &world.emulator.accepted_ids(),
        &output,
        copies,
    );

    // The faults really happened: copies were sent, and the order changed.
    let duplicated = deliveries.values().filter(|n| **n > 1).count();
    assert!(duplicated > N / 10, "{case}: only {duplicated} duplicated");
    let first_seen: Vec<&String> = {
        let mut seen = HashSet::new();
        output.iter().filter(|id| seen.insert(*id)).collect()
    };
    let published = message_ids(&messages);
    assert!(
        first_seen.iter().zip(&published).any(|(a, b)| *a != b),
        "{case}: written in publication order; nothing was reordered"
    );
    if dedup {
        let stderr = client.stderr();
        let suppressed: u64 = stderr
            .split("duplicates=")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{case}: the final counts line: {stderr}"));
        assert!(suppressed > 0, "{case}: {stderr}");
    } else {
        assert!(
            output.len() > N,
            "{case}: without dedup the duplicates that arrived are written"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_reordered_deliveries_with_dedup_are_written_exactly_once() {
    duplicated_and_reordered_deliveries(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_reordered_deliveries_without_dedup_lose_nothing() {
    duplicated_and_reordered_deliveries(false).await;
}

// ---------------------------------------------------------------------------------------------
// 6. A slow and a stalled stdout consumer
// ---------------------------------------------------------------------------------------------

/// A message with a 1 KiB body, so buffering them all would show in the client's memory.
fn big_message(i: usize) -> DeviceMessage {
    let mut m = message(6, i);
    m.body = format!(
        r#"{{"items":{{"Temp":{{"value":{i}}}}},"pad":"{}"}}"#,
        "x".repeat(1024)
    )
    .into_bytes();
    m
}

const STALLED: u64 = 0;
const SLOW: u64 = 1;
const FULL_SPEED: u64 = 2;

/// Reads the client's stdout at the pace `pace` says, collecting the messageIds.
fn paced_reader(
    stdout: std::process::ChildStdout,
    pace: Arc<AtomicU64>,
    got: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match pace.load(Ordering::Relaxed) {
                STALLED => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                SLOW => std::thread::sleep(Duration::from_millis(3)),
                _ => {}
            }
            let Some(Ok(line)) = lines.next() else { return };
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            got.lock()
                .unwrap()
                .push(v["messageId"].as_str().unwrap().to_string());
        }
    })
}

/// Waits until the emulator has sent nothing new for `quiet`; returns the transfers so far.
async fn wait_for_transfers_to_stop(emulator: &Emulator, quiet: Duration) -> u64 {
    let deadline = Instant::now() + T;
    let mut last = emulator.stats().transfers_sent;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = emulator.stats().transfers_sent;
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= quiet {
            return now;
        }
        assert!(Instant::now() < deadline, "transfers never stopped: {now}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_stalled_stdout_holds_the_credit_bounds_memory_and_loses_nothing() {
    let (case, _rng) = seeded("slow_and_stalled_stdout");
    let world = World::start().await;
    const N: usize = 8_000;
    const CREDIT: usize = 50;
    let messages: Vec<DeviceMessage> = (0..N).map(big_message).collect();
    for m in &messages {
        world.emulator.publish(m.clone());
    }
    let profile = world.profile(&format!("credit = {CREDIT}"));
    let mut cmd = Command::new(common::bin());
    cmd.args(["listen", "--profile", "t", "--config"])
        .arg(&profile)
        .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", common::KEY_SECRET)
        .env("RUST_LOG", "info");
    let (mut client, stdout) = Client::spawn_unread(cmd);
    let pid = client.child.id();
    let pace = Arc::new(AtomicU64::new(SLOW));
    let got = Arc::new(Mutex::new(Vec::new()));
    let reader = paced_reader(stdout, pace.clone(), got.clone());
    let emulator = Arc::new(world.emulator);

    // Slow: 3 ms a line, far below the link's pace.
    assert!(emulator.wait_accepted(100, T).await, "{}", client.stderr());
    let rss_early = rss_kib(pid);
    let mut rss_most = rss_early;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss_most = rss_most.max(rss_kib(pid));
    }

    // Stalled: nothing is read. The pipe fills, the client stops, and so does the emulator.
    pace.store(STALLED, Ordering::Relaxed);
    let stopped_at = wait_for_transfers_to_stop(&emulator, Duration::from_secs(1)).await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss_most = rss_most.max(rss_kib(pid));
    }
    let s = emulator.stats();
    assert_eq!(
        s.transfers_sent, stopped_at,
        "{case}: the credit stops the emulator while stdout is stalled"
    );
    assert!(s.backlog > N / 2, "{case}: most messages still wait: {s:?}");
    let (accepted_when_stalled, backlog_when_stalled) = (s.accepted, s.backlog);
    // While stalled, what the emulator has out unsettled is what the client holds, and the
    // client grants credit back only as it settles: never more than `credit` in all. (The
    // emulator's in-flight count includes the one message its sender holds, waiting for
    // credit.)
    let unsettled = s.transfers_sent - s.accepted;
    assert!(
        unsettled <= CREDIT as u64 && s.in_flight <= CREDIT + 1,
        "{case}: {unsettled} unsettled while stalled with credit {CREDIT}: {s:?}"
    );

    // Reading resumes: everything arrives.
    pace.store(FULL_SPEED, Ordering::Relaxed);
    assert!(
        emulator.wait_accepted(N, T).await,
        "{case}: {:?}\n{}",
        emulator.stats(),
        client.stderr()
    );
    client.signal("TERM");
    let status = client.wait(T);
    assert!(status.success(), "{status:?}\n{}", client.stderr());
    reader.join().unwrap();
    let output = got.lock().unwrap().clone();
    assert_zero_loss(
        &case,
        &message_ids(&messages),
        &emulator.accepted_ids(),
        &output,
        Copies::ExactlyOnce,
    );

    eprintln!(
        "{case}: {unsettled} unsettled while stalled; RSS {rss_early} KiB early, \
         {rss_most} KiB at most; stalled at {stopped_at} transfers"
    );
    // Holding all that waited would take over 10 MiB.
    assert!(
        rss_most <= rss_early + 4 * 1024,
        "{case}: memory grew from {rss_early} KiB to {rss_most} KiB \
         (stalled at {accepted_when_stalled} accepted, {backlog_when_stalled} waiting)"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. SIGTERM at random moments
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_at_random_moments_exits_cleanly_and_loses_nothing() {
    let (case, mut rng) = seeded("sigterm_at_random_moments");
    let world = World::start().await;
    let profile = world.profile("");
    let emulator = Arc::new(world.emulator);
    let messages: Vec<DeviceMessage> = (0..100_000).map(|i| message(7, i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    // About 4000 messages a second, before, during and between the runs, so that a signal
    // often finds a batch being written and accepted.
    let producer = trickle(
        emulator.clone(),
        messages.clone(),
        40,
        Duration::from_millis(10),
        stop.clone(),
    );
    let mut output = Vec::new();
    let mut accepted_so_far = 0;
    // The runs' outputs and what the emulator counts as accepted since the last run ended:
    // once a run's connection is gone and its outcomes are applied, whatever it got accepted
    // must be in its own output.
    let mut check_run = |run: usize, run_output: Vec<String>| {
        let accepted = emulator.accepted_ids();
        assert_accepted_were_written(
            &format!("{case}, run {run}"),
            &accepted[accepted_so_far..],
            &run_output,
        );
        accepted_so_far = accepted.len();
        output.extend(run_output);
    };
    let torn_down = || {
        let s = emulator.stats();
        s.live_connections == 0 && s.in_flight == 0
    };
    let runs = rng.usize(6..=9);
    for run in 0..runs {
        let mut client = Client::listen(&profile, &[]);
        // From its first connection attempt on (its signal handlers are in place by then):
        // during TLS and login, right after attaching, or deep in the stream.
        client.wait_stderr("connecting", 1, T);
        tokio::time::sleep(Duration::from_millis(rng.u64(0..=1500))).await;
        client.signal("TERM");
        // The documented bound is 10 s from the signal to the exit.
        let status = client.wait(Duration::from_secs(12));
        assert!(
            status.success(),
            "{case}: run {run}: {status:?}\n{}",
            client.stderr()
        );
        let run_output = ids(&client.rest_of_lines(T));
        wait_until("the run's connection torn down", T, torn_down).await;
        check_run(run, run_output);
    }

    // A last run takes what is left, and is stopped the same way.
    stop.store(true, Ordering::Relaxed);
    let published = producer.await.unwrap();
    let mut client = Client::listen(&profile, &[]);
    assert!(
        emulator.wait_accepted(published, T).await,
        "{case}: {:?}\n{}",
        emulator.stats(),
        client.stderr()
    );
    let run_output = stop_and_collect(&mut client, Vec::new());
    wait_until("the last run's connection torn down", T, torn_down).await;
    check_run(runs, run_output);

    let deliveries = emulator.delivery_counts();
    assert_zero_loss(
        &case,
        &message_ids(&messages[..published]),
        &emulator.accepted_ids(),
        &output,
        Copies::AtMostDelivered(&deliveries),
    );
}
