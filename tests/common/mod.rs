//! Test harness: an in-process emulator over TLS on 127.0.0.1:0, profiles pointing at it, and the
//! real `iot-sub` binary run as a child process with its stdout and stderr collected.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iot_sub::emulator::{DeviceMessage, Emulator, EmulatorConfig};
use iot_sub::secret::Secret;

/// The AccessKey pair the test emulator accepts.
pub const KEY_ID: &str = "LTAItestkey";
pub const KEY_SECRET: &str = "test-secret-6f1d2c9a0b";

/// An emulator with fast timings for tests, and a directory for its CA and profiles.
pub struct World {
    pub emulator: Emulator,
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
}

/// Emulator defaults for tests: the real rules, with short redelivery so tests stay fast.
pub fn test_config() -> EmulatorConfig {
    EmulatorConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        access_keys: vec![(KEY_ID.to_string(), Secret::new(KEY_SECRET))],
        redelivery_delay: Duration::from_millis(500),
        ..EmulatorConfig::default()
    }
}

impl World {
    pub async fn start() -> World {
        Self::start_with(test_config()).await
    }

    pub async fn start_with(config: EmulatorConfig) -> World {
        let emulator = Emulator::start(config).await.expect("emulator starts");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        emulator.write_ca(&ca).unwrap();
        World { emulator, dir, ca }
    }

    /// Writes a config file with profile `t` pointing at the emulator, plus `extra` lines.
    pub fn profile(&self, extra: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("config-{}.toml", fastrand::u32(..)));
        let text = format!(
            "[profiles.t]\nhost = \"localhost\"\nport = {}\nca_file = \"{}\"\nconsumer_group_id = \"DEFAULT_GROUP\"\n\
             client_id = \"test-client\"\naccess_key_id = \"{KEY_ID}\"\n{}\n",
            self.emulator.local_addr().port(),
            self.ca.display(),
            extra
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// A message with a JSON body.
pub fn json_message(i: usize) -> DeviceMessage {
    DeviceMessage {
        topic: format!("/a1Test/dev{}/thing/event/property/post", i % 7),
        message_id: format!("{}", 1_700_000_000_000_000_000u64 + i as u64),
        generate_time: 1_714_528_800_000 + i as i64,
        body: format!(r#"{{"items":{{"Temp":{{"value":{i},"time":1714528800000}}}}}}"#)
            .into_bytes(),
        extra_properties: Vec::new(),
    }
}

/// The running binary, its stdout lines arriving on a channel and its stderr collected.
pub struct Client {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_iot-sub")
}

impl Client {
    /// `iot-sub listen --config <config> --profile t <args>` with the test secret in the env.
    pub fn listen(config: &Path, args: &[&str]) -> Client {
        Self::listen_with_secret(config, args, KEY_SECRET)
    }

    pub fn listen_with_secret(config: &Path, args: &[&str], secret: &str) -> Client {
        let mut cmd = Command::new(bin());
        cmd.arg("listen")
            .arg("--config")
            .arg(config)
            .args(["--profile", "t"])
            .args(args)
            .env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", secret)
            .env("RUST_LOG", "info");
        Self::spawn(cmd)
    }

    pub fn spawn(cmd: Command) -> Client {
        let (mut client, stdout) = Self::spawn_unread(cmd);
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        client.lines = lines;
        client
    }

    /// Like [`Client::spawn`], but stdout is handed to the caller to read at its own pace
    /// (the returned client's line methods then see no lines).
    pub fn spawn_unread(mut cmd: Command) -> (Client, std::process::ChildStdout) {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("iot-sub starts");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (_, lines) = mpsc::channel();
        let collected = Arc::new(Mutex::new(String::new()));
        let sink = collected.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut stderr = stderr;
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let client = Client {
            child,
            lines,
            stderr: collected,
        };
        (client, stdout)
    }

    /// Waits for `n` more stdout lines, parsed as JSON.
    pub fn read_lines(&self, n: usize, within: Duration) -> Vec<serde_json::Value> {
        self.read_raw_lines(n, within)
            .iter()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"))
            })
            .collect()
    }

    /// Waits for `n` more stdout lines, as written.
    pub fn read_raw_lines(&self, n: usize, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(line),
                Err(_) => panic!(
                    "only {} of {n} lines within {within:?}; stderr:\n{}",
                    out.len(),
                    self.stderr()
                ),
            }
        }
        out
    }

    /// The stdout lines that have arrived so far and were not read yet, without waiting.
    pub fn lines_so_far(&self) -> Vec<serde_json::Value> {
        self.lines
            .try_iter()
            .map(|line| serde_json::from_str(&line).expect("stdout line is JSON"))
            .collect()
    }

    /// Every stdout line that arrives until stdout closes.
    pub fn rest_of_lines(&self, within: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(serde_json::from_str(&line).expect("stdout line is JSON")),
                Err(mpsc::RecvTimeoutError::Disconnected) => return out,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("stdout still open after {within:?}")
                }
            }
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr contains `needle` `times` times.
    pub fn wait_stderr(&self, needle: &str, times: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.stderr().matches(needle).count() < times {
            if Instant::now() > deadline {
                panic!(
                    "stderr has `{needle}` fewer than {times} times:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, killing it and failing if it does not in time.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "iot-sub did not exit within {within:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, from /proc (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Message ids of parsed lines.
pub fn ids(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            l["messageId"]
                .as_str()
                .expect("messageId is a string")
                .to_string()
        })
        .collect()
}

/// A TCP proxy in front of the emulator that can make the live connections go silent: bytes
/// are read and dropped in both directions, the sockets stay open, nothing is closed. New
/// connections after a freeze are forwarded normally.
pub struct FreezingProxy {
    pub port: u16,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl FreezingProxy {
    pub fn start(upstream: std::net::SocketAddr) -> FreezingProxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = Arc::new(AtomicU64::new(0));
        let current = generation.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let born = current.load(Ordering::SeqCst);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let current = current.clone();
                    std::thread::spawn(move || {
                        use std::io::Write;
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if current.load(Ordering::SeqCst) != born {
                                continue; // frozen: swallow
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        // Keep the other side open while frozen: a silent peer sends no FIN.
                        if current.load(Ordering::SeqCst) == born {
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        }
                    });
                }
            }
        });
        FreezingProxy { port, generation }
    }

    /// Makes every connection open now go silent.
    pub fn freeze_existing(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The password a test profile (client `test-client`, DEFAULT_GROUP, aksign, hmacsha1,
/// AccessKey `KEY_ID`) sends with `secret` at `timestamp_ms`: tests look for it in the output.
pub fn test_password(secret: &str, timestamp_ms: u64) -> String {
    use iot_sub::cloud::alibaba::{self, AuthMode, LoginParams, SignMethod};
    alibaba::sign(
        &LoginParams {
            client_id: "test-client".into(),
            iot_instance_id: None,
            consumer_group_id: "DEFAULT_GROUP".into(),
            auth_mode: AuthMode::Aksign,
            sign_method: SignMethod::Hmacsha1,
            access_key_id: KEY_ID.into(),
            access_key_secret: Secret::new(secret),
            security_token: None,
        },
        timestamp_ms,
    )
    .password
    .expose()
    .to_string()
}

/// What a run printed and how it ended.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `iot-sub <args>` to the end (within 20 s) with the secret (if any) in the environment
/// and no other credential variables.
pub fn run(args: &[&str], secret: Option<&str>, env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_ID")
        .env_remove("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        .env_remove("ALIBABA_CLOUD_SECURITY_TOKEN")
        .env_remove("IOT_SUB_CONFIG")
        .env("RUST_LOG", "info");
    if let Some(secret) = secret {
        cmd.env("ALIBABA_CLOUD_ACCESS_KEY_SECRET", secret);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_to_end(cmd)
}

/// Runs `cmd` to the end (within 20 s), collecting stdout and stderr.
pub fn run_to_end(mut cmd: Command) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("iot-sub starts");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let within = Duration::from_secs(20);
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            // Its arguments only: `Command`'s Debug would show the environment, secrets included.
            let args: Vec<_> = cmd.get_args().collect();
            panic!("iot-sub {args:?} did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}
