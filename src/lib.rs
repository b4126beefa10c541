//! iot-sub: receive IoT device messages from a cloud's AMQP 1.0 server-side subscription
//! and write each one as a JSON line.
//!
//! # Layout
//! - [`secret`]: the `Secret` type that never prints itself.
//! - [`cloud`]: per-cloud signing of the SASL username and password (Alibaba today).
//! - [`emulator`]: a local stand-in for the cloud endpoint (feature `emulator`).

#![forbid(unsafe_code)]

pub mod cloud;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod secret;
