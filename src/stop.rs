//! Why the run stops: one cancellation token for every task, and the first reason given.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// The first reason given wins; later ones are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT or SIGTERM.
    Signal,
    /// `--count` messages written and accepted.
    Count,
    /// `--duration` elapsed.
    Duration,
    /// `--idle-exit`: no message for that long.
    Idle,
    /// The reader of stdout went away (`| head`).
    OutputClosed,
    /// The output could not be written (disk full, ...).
    OutputFailed(String),
}

/// Shared by every task of a run.
#[derive(Debug, Default)]
pub struct Stopper {
    token: CancellationToken,
    reason: Mutex<Option<StopReason>>,
}

impl Stopper {
    /// A run that has not stopped.
    pub fn new() -> Arc<Self> {
        Arc::new(Stopper::default())
    }

    /// Stops the run for `reason` (unless it is already stopping).
    pub fn stop(&self, reason: StopReason) {
        let mut current = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if current.is_none() {
            tracing::debug!(?reason, "stopping");
            *current = Some(reason);
        }
        self.token.cancel();
    }

    /// The token every task watches.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Why the run stopped, if it did.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
