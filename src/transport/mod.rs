//! One connection attempt: DNS → TCP (NODELAY, keep-alive) → TLS → SASL PLAIN → Open → Begin →
//! receiver Attach, every step under a deadline; and what ended a connection, in words.
//!
//! The socket is opened here (NODELAY, keep-alive), TLS is done here with rustls on ring, and
//! the AMQP side is our own receiving end ([`engine`]) on fe2o3-amqp's types and codec.
//!
//! Each step is a public function ([`resolve`], [`connect_addrs`], [`tls_connect`], [`login`],
//! [`open_session`], [`attach`]) so `iot-sub check` can time them.

pub mod engine;
#[cfg(test)]
mod engine_tests;
pub mod frames;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::types::definitions;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::cloud::SaslCredentials;
use crate::secret::Secret;

/// DNS lookup deadline.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP connect deadline, per address.
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// From TCP connected to receiver attached. Aliyun closes a connection whose receiver link is
/// not attached 15 s after it is set up; staying well inside that leaves room for a slow WAN.
pub const ATTACH_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline for each step of a polite close (detach, end, close).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline for writing settlements and flows to the server.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive idle time: finds a dead path even when AMQP traffic is paused.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Host name: DNS, TLS SNI and certificate check.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The AMQP container id (the client id).
    pub container_id: String,
    /// The idle-time-out to put in the Open frame, exactly.
    pub idle_timeout: Duration,
    /// Receiver link credit.
    pub credit: u32,
    /// Receiver source address.
    pub source: String,
    /// TLS settings (trust roots).
    pub tls: Arc<rustls::ClientConfig>,
}

/// Why a connection could not be made, or why it ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The host name did not resolve.
    #[error("DNS lookup of {host} failed: {reason}")]
    Dns {
        /// Host looked up.
        host: String,
        /// Resolver's words.
        reason: String,
    },
    /// No address accepted a TCP connection.
    #[error("TCP connect to {target} failed: {reason}")]
    Tcp {
        /// host:port or address.
        target: String,
        /// OS's words.
        reason: String,
    },
    /// The TLS handshake failed (trust, host name, protocol).
    #[error("TLS handshake with {host} failed: {reason}")]
    Tls {
        /// Server name checked.
        host: String,
        /// rustls's words, and the hint.
        reason: String,
        /// What kind of failure.
        problem: tls::TlsProblem,
    },
    /// The server refused the login.
    #[error("login rejected by the server ({detail})")]
    LoginRejected {
        /// The SASL outcome or the close condition and description, verbatim.
        detail: String,
    },
    /// The server closed the connection, session or link with an error.
    #[error("server closed the {what}: {condition}{description}")]
    RemoteClosed {
        /// connection, session or link.
        what: &'static str,
        /// AMQP error condition, verbatim.
        condition: String,
        /// ": description" verbatim, or empty.
        description: String,
    },
    /// The server closed cleanly.
    #[error("server closed the {0} without an error")]
    RemoteClosedCleanly(&'static str),
    /// Nothing came from the server for the local idle-time-out.
    #[error("no frame from the server for {0:?}: the peer is silent (idle-time-out)")]
    Silent(Duration),
    /// A step did not finish in time.
    #[error("{step} did not finish within {after:?}")]
    Timeout {
        /// Which step.
        step: &'static str,
        /// Its deadline.
        after: Duration,
    },
    /// The connection failed below AMQP (reset, EOF, framing).
    #[error("connection lost: {0}")]
    Lost(String),
    /// The server broke the protocol (an unexpected frame, an undecodable frame).
    #[error("AMQP error: {0}")]
    Protocol(String),
}

impl LinkError {
    /// A short, stable label for metrics (`reconnects by cause`).
    pub fn label(&self) -> &'static str {
        match self {
            LinkError::Dns { .. } => "dns",
            LinkError::Tcp { .. } => "tcp",
            LinkError::Tls { .. } => "tls",
            LinkError::LoginRejected { .. } => "login_rejected",
            LinkError::RemoteClosed { .. } => "server_closed",
            LinkError::RemoteClosedCleanly(_) => "server_closed",
            LinkError::Silent(_) => "silent_peer",
            LinkError::Timeout { .. } => "timeout",
            LinkError::Lost(_) => "connection_lost",
            LinkError::Protocol(_) => "protocol",
        }
    }

    /// A rejected login: logged as an error, not a warning, but still retried with backoff.
    pub fn is_login_rejected(&self) -> bool {
        matches!(self, LinkError::LoginRejected { .. })
    }
}

/// Turns a remote AMQP error into a [`LinkError`]; `amqp:unauthorized-access` is a rejected login.
pub fn remote_error(what: &'static str, e: &definitions::Error) -> LinkError {
    let condition = condition_text(&e.condition);
    let description = e
        .description
        .as_deref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default();
    if condition == "amqp:unauthorized-access" {
        return LinkError::LoginRejected {
            detail: format!("{condition}{description}"),
        };
    }
    LinkError::RemoteClosed {
        what,
        condition,
        description,
    }
}

fn condition_text(c: &definitions::ErrorCondition) -> String {
    use definitions::ErrorCondition as C;
    use fe2o3_amqp::types::primitives::Symbol;
    let symbol = match c {
        C::AmqpError(e) => Symbol::from(e),
        C::ConnectionError(e) => Symbol::from(e),
        C::SessionError(e) => Symbol::from(e),
        C::LinkError(e) => Symbol::from(e),
        C::Custom(s) => s.clone(),
    };
    symbol.0
}

/// A live subscription: the connection, its session and the one receiver link.
pub type Subscription = engine::Receiver<TlsStream>;

/// Opens a subscription. DNS and TCP have their own deadlines; TLS through Attach share
/// [`ATTACH_DEADLINE`].
pub async fn connect(
    endpoint: &Endpoint,
    creds: SaslCredentials,
) -> Result<Subscription, LinkError> {
    let tcp = connect_tcp(&endpoint.host, endpoint.port).await?;
    match timeout(ATTACH_DEADLINE, handshake(endpoint, creds, tcp)).await {
        Ok(result) => result,
        Err(_) => Err(LinkError::Timeout {
            step: "TLS, login, open and attach",
            after: ATTACH_DEADLINE,
        }),
    }
}

/// Resolves and connects, trying each address, with TCP_NODELAY and keep-alive on.
pub async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, LinkError> {
    let addrs = resolve(host, port).await?;
    connect_addrs(host, &addrs).await
}

/// Looks `host` up within [`DNS_TIMEOUT`].
pub async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, LinkError> {
    match timeout(DNS_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(a)) => Ok(a.collect()),
        Ok(Err(e)) => Err(LinkError::Dns {
            host: host.to_string(),
            reason: e.to_string(),
        }),
        Err(_) => Err(LinkError::Timeout {
            step: "DNS lookup",
            after: DNS_TIMEOUT,
        }),
    }
}

/// Connects to the first of `addrs` that accepts, each within [`TCP_CONNECT_TIMEOUT`], with
/// TCP_NODELAY and keep-alive on. `host` names the lookup when there is no address.
pub async fn connect_addrs(host: &str, addrs: &[SocketAddr]) -> Result<TcpStream, LinkError> {
    let mut last = LinkError::Dns {
        host: host.to_string(),
        reason: "no addresses".into(),
    };
    for &addr in addrs {
        match timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                // Without NODELAY every credit refill after a disposition waits for the peer's
                // delayed ACK (~40 ms): throughput falls to a few thousand messages per second.
                let _ = stream.set_nodelay(true);
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(TCP_KEEPALIVE)
                    .with_interval(Duration::from_secs(10));
                let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                return Ok(stream);
            }
            Ok(Err(e)) => {
                last = LinkError::Tcp {
                    target: addr.to_string(),
                    reason: e.to_string(),
                }
            }
            Err(_) => {
                last = LinkError::Timeout {
                    step: "TCP connect",
                    after: TCP_CONNECT_TIMEOUT,
                }
            }
        }
    }
    Err(last)
}

/// TLS, login, open and attach over a connected socket (no deadline of its own).
async fn handshake(
    endpoint: &Endpoint,
    creds: SaslCredentials,
    tcp: TcpStream,
) -> Result<Subscription, LinkError> {
    let tls = tls_connect(endpoint, tcp).await?;
    let mut receiver = engine::Receiver::new(tls, endpoint.credit);
    login(&mut receiver, endpoint, creds).await?;
    open_session(&mut receiver, endpoint).await?;
    attach(&mut receiver, endpoint).await?;
    Ok(receiver)
}

/// SASL PLAIN with these credentials (no deadline of its own).
pub async fn login<Io: AsyncRead + AsyncWrite + Unpin>(
    receiver: &mut engine::Receiver<Io>,
    endpoint: &Endpoint,
    creds: SaslCredentials,
) -> Result<(), LinkError> {
    let SaslCredentials { username, password } = creds;
    receiver
        .sasl_plain(&endpoint.host, &username, Secret::expose(&password))
        .await
}

/// Open and Begin; returns what the server's Open said (no deadline of its own).
pub async fn open_session<Io: AsyncRead + AsyncWrite + Unpin>(
    receiver: &mut engine::Receiver<Io>,
    endpoint: &Endpoint,
) -> Result<engine::ServerOpen, LinkError> {
    let server = receiver
        .open(
            &endpoint.container_id,
            &endpoint.host,
            endpoint.idle_timeout,
        )
        .await?;
    receiver.begin().await?;
    Ok(server)
}

/// Attaches the receiver link on the endpoint's source (no deadline of its own).
pub async fn attach<Io: AsyncRead + AsyncWrite + Unpin>(
    receiver: &mut engine::Receiver<Io>,
    endpoint: &Endpoint,
) -> Result<(), LinkError> {
    receiver
        .attach(&link_name(endpoint), &endpoint.source)
        .await
}

/// The receiver link's name.
pub fn link_name(endpoint: &Endpoint) -> String {
    format!("{}-receiver", endpoint.container_id)
}

/// The TLS stream the AMQP connection runs over.
pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// The TLS handshake, straight away as Aliyun expects (no AMQP TLS protocol header first),
/// checking the certificate against `endpoint.host`. No deadline of its own.
pub async fn tls_connect(endpoint: &Endpoint, tcp: TcpStream) -> Result<TlsStream, LinkError> {
    let server_name = ServerName::try_from(endpoint.host.clone()).map_err(|e| LinkError::Tls {
        host: endpoint.host.clone(),
        reason: e.to_string(),
        problem: tls::TlsProblem::Other,
    })?;
    tokio_rustls::TlsConnector::from(endpoint.tls.clone())
        .connect(server_name, tcp)
        .await
        .map_err(|e| {
            let problem = tls::TlsProblem::of(&e);
            let reason = match problem.hint() {
                "" => e.to_string(),
                hint => format!("{e}; {hint}"),
            };
            LinkError::Tls {
                host: endpoint.host.clone(),
                reason,
                problem,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without NODELAY every credit refill waits for the peer's delayed ACK (issue 6's first
    /// lever); without keep-alive a dead path goes unnoticed while AMQP traffic is paused.
    #[tokio::test]
    async fn sockets_it_opens_have_nodelay_and_keepalive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect_addrs("localhost", &[addr]).await.unwrap();
        assert!(stream.nodelay().unwrap());
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().unwrap());
    }
}
