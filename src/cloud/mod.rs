//! Per-cloud signing: turns a profile's credentials into the SASL username and password.
//!
//! Each cloud is one file. Today: Alibaba Cloud IoT Platform ([`alibaba`]). Azure IoT Hub
//! and Huawei IoTDA get their own files when they are built.

pub mod alibaba;

use crate::secret::Secret;

/// What a connection attempt needs to authenticate with SASL PLAIN. `Debug` shows the
/// username with any STS token masked, and the password as `***`.
#[derive(Clone)]
pub struct SaslCredentials {
    /// The SASL PLAIN authentication identity. It carries the STS token in `ststoken` mode:
    /// log it only through [`alibaba::masked_username`].
    pub username: String,
    /// The SASL PLAIN password (a signature or a key: never logged).
    pub password: Secret,
}

impl std::fmt::Debug for SaslCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslCredentials")
            .field("username", &alibaba::masked_username(&self.username))
            .field("password", &self.password)
            .finish()
    }
}
