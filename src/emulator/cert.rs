//! The emulator's throw-away TLS identity: a CA and a server leaf, generated in memory at start.
//!
//! Only the CA *certificate* ever leaves memory (through `Emulator::write_ca`); the private
//! keys live in the rustls `ServerConfig` and die with it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// What the listener needs: the CA in PEM for clients, and the server config for rustls.
pub(crate) struct TlsIdentity {
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

/// Generates a CA and a leaf for `hostname` (plus the loopback addresses) signed by it, the
/// leaf valid for `validity` (not before, not after) when given.
pub(crate) fn generate(
    hostname: &str,
    validity: Option<(SystemTime, SystemTime)>,
) -> anyhow::Result<TlsIdentity> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "iot-sub emulator CA (throw-away)");
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "iot-sub");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("self-signing the CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    // The SAN list: the configured name, and the loopback IPs so `127.0.0.1` also verifies.
    let mut sans = vec![hostname.to_string()];
    for ip in ["127.0.0.1", "::1"] {
        let same = hostname.parse::<IpAddr>().ok() == ip.parse::<IpAddr>().ok();
        if !same {
            sans.push(ip.to_string());
        }
    }
    let mut leaf = CertificateParams::new(sans)
        .with_context(|| format!("`{hostname}` is not a valid certificate name"))?;
    leaf.distinguished_name.push(DnType::CommonName, hostname);
    leaf.use_authority_key_identifier_extension = true;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if let Some((not_before, not_after)) = validity {
        leaf.not_before = not_before.into();
        leaf.not_after = not_after.into();
    }
    let leaf_key = KeyPair::generate().context("generating the server key")?;
    let leaf_cert = leaf
        .signed_by(&leaf_key, &issuer)
        .context("signing the server certificate")?;

    let chain: Vec<CertificateDer<'static>> = vec![leaf_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    // ring only: the crate never builds aws-lc-rs. No ALPN, like the Aliyun endpoint.
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("choosing TLS versions")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("building the TLS server config")?;

    Ok(TlsIdentity {
        ca_pem: ca_cert.pem(),
        server_config: Arc::new(server_config),
    })
}
