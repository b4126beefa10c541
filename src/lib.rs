//! iot-sub: receive IoT device messages from a cloud's AMQP 1.0 server-side subscription
//! and write each one as a JSON line.
//!
//! # Layout
//! - [`secret`]: the `Secret` type that never prints itself.
//! - [`cloud`]: per-cloud signing of the SASL username and password (Alibaba today).

#![forbid(unsafe_code)]

pub mod cloud;
pub mod secret;
