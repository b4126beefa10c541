//! iot-sub: receive IoT device messages from a cloud's AMQP 1.0 server-side subscription
//! and write each one as a JSON line.
//!
//! # Layout
//! - [`cli`]: command-line parsing only.
//! - [`config`]: config file lookup, profiles, validation (exit 78 on errors).
//! - [`credentials`]: reading AccessKeys, STS tokens and `kind = "amqp"` passwords from env,
//!   files or the profile.
//! - [`secret`]: the `Secret` type that never prints itself.
//! - [`cloud`]: per-cloud signing of the SASL username and password (Alibaba today).
//! - [`transport`]: one connection attempt (TCP, TLS, SASL, Open, Begin, Attach) with deadlines.
//! - [`receive`]: per connection: deliveries → decode → filter → render → sink; acks back.
//! - [`message`]: one delivery → its fields and the JSON line (the output schema; Alibaba's
//!   mapping and the generic one for other AMQP 1.0 brokers).
//! - [`format`]: `--format` (json, pretty, templates); [`topic`]: filters and device names.
//! - [`sink`]: the one task all connections feed: dedup ([`dedup`]), reorder ([`reorder`]),
//!   `--count`/`--idle-exit`, stdout or `--exec`, `--exec-each`; accepts after output.
//! - [`supervisor`]: reconnect with backoff, re-signing every attempt.
//! - [`listen`]: `iot-sub listen`, wiring the above together.
//! - [`check`]: `iot-sub check`, each connection step timed; [`generate`]: completions and man pages.
//! - [`metrics_http`]: `--metrics-listen` (Prometheus `/metrics`, `/healthz`, `/readyz`).
//! - [`status`]: health and metrics hooks; [`notify`]: systemd READY/STATUS/WATCHDOG; [`stop`]: why a run stops; [`shutdown`]: signals; [`exit`]: exit statuses; [`time`].
//! - [`emulator`], [`emulate`]: a local stand-in for the cloud endpoint (feature `emulator`).

#![forbid(unsafe_code)]

pub mod check;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod credentials;
pub mod dedup;
#[cfg(feature = "emulator")]
pub mod emulate;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod exit;
pub mod format;
pub mod generate;
pub mod json;
pub mod listen;
pub mod message;
pub mod metrics_http;
pub mod notify;
pub mod receive;
pub mod reorder;
pub mod secret;
pub mod shutdown;
pub mod sink;
pub mod status;
pub mod stop;
pub mod supervisor;
pub mod time;
pub mod topic;
pub mod transport;
