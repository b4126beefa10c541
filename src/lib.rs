//! iot-sub: receive IoT device messages from a cloud's AMQP 1.0 server-side subscription
//! and write each one as a JSON line.
//!
//! # Layout
//! - [`cli`]: command-line parsing only.
//! - [`config`]: config file lookup, profiles, validation (exit 78 on errors).
//! - [`credentials`]: reading AccessKeys and STS tokens from env, files or the profile.
//! - [`secret`]: the `Secret` type that never prints itself.
//! - [`cloud`]: per-cloud signing of the SASL username and password (Alibaba today).
//! - [`transport`]: one connection attempt (TCP, TLS, SASL, Open, Begin, Attach) with deadlines.
//! - [`receive`]: the receive loop: deliveries → lines → output → accept.
//! - [`message`]: one delivery → one JSON line (the output schema).
//! - [`output`]: the shared, flushed output.
//! - [`supervisor`]: reconnect with backoff, re-signing every attempt.
//! - [`listen`]: `iot-sub listen`, wiring the above together.
//! - [`shutdown`]: signals; [`exit`]: exit statuses.
//! - [`emulator`], [`emulate`]: a local stand-in for the cloud endpoint (feature `emulator`).

#![forbid(unsafe_code)]

pub mod cli;
pub mod cloud;
pub mod config;
pub mod credentials;
#[cfg(feature = "emulator")]
pub mod emulate;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod exit;
pub mod listen;
pub mod message;
pub mod output;
pub mod receive;
pub mod secret;
pub mod shutdown;
pub mod supervisor;
pub mod transport;
