//! rustls client configuration on the ring provider: system roots plus an optional extra CA;
//! and what a failed handshake means, for the hint.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// Builds the TLS client config: the system's trust store (Mozilla's roots when the system has
/// none) plus every certificate in `ca_file`; or, for the embedded emulator of the demo
/// (`emulator_ca`, its freshly generated CA in PEM), that CA (plus `ca_file`) and no system
/// root, since nothing but the local emulator is ever its peer. Certificate checks, host name
/// included, cannot be turned off: there is no verifier here but rustls's own.
pub fn client_config(
    ca_file: Option<&Path>,
    emulator_ca: Option<&str>,
) -> Result<Arc<ClientConfig>, String> {
    let roots = trust_roots(ca_file, emulator_ca)?;
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The trust roots [`client_config`] uses.
fn trust_roots(ca_file: Option<&Path>, emulator_ca: Option<&str>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if let Some(pem) = emulator_ca {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("embedded CA: {e}"))?;
            roots.add(cert).map_err(|e| format!("embedded CA: {e}"))?;
        }
        if roots.is_empty() {
            return Err("embedded CA: no PEM certificate".into());
        }
    } else {
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A broken certificate in the system store is the system's problem; skip it.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
    }
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("ca_file {}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "ca_file {}: no PEM certificate in it",
                path.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        }
    }
    Ok(roots)
}

/// Why a TLS handshake failed, as far as the hint is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsProblem {
    /// The certificate chain does not lead to a trusted root.
    UnknownIssuer,
    /// A trusted root has the issuer's name but did not sign the certificate (e.g. `ca_file`
    /// is an old copy of a CA that was generated again, such as another emulator's).
    BadSignature,
    /// The certificate does not name the host connected to.
    WrongName,
    /// The certificate has expired (or the clock is wrong).
    Expired,
    /// The certificate is not valid yet (or the clock is wrong).
    NotYetValid,
    /// The peer did not speak TLS.
    NotTls,
    /// The peer closed the connection during the handshake.
    ClosedDuringHandshake,
    /// Anything else.
    Other,
}

impl TlsProblem {
    /// Classifies the error a tokio-rustls handshake returned (rustls's error inside an
    /// `io::Error`), by variant rather than by its words, which change between versions.
    pub fn of(e: &std::io::Error) -> TlsProblem {
        use rustls::{CertificateError as C, Error as R};
        let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<R>()) else {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                TlsProblem::ClosedDuringHandshake
            } else {
                TlsProblem::Other
            };
        };
        match inner {
            R::InvalidCertificate(C::UnknownIssuer) => TlsProblem::UnknownIssuer,
            R::InvalidCertificate(C::BadSignature) => TlsProblem::BadSignature,
            R::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
                TlsProblem::WrongName
            }
            R::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => TlsProblem::Expired,
            R::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
                TlsProblem::NotYetValid
            }
            R::InvalidMessage(_)
            | R::InappropriateMessage { .. }
            | R::InappropriateHandshakeMessage { .. } => TlsProblem::NotTls,
            _ => TlsProblem::Other,
        }
    }

    /// What to do about it, for a log line (empty when there is nothing specific to say).
    pub fn hint(self) -> &'static str {
        match self {
            TlsProblem::UnknownIssuer => "the server's certificate is not signed by a trusted root (set `ca_file` to the CA that signed it)",
            TlsProblem::BadSignature => "the server's certificate is not signed by the CA of that name that this machine trusts (is `ca_file` an old copy? set it to the CA that signed the server's certificate)",
            TlsProblem::WrongName => "the certificate does not name this host (check `host`: use the endpoint's documented name, not an IP address or alias)",
            TlsProblem::Expired => "the server's certificate has expired (or this machine's clock is wrong)",
            TlsProblem::NotYetValid => "the server's certificate is not valid yet (or this machine's clock is wrong)",
            TlsProblem::NotTls => "the server did not answer with TLS (check `port`: is this a TLS port? Aliyun uses TLS on 5671)",
            TlsProblem::ClosedDuringHandshake => "the server closed the connection during the TLS handshake (check `host` and `port`: is this a TLS endpoint?)",
            TlsProblem::Other => "",
        }
    }
}

#[cfg(all(test, feature = "emulator"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_demo_trusts_its_emulators_ca_and_nothing_else() {
        let emulator = crate::emulator::Emulator::start(crate::emulator::EmulatorConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();
        let demo = trust_roots(None, Some(emulator.ca_pem())).unwrap();
        assert_eq!(demo.len(), 1, "the emulator's CA only");
        let system = trust_roots(None, None).unwrap();
        assert!(system.len() > 1, "system (or Mozilla) roots otherwise");
        assert!(trust_roots(None, Some("not a certificate")).is_err());
    }
}
