//! `iot-sub emulate`: runs the emulator as a standalone server from command-line flags.

use tokio_util::sync::CancellationToken;

use crate::cli::{AuthFailureArg, EmulateArgs};
use crate::emulator::{self, AuthFailure, EmulatorConfig, StandaloneOptions, StsToken};
use crate::secret::Secret;

/// Runs until `shutdown`.
pub async fn run(args: EmulateArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let secret = Secret::new(args.access_key_secret);
    let sts_tokens = args
        .security_token
        .map(|t| StsToken {
            access_key_id: args.access_key_id.clone(),
            access_key_secret: secret.clone(),
            token: Secret::new(t),
            expires_at: None,
        })
        .into_iter()
        .collect();
    let config = EmulatorConfig {
        bind: args.listen,
        tls_hostname: args.tls_hostname,
        access_keys: vec![(args.access_key_id, secret)],
        sts_tokens,
        consumer_group_id: args.consumer_group_id,
        auth_failure: match args.auth_failure {
            AuthFailureArg::Sasl => AuthFailure::SaslOutcome,
            AuthFailureArg::Close => AuthFailure::CloseUnauthorized,
        },
        max_clock_skew: args.max_clock_skew,
        attach_deadline: args.attach_deadline,
        ack_timeout: args.ack_timeout,
        redelivery_delay: args.redelivery_delay,
        advertised_idle_timeout: args.advertise_idle_timeout,
        message_id_as_long: args.message_id_as_long,
        accept_journal: args.journal,
        keep_identity: args.keep_identity,
        ..EmulatorConfig::default()
    };
    emulator::run_standalone(
        StandaloneOptions {
            config,
            ca_out: args.ca_out,
            rate: args.rate,
            devices: args.devices,
            seed: args.seed,
            from_file: args.from_file,
            count: args.count,
        },
        shutdown,
    )
    .await
}
