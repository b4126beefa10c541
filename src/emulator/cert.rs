//! The emulator's TLS identity: a CA and a server leaf, generated in memory at start.
//!
//! By default only the CA *certificate* ever leaves memory (through `Emulator::write_ca`); the
//! private keys live in the rustls `ServerConfig` and die with it. Only when asked to keep its
//! identity across restarts (`--keep-identity FILE`) is the server key written, to a file
//! created with mode 0600; the CA key is never kept.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What the listener needs: the CA in PEM for clients, and the server config for rustls.
pub(crate) struct TlsIdentity {
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

/// The identity as PEM text: the CA certificate, the server certificate and the server key.
struct Pems {
    ca: String,
    leaf: String,
    key: String,
}

/// Generates a CA and a leaf for `hostname` (plus the loopback addresses) signed by it, the
/// leaf valid for `validity` (not before, not after) when given.
pub(crate) fn generate(
    hostname: &str,
    validity: Option<(SystemTime, SystemTime)>,
) -> anyhow::Result<TlsIdentity> {
    from_pems(generate_pems(hostname, validity)?)
}

/// The identity kept in `path`, or, if there is none yet, a new one written there (mode
/// 0600): a restarted emulator then presents a certificate its clients already trust.
pub(crate) fn load_or_generate(
    hostname: &str,
    validity: Option<(SystemTime, SystemTime)>,
    path: &Path,
) -> anyhow::Result<TlsIdentity> {
    let pems = match std::fs::read_to_string(path) {
        Ok(text) => split_pems(&text).with_context(|| {
            format!("{} is not an identity this emulator wrote", path.display())
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pems = generate_pems(hostname, validity)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            file.write_all(format!("{}{}{}", pems.ca, pems.leaf, pems.key).as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            pems
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    from_pems(pems)
}

/// Splits our own layout back up: CA certificate, server certificate, server key.
fn split_pems(text: &str) -> anyhow::Result<Pems> {
    const END_CERT: &str = "-----END CERTIFICATE-----";
    let mut parts = text.split_inclusive(END_CERT);
    let (Some(ca), Some(leaf), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        anyhow::bail!("expected two certificates and a key");
    };
    Ok(Pems {
        ca: format!("{}\n", ca.trim()),
        leaf: format!("{}\n", leaf.trim()),
        key: format!("{}\n", key.trim()),
    })
}

fn from_pems(pems: Pems) -> anyhow::Result<TlsIdentity> {
    let leaf = CertificateDer::from_pem_slice(pems.leaf.as_bytes())
        .context("reading the server certificate")?;
    let key =
        PrivateKeyDer::from_pem_slice(pems.key.as_bytes()).context("reading the server key")?;
    // ring only: the crate never builds aws-lc-rs. No ALPN, like the Aliyun endpoint.
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("choosing TLS versions")?
    .with_no_client_auth()
    .with_single_cert(vec![leaf], key)
    .context("building the TLS server config")?;
    Ok(TlsIdentity {
        ca_pem: pems.ca,
        server_config: Arc::new(server_config),
    })
}

fn generate_pems(
    hostname: &str,
    validity: Option<(SystemTime, SystemTime)>,
) -> anyhow::Result<Pems> {
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

    Ok(Pems {
        ca: ca_cert.pem(),
        leaf: leaf_cert.pem(),
        key: leaf_key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_kept_identity_is_reused_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.pem");
        let first = load_or_generate("localhost", None, &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the server key is not readable by others"
        );
        let again = load_or_generate("localhost", None, &path).unwrap();
        assert_eq!(first.ca_pem, again.ca_pem, "the same CA after a restart");
        assert_ne!(first.ca_pem, generate("localhost", None).unwrap().ca_pem);

        std::fs::write(&path, "not pem").unwrap();
        let err = format!(
            "{:#}",
            load_or_generate("localhost", None, &path).err().unwrap()
        );
        assert!(err.contains("identity.pem"), "{err}");
    }
}
