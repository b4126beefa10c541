//! Per-cloud signing: turns a profile's credentials into the SASL username and password.
//!
//! Each cloud is one file. Today: Alibaba Cloud IoT Platform ([`alibaba`]). Azure IoT Hub
//! and Huawei IoTDA get their own files when they are built.

pub mod alibaba;

use crate::secret::Secret;

/// What a connection attempt needs to authenticate with SASL PLAIN.
#[derive(Clone, Debug)]
pub struct SaslCredentials {
    /// The SASL PLAIN authentication identity (not secret; may be logged).
    pub username: String,
    /// The SASL PLAIN password (a signature or a key: never logged).
    pub password: Secret,
}
