//! `Secret`: a string that never shows itself in `Debug`, `Display` or logs.

use std::fmt;

/// A credential value (AccessKey secret, STS token, password).
///
/// `Debug` and `Display` print `***`; the value is reached only through [`Secret::expose`],
/// so every place that reads it is easy to find with grep.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself. Call only where it goes on the wire or into a MAC.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A masked form for `check` output: whether it is set and how long, no character of it.
    pub fn masked(&self) -> String {
        match self.0.chars().count() {
            0 => "not set".to_string(),
            1 => "*** (1 char)".to_string(),
            n => format!("*** ({n} chars)"),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(s.masked(), "*** (19 chars)");
        assert!(!s.masked().contains("hun"), "no part of the value");
        assert_eq!(Secret::new("x").masked(), "*** (1 char)");
        assert_eq!(Secret::default().masked(), "not set");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }
}
