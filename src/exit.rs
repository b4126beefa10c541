//! Exit statuses, in one place.

/// Finished normally (stopped by a signal, `--count` reached, or the reader closed stdout).
pub const OK: u8 = 0;
/// A runtime failure (for example the output could not be written).
pub const FAILURE: u8 = 1;
/// Command-line usage error (clap's own status).
pub const USAGE: u8 = 2;
/// `--duration` or `--idle-exit` ended the run before `--count` was reached.
pub const COUNT_NOT_REACHED: u8 = 3;
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
