//! Reads a profile's AccessKey id, secret and STS token from where the profile says they are.
//!
//! Read again before every connection attempt, so a rotated file or token is picked up.

use crate::cloud::alibaba::LoginParams;
use crate::config::{Profile, SecretSource};
use crate::secret::Secret;

/// A credential could not be read; the message names the source but never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {why}")]
pub struct CredentialError {
    /// Which credential, for example "access_key_secret".
    pub what: &'static str,
    /// Why, naming the variable or file.
    pub why: String,
}

fn read(what: &'static str, source: &SecretSource) -> Result<Secret, CredentialError> {
    let value = match source {
        SecretSource::Inline(v) => v.clone(),
        SecretSource::Env(var) => std::env::var(var).map_err(|e| CredentialError {
            what,
            why: match e {
                std::env::VarError::NotPresent => format!("environment variable {var} is not set"),
                std::env::VarError::NotUnicode(_) => {
                    format!("environment variable {var} is not UTF-8")
                }
            },
        })?,
        SecretSource::File(path) => std::fs::read_to_string(path).map_err(|e| CredentialError {
            what,
            why: format!("cannot read {}: {e}", path.display()),
        })?,
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(CredentialError {
            what,
            why: format!("{source} is empty"),
        });
    }
    Ok(Secret::new(value))
}

/// Everything needed to sign a login for `profile`, with the secrets read now.
pub fn resolve(profile: &Profile) -> Result<LoginParams, CredentialError> {
    let access_key_id = read("access_key_id", &profile.access_key_id)?;
    let access_key_secret = read("access_key_secret", &profile.access_key_secret)?;
    let security_token = match &profile.security_token {
        Some(source) => Some(read("security_token", source)?),
        None => None,
    };
    Ok(LoginParams {
        client_id: profile.client_id.clone(),
        iot_instance_id: profile.iot_instance_id.clone(),
        consumer_group_id: profile.consumer_group_id.clone(),
        auth_mode: profile.auth_mode,
        sign_method: profile.sign_method,
        access_key_id: access_key_id.expose().to_string(),
        access_key_secret,
        security_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sources_are_read_and_trimmed_and_errors_name_the_source_only() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "  file-secret  ").unwrap();
        assert_eq!(
            read("x", &SecretSource::File(f.path().into()))
                .unwrap()
                .expose(),
            "file-secret"
        );
        assert_eq!(
            read("x", &SecretSource::Inline("v".into()))
                .unwrap()
                .expose(),
            "v"
        );
        let e = read(
            "access_key_secret",
            &SecretSource::Env("IOT_SUB_TEST_SURELY_UNSET".into()),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "access_key_secret: environment variable IOT_SUB_TEST_SURELY_UNSET is not set"
        );
        let e = read("t", &SecretSource::Inline("   ".into())).unwrap_err();
        assert_eq!(e.to_string(), "t: the config file is empty");
    }
}
