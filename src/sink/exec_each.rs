//! `--exec-each CMD`: one `sh -c CMD` per message, the body on stdin and the metadata in
//! environment variables; the message is accepted when the command exits 0.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// The metadata a command gets, as `IOT_SUB_*` environment variables.
#[derive(Debug, Clone)]
pub struct ExecFields {
    /// IOT_SUB_TOPIC.
    pub topic: String,
    /// IOT_SUB_MESSAGE_ID (empty when the message has none).
    pub message_id: Option<String>,
    /// IOT_SUB_GENERATE_TIME (ms, empty when absent).
    pub generate_time: Option<i64>,
    /// IOT_SUB_PRODUCT_KEY (empty when the topic names none).
    pub product_key: Option<String>,
    /// IOT_SUB_DEVICE_NAME (empty when the topic names none).
    pub device_name: Option<String>,
}

/// Runs `command` for one message. `Ok` when it exits 0; otherwise why not.
pub async fn run(
    command: Arc<str>,
    fields: &ExecFields,
    body: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&*command)
        .env("IOT_SUB_TOPIC", &fields.topic)
        .env(
            "IOT_SUB_MESSAGE_ID",
            fields.message_id.as_deref().unwrap_or(""),
        )
        .env(
            "IOT_SUB_GENERATE_TIME",
            fields
                .generate_time
                .map(|t| t.to_string())
                .unwrap_or_default(),
        )
        .env(
            "IOT_SUB_PRODUCT_KEY",
            fields.product_key.as_deref().unwrap_or(""),
        )
        .env(
            "IOT_SUB_DEVICE_NAME",
            fields.device_name.as_deref().unwrap_or(""),
        )
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A command that does not read its input is fine: ignore EPIPE.
            let _ = stdin.write_all(body).await;
        }
        child.wait().await
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("exited with {status}")),
        Ok(Err(e)) => Err(format!("wait failed: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!("did not finish within {timeout:?}; killed"))
        }
    }
}
