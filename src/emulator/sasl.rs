//! SASL PLAIN for the emulator: checks Alibaba's signed username and password and records the verdict.
//!
//! fe2o3 calls `on_init` synchronously and clones the acceptor per connection, so the verdict
//! goes into a shared slot that the connection task reads once `accept()` returns.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::acceptor::SaslAcceptor;
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};

use super::{AuthFailure, StsToken};
use crate::cloud::alibaba::{parse_username, string_to_sign, AuthMode, SignMethod};
use crate::secret::Secret;

/// A login that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Login {
    pub client_id: String,
    pub consumer_group_id: String,
    pub auth_id: String,
    pub auth_mode: AuthMode,
    pub sign_method: SignMethod,
    /// When the STS token this login used expires: the connection is closed then.
    pub expires_at: Option<SystemTime>,
}

/// Why a login was refused. `reason` never contains the password, secret or token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub client_id: Option<String>,
    pub reason: String,
}

/// The outcome of one SASL exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Ok(Login),
    Refused(Refusal),
}

/// The credentials the emulator accepts and how strictly it checks them.
pub(crate) struct Authenticator {
    pub access_keys: Vec<(String, Secret)>,
    pub sts_tokens: Vec<StsToken>,
    pub consumer_group_id: Option<String>,
    pub max_clock_skew: Option<Duration>,
}

impl Authenticator {
    /// Checks one PLAIN login (authcid = Aliyun userName, passwd = the signature) at `now`.
    pub fn check(&self, username: &str, password: &str, now: SystemTime) -> Result<Login, Refusal> {
        let parsed = parse_username(username).map_err(|e| Refusal {
            client_id: None,
            reason: format!("malformed username: {e}"),
        })?;
        let client_id = parsed.client_id.clone();
        let refuse = |reason: String| Refusal {
            client_id: Some(client_id.clone()),
            reason,
        };
        let required = |key: &str| {
            parsed
                .get(key)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| refuse(format!("username lacks `{key}`")))
        };

        let auth_mode: AuthMode = required("authMode")?.parse().map_err(refuse)?;
        let sign_method: SignMethod = required("signMethod")?.parse().map_err(refuse)?;
        let group = required("consumerGroupId")?;
        let auth_id = required("authId")?;
        let timestamp_raw = required("timestamp")?;
        let timestamp: u64 = timestamp_raw
            .parse()
            .ok()
            // The signed string must repeat the username's timestamp verbatim; only a
            // canonical decimal survives the u64 round trip in `string_to_sign`.
            .filter(|t: &u64| t.to_string() == timestamp_raw)
            .ok_or_else(|| {
                refuse(format!(
                    "timestamp `{timestamp_raw}` is not decimal milliseconds"
                ))
            })?;

        if let Some(want) = &self.consumer_group_id {
            if group != want {
                return Err(refuse(format!(
                    "consumerGroupId `{group}` does not exist (this emulator serves `{want}`)"
                )));
            }
        }
        if let Some(max) = self.max_clock_skew {
            let now_ms = now
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let skew = Duration::from_millis(now_ms.abs_diff(timestamp));
            if skew > max {
                return Err(refuse(format!(
                    "timestamp {timestamp} is {} ms from the emulator clock (max {} ms)",
                    skew.as_millis(),
                    max.as_millis()
                )));
            }
        }

        let mut token_expiry = None;
        let (secret, token) = match auth_mode {
            AuthMode::Aksign => {
                let secret = self
                    .access_keys
                    .iter()
                    .find(|(id, _)| id == auth_id)
                    .map(|(_, s)| s)
                    .ok_or_else(|| refuse(format!("unknown AccessKey id `{auth_id}`")))?;
                (secret, None)
            }
            AuthMode::Ststoken => {
                let token = parsed
                    .get("securityToken")
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| refuse("authMode=ststoken without `securityToken`".into()))?;
                let candidates: Vec<&StsToken> = self
                    .sts_tokens
                    .iter()
                    .filter(|t| t.access_key_id == auth_id)
                    .collect();
                if candidates.is_empty() {
                    return Err(refuse(format!(
                        "no STS credentials issued for authId `{auth_id}`"
                    )));
                }
                let sts = candidates
                    .into_iter()
                    .find(|t| constant_time_eq(t.token.expose().as_bytes(), token.as_bytes()))
                    .ok_or_else(|| {
                        refuse(format!(
                            "securityToken does not match the one issued for authId `{auth_id}`"
                        ))
                    })?;
                if let Some(expiry) = sts.expires_at {
                    if now >= expiry {
                        let ago = now.duration_since(expiry).unwrap_or_default();
                        return Err(refuse(format!(
                            "STS token for authId `{auth_id}` expired {} s ago",
                            ago.as_secs()
                        )));
                    }
                }
                token_expiry = sts.expires_at;
                (&sts.access_key_secret, Some(token))
            }
        };

        let data = string_to_sign(auth_id, token, timestamp);
        let expected = sign_method.sign(secret.expose().as_bytes(), data.as_bytes());
        if !constant_time_eq(expected.as_bytes(), password.as_bytes()) {
            return Err(refuse(format!(
                "signature mismatch (authMode={auth_mode}, signMethod={sign_method}, authId={auth_id})"
            )));
        }
        Ok(Login {
            client_id: parsed.client_id.clone(),
            consumer_group_id: group.to_string(),
            auth_id: auth_id.to_string(),
            auth_mode,
            sign_method,
            expires_at: token_expiry,
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The fe2o3 `SaslAcceptor`: offers PLAIN only.
#[derive(Clone)]
pub(crate) struct EmulatorSasl {
    auth: Arc<Authenticator>,
    mode: AuthFailure,
    verdict: Arc<Mutex<Option<Verdict>>>,
    logins_failed: Arc<AtomicU64>,
    peer: SocketAddr,
}

impl EmulatorSasl {
    pub fn new(
        auth: Arc<Authenticator>,
        mode: AuthFailure,
        logins_failed: Arc<AtomicU64>,
        peer: SocketAddr,
    ) -> (Self, Arc<Mutex<Option<Verdict>>>) {
        let verdict = Arc::new(Mutex::new(None));
        let me = EmulatorSasl {
            auth,
            mode,
            verdict: verdict.clone(),
            logins_failed,
            peer,
        };
        (me, verdict)
    }

    fn judge(&self, init: &SaslInit) -> Verdict {
        let refused = |reason: &str| {
            Verdict::Refused(Refusal {
                client_id: None,
                reason: reason.to_string(),
            })
        };
        if init.mechanism.as_str() != "PLAIN" {
            return refused(&format!(
                "SASL mechanism `{}` not offered (PLAIN only)",
                init.mechanism.as_str()
            ));
        }
        let Some(response) = init.initial_response.as_ref() else {
            return refused("SASL PLAIN init without an initial response");
        };
        let mut parts = response.split(|b| *b == 0);
        let (Some(_authzid), Some(user), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return refused("SASL PLAIN response is not `authzid NUL authcid NUL passwd`");
        };
        let (Ok(user), Ok(pass)) = (std::str::from_utf8(user), std::str::from_utf8(pass)) else {
            return refused("SASL PLAIN username or password is not UTF-8");
        };
        match self.auth.check(user, pass, SystemTime::now()) {
            Ok(login) => Verdict::Ok(login),
            Err(refusal) => Verdict::Refused(refusal),
        }
    }

    fn record(&self, verdict: Verdict) {
        match &verdict {
            Verdict::Ok(login) => tracing::debug!(
                peer = %self.peer,
                client_id = %login.client_id,
                group = %login.consumer_group_id,
                auth_id = %login.auth_id,
                "SASL PLAIN login accepted"
            ),
            Verdict::Refused(r) => {
                self.logins_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    peer = %self.peer,
                    client_id = r.client_id.as_deref().unwrap_or("-"),
                    reason = %r.reason,
                    "login refused"
                );
            }
        }
        if let Ok(mut slot) = self.verdict.lock() {
            *slot = Some(verdict);
        }
    }
}

impl SaslAcceptor for EmulatorSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("PLAIN")])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let verdict = self.judge(&init);
        let code = match (&verdict, self.mode) {
            (Verdict::Ok(_), _) => SaslCode::Ok,
            // The other mode completes SASL and refuses right after Open.
            (Verdict::Refused(_), AuthFailure::CloseUnauthorized) => SaslCode::Ok,
            (Verdict::Refused(_), AuthFailure::SaslOutcome) => SaslCode::Auth,
        };
        self.record(verdict);
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // PLAIN is one round trip; a response frame is a protocol error.
        self.record(Verdict::Refused(Refusal {
            client_id: None,
            reason: "unexpected SASL response frame (PLAIN has no challenge)".into(),
        }));
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Sys,
            additional_data: None,
        })
    }
}
