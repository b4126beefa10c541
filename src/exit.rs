//! Exit statuses, in one place.

/// Finished normally (stopped by a signal, `--count` reached, or the reader closed stdout).
pub const OK: u8 = 0;
/// A runtime failure (for example the output could not be written).
pub const FAILURE: u8 = 1;
/// Command-line usage error (clap's own status).
pub const USAGE: u8 = 2;
/// Configuration error (EX_CONFIG from sysexits.h): bad profile, missing credentials.
pub const CONFIG: u8 = 78;
/// A second SIGINT/SIGTERM: exited at once.
pub const INTERRUPTED: u8 = 130;
