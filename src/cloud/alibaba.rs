//! Alibaba Cloud IoT Platform AMQP server-side subscription: username and password signing.
//!
//! Documented shape (Aliyun "Connect an AMQP client to IoT Platform"):
//! `userName = clientId|authMode=..,signMethod=..,timestamp=..,authId=..,iotInstanceId=..,consumerGroupId=..|`
//! (plus `securityToken=..` for `ststoken`), and
//! `password = Base64(HMAC-<signMethod>(AccessKeySecret, stringToSign))`, where stringToSign is the
//! signed parameters sorted by name: `authId=..&[securityToken=..&]timestamp=..`.
//! Everything here is a pure function of its inputs (the timestamp is passed in), so the
//! known-answer tests pin the algorithm.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;

use super::SaslCredentials;
use crate::secret::Secret;

/// `authMode` in the username.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// AccessKey of the account or a RAM user.
    Aksign,
    /// STS temporary credentials of a RAM role (adds `securityToken`).
    Ststoken,
}

impl AuthMode {
    /// The spelling used on the wire and in profiles.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Aksign => "aksign",
            AuthMode::Ststoken => "ststoken",
        }
    }
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "aksign" => Ok(AuthMode::Aksign),
            "ststoken" => Ok(AuthMode::Ststoken),
            _ => Err(format!("unknown authMode `{s}` (aksign | ststoken)")),
        }
    }
}

/// `signMethod` in the username: the HMAC used for the password.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignMethod {
    /// HMAC-MD5.
    Hmacmd5,
    /// HMAC-SHA1 (the samples' choice).
    Hmacsha1,
    /// HMAC-SHA256.
    Hmacsha256,
}

impl SignMethod {
    /// The spelling used on the wire and in profiles.
    pub fn as_str(self) -> &'static str {
        match self {
            SignMethod::Hmacmd5 => "hmacmd5",
            SignMethod::Hmacsha1 => "hmacsha1",
            SignMethod::Hmacsha256 => "hmacsha256",
        }
    }

    /// Base64 of HMAC(key, data) with this method.
    pub fn sign(self, key: &[u8], data: &[u8]) -> String {
        fn mac<M: Mac + hmac::digest::KeyInit>(key: &[u8], data: &[u8]) -> Vec<u8> {
            let mut m = <M as hmac::digest::KeyInit>::new_from_slice(key)
                .expect("HMAC accepts keys of any length");
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
        let raw = match self {
            SignMethod::Hmacmd5 => mac::<Hmac<md5::Md5>>(key, data),
            SignMethod::Hmacsha1 => mac::<Hmac<sha1::Sha1>>(key, data),
            SignMethod::Hmacsha256 => mac::<Hmac<sha2::Sha256>>(key, data),
        };
        base64::engine::general_purpose::STANDARD.encode(raw)
    }
}

impl fmt::Display for SignMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SignMethod {
    type Err = String;
    // Case-insensitive: the official Go sample writes `Hmacsha1`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "hmacmd5" => Ok(SignMethod::Hmacmd5),
            "hmacsha1" => Ok(SignMethod::Hmacsha1),
            "hmacsha256" => Ok(SignMethod::Hmacsha256),
            _ => Err(format!(
                "unknown signMethod `{s}` (hmacmd5 | hmacsha1 | hmacsha256)"
            )),
        }
    }
}

/// Everything that goes into one signed login, resolved (secrets already read).
#[derive(Clone, Debug)]
pub struct LoginParams {
    /// Shown in the console's list of online clients; 1-64 characters.
    pub client_id: String,
    /// Instance id; `None` for legacy public instances that have none.
    pub iot_instance_id: Option<String>,
    /// Consumer group to read.
    pub consumer_group_id: String,
    /// aksign or ststoken.
    pub auth_mode: AuthMode,
    /// The HMAC for the password.
    pub sign_method: SignMethod,
    /// AccessKey id (`authId`).
    pub access_key_id: String,
    /// AccessKey secret: the HMAC key.
    pub access_key_secret: Secret,
    /// STS SecurityToken, required for ststoken.
    pub security_token: Option<Secret>,
}

/// The string the password signs: the signed parameters sorted by name, `k=v` joined by `&`.
pub fn string_to_sign(
    access_key_id: &str,
    security_token: Option<&str>,
    timestamp_ms: u64,
) -> String {
    match security_token {
        Some(token) => {
            format!("authId={access_key_id}&securityToken={token}&timestamp={timestamp_ms}")
        }
        None => format!("authId={access_key_id}&timestamp={timestamp_ms}"),
    }
}

/// Builds the SASL PLAIN username and password for one connection attempt at `timestamp_ms`.
pub fn sign(params: &LoginParams, timestamp_ms: u64) -> SaslCredentials {
    let token = match params.auth_mode {
        AuthMode::Aksign => None,
        AuthMode::Ststoken => params.security_token.as_ref().map(|t| t.expose()),
    };
    let mut username = format!(
        "{}|authMode={},signMethod={},timestamp={},authId={}",
        params.client_id, params.auth_mode, params.sign_method, timestamp_ms, params.access_key_id
    );
    if let Some(instance) = &params.iot_instance_id {
        username.push_str(",iotInstanceId=");
        username.push_str(instance);
    }
    username.push_str(",consumerGroupId=");
    username.push_str(&params.consumer_group_id);
    if let Some(token) = token {
        username.push_str(",securityToken=");
        username.push_str(token);
    }
    username.push('|');
    let data = string_to_sign(&params.access_key_id, token, timestamp_ms);
    let password = params.sign_method.sign(
        params.access_key_secret.expose().as_bytes(),
        data.as_bytes(),
    );
    SaslCredentials {
        username,
        password: Secret::new(password),
    }
}

/// The username with the security token masked, for logs and `check` output.
pub fn masked_username(username: &str) -> String {
    match username.find("securityToken=") {
        None => username.to_string(),
        Some(start) => {
            let value_start = start + "securityToken=".len();
            let end = username[value_start..]
                .find([',', '|'])
                .map_or(username.len(), |i| value_start + i);
            format!("{}***{}", &username[..value_start], &username[end..])
        }
    }
}

/// A username as the server reads it: `clientId|k=v,...|`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUsername {
    /// The part before the first `|`.
    pub client_id: String,
    /// The `k=v` parameters in their order on the wire.
    pub params: Vec<(String, String)>,
}

impl ParsedUsername {
    /// The value of parameter `key` (keys compare exactly, as documented).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `clientId|k=v,...|` (the trailing `|` is required, as documented).
pub fn parse_username(username: &str) -> Result<ParsedUsername, String> {
    let (client_id, rest) = username
        .split_once('|')
        .ok_or("username has no `|` after the client id")?;
    let inner = rest
        .strip_suffix('|')
        .ok_or("username does not end with `|`")?;
    if client_id.is_empty() || client_id.chars().count() > 64 {
        return Err("client id must be 1 to 64 characters".into());
    }
    let mut params = Vec::new();
    for part in inner.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("parameter `{part}` has no `=`"))?;
        params.push((k.to_string(), v.to_string()));
    }
    Ok(ParsedUsername {
        client_id: client_id.to_string(),
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known answers. The hmacsha1/aksign vector is the one quoted in the research notes
    // (secret `secretExample`). All others were computed independently with CPython's
    // standard library:
    //   python3 -c 'import hmac,hashlib,base64; print(base64.b64encode(hmac.new(
    //     b"secretExample", b"<stringToSign>", hashlib.<md5|sha1|sha256>).digest()).decode())'
    const AK_DATA: &str = "authId=LTAIexample&timestamp=1573489088171";
    const STS_DATA: &str =
        "authId=STS.NTexample&securityToken=CAIS.token/+=&timestamp=1700000000000";

    #[test]
    fn string_to_sign_is_sorted_by_key() {
        assert_eq!(string_to_sign("LTAIexample", None, 1573489088171), AK_DATA);
        assert_eq!(
            string_to_sign("STS.NTexample", Some("CAIS.token/+="), 1700000000000),
            STS_DATA
        );
    }

    #[test]
    fn known_answers_for_all_sign_methods_aksign() {
        let key = b"secretExample";
        let data = AK_DATA.as_bytes();
        assert_eq!(
            SignMethod::Hmacsha1.sign(key, data),
            "ZvFBsbxWO3JSK86g/H08CaVG6kY="
        );
        assert_eq!(
            SignMethod::Hmacmd5.sign(key, data),
            "SqZm6sWZ5Kmd3QnuvIS5gA=="
        );
        assert_eq!(
            SignMethod::Hmacsha256.sign(key, data),
            "9E3w1+tvO4tDVGWrbAHriL75plUcQYVd5vexpa6p2zU="
        );
    }

    #[test]
    fn known_answers_for_all_sign_methods_ststoken() {
        let key = b"secretExample";
        let data = STS_DATA.as_bytes();
        assert_eq!(
            SignMethod::Hmacsha1.sign(key, data),
            "jjmbU73imWNdUjYoukpxzrEVXh4="
        );
        assert_eq!(
            SignMethod::Hmacmd5.sign(key, data),
            "n3/CeEwrkrsduGy14rrONg=="
        );
        assert_eq!(
            SignMethod::Hmacsha256.sign(key, data),
            "vOw+5mygrbcnaRgWOxvSxYfr6FoEVmYRv7e5lMUAzd4="
        );
    }

    fn params(mode: AuthMode, method: SignMethod) -> LoginParams {
        LoginParams {
            client_id: "host-1".into(),
            iot_instance_id: Some("iot-06z00example".into()),
            consumer_group_id: "DEFAULT_GROUP".into(),
            auth_mode: mode,
            sign_method: method,
            access_key_id: if mode == AuthMode::Aksign {
                "LTAIexample"
            } else {
                "STS.NTexample"
            }
            .into(),
            access_key_secret: Secret::new("secretExample"),
            security_token: Some(Secret::new("CAIS.token/+=")),
        }
    }

    #[test]
    fn aksign_login_matches_the_documented_shape() {
        let c = sign(
            &params(AuthMode::Aksign, SignMethod::Hmacsha1),
            1573489088171,
        );
        assert_eq!(
            c.username,
            "host-1|authMode=aksign,signMethod=hmacsha1,timestamp=1573489088171,authId=LTAIexample,\
             iotInstanceId=iot-06z00example,consumerGroupId=DEFAULT_GROUP|"
        );
        assert_eq!(c.password.expose(), "ZvFBsbxWO3JSK86g/H08CaVG6kY=");
    }

    #[test]
    fn ststoken_login_carries_and_signs_the_token() {
        for (method, want) in [
            (SignMethod::Hmacmd5, "n3/CeEwrkrsduGy14rrONg=="),
            (SignMethod::Hmacsha1, "jjmbU73imWNdUjYoukpxzrEVXh4="),
            (
                SignMethod::Hmacsha256,
                "vOw+5mygrbcnaRgWOxvSxYfr6FoEVmYRv7e5lMUAzd4=",
            ),
        ] {
            let c = sign(&params(AuthMode::Ststoken, method), 1700000000000);
            assert!(
                c.username.contains(",securityToken=CAIS.token/+=|"),
                "{}",
                c.username
            );
            assert!(c.username.contains(&format!("signMethod={method},")));
            assert_eq!(c.password.expose(), want);
        }
    }

    #[test]
    fn aksign_never_sends_a_token_and_instance_id_is_optional() {
        let mut p = params(AuthMode::Aksign, SignMethod::Hmacmd5);
        p.iot_instance_id = None;
        let c = sign(&p, 1573489088171);
        assert!(!c.username.contains("securityToken"));
        assert!(!c.username.contains("iotInstanceId"));
        assert_eq!(c.password.expose(), "SqZm6sWZ5Kmd3QnuvIS5gA==");
    }

    #[test]
    fn username_round_trips_through_the_parser() {
        let c = sign(&params(AuthMode::Ststoken, SignMethod::Hmacsha256), 42);
        let parsed = parse_username(&c.username).unwrap();
        assert_eq!(parsed.client_id, "host-1");
        assert_eq!(parsed.get("authMode"), Some("ststoken"));
        assert_eq!(parsed.get("timestamp"), Some("42"));
        assert_eq!(parsed.get("securityToken"), Some("CAIS.token/+="));
        assert!(parse_username("no-bars").is_err());
        assert!(parse_username("id|a=b").is_err());
    }

    #[test]
    fn masked_username_hides_the_token_only() {
        let c = sign(&params(AuthMode::Ststoken, SignMethod::Hmacsha1), 1);
        let m = masked_username(&c.username);
        assert!(!m.contains("CAIS.token"));
        assert!(m.contains("securityToken=***|"));
        assert!(m.contains("authId=STS.NTexample"));
    }

    #[test]
    fn debug_of_login_params_and_sasl_credentials_shows_no_secret() {
        let p = params(AuthMode::Ststoken, SignMethod::Hmacsha256);
        let c = sign(&p, 1700000000000);
        let password = c.password.expose().to_string();
        for shown in [format!("{p:?}"), format!("{c:?}"), format!("{c:#?}")] {
            assert!(!shown.contains("secretExample"), "{shown}");
            assert!(!shown.contains("CAIS.token"), "{shown}");
            assert!(!shown.contains(&password[..8]), "{shown}");
            assert!(shown.contains("STS.NTexample"), "{shown}");
        }
    }

    #[test]
    fn sign_method_parsing_is_case_insensitive() {
        assert_eq!(
            "Hmacsha1".parse::<SignMethod>().unwrap(),
            SignMethod::Hmacsha1
        );
        assert!("sha1".parse::<SignMethod>().is_err());
    }
}
