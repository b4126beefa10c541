//! SIGINT/SIGTERM → one cancellation token; a second signal exits at once.

use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use crate::stop::{StopReason, Stopper};

/// Stops the run on the first SIGINT or SIGTERM; exits the process on the second.
pub fn install(stopper: Arc<Stopper>) -> std::io::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        tracing::info!(
            "stopping: finishing the messages already written (a second signal exits at once)"
        );
        stopper.stop(StopReason::Signal);
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        tracing::warn!("second signal: exiting now; unaccepted messages will be redelivered");
        std::process::exit(i32::from(crate::exit::INTERRUPTED));
    });
    Ok(())
}
