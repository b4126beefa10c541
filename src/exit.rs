//! Exit statuses, in one place.

/// Finished normally (stopped by a signal, `--count` reached, or the reader closed stdout).
pub const OK: u8 = 0;
/// A runtime failure (for example the output could not be written).
pub const FAILURE: u8 = 1;
/// Command-line usage error (clap's own status).
pub const USAGE: u8 = 2;
/// `--duration` or `--idle-exit` ended the run before `--count` was reached.
pub const COUNT_NOT_REACHED: u8 = 3;
/// `check`: the host name did not resolve (or the lookup timed out).
pub const CHECK_DNS: u8 = 10;
/// `check`: no address accepted a TCP connection (refused, unreachable, timed out).
pub const CHECK_TCP: u8 = 11;
/// `check`: the TLS handshake failed (untrusted certificate, wrong name, not a TLS port).
pub const CHECK_TLS: u8 = 12;
/// `check`: the login was refused (SASL outcome, or a close with `amqp:unauthorized-access`
/// right after Open), or SASL did not finish.
pub const CHECK_LOGIN: u8 = 13;
/// `check`: the AMQP Open or the session's Begin failed (e.g. a close right after Open).
pub const CHECK_OPEN: u8 = 14;
/// `check`: the receiver link could not be attached.
pub const CHECK_ATTACH: u8 = 15;
/// Configuration error (EX_CONFIG from sysexits.h): bad profile, missing credentials.
pub const CONFIG: u8 = 78;
/// A second SIGINT/SIGTERM: exited at once.
pub const INTERRUPTED: u8 = 130;

/// The exit status for why a run stopped.
pub fn for_stop(reason: &crate::stop::StopReason, count_given: bool) -> u8 {
    use crate::stop::StopReason as R;
    match reason {
        R::Signal | R::Count | R::OutputClosed => OK,
        R::Duration | R::Idle if count_given => COUNT_NOT_REACHED,
        R::Duration | R::Idle => OK,
        R::OutputFailed(_) => FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stop::StopReason as R;

    #[test]
    fn statuses() {
        assert_eq!(for_stop(&R::Count, true), 0);
        assert_eq!(for_stop(&R::Signal, true), 0);
        assert_eq!(for_stop(&R::OutputClosed, false), 0);
        assert_eq!(for_stop(&R::Idle, false), 0);
        assert_eq!(for_stop(&R::Duration, true), 3);
        assert_eq!(for_stop(&R::Idle, true), 3);
        assert_eq!(for_stop(&R::OutputFailed("x".into()), false), 1);
    }
}
