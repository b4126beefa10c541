//! The `iot-sub` binary: parse arguments, set up logging to stderr, run, map to an exit status.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use iot_sub::cli::{Cli, Command};
use iot_sub::listen::{self, ListenError, ListenOptions, Outcome};
use iot_sub::output::Output;
use iot_sub::{config, exit, shutdown};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // fe2o3-amqp logs routine closes at ERROR; its real failures reach our own log lines
    // through our error types. Under `listen`, the demo's embedded emulator only warns.
    let quiet = match cli.command {
        Command::Listen(_) => "fe2o3_amqp=off,iot_sub::emulator=warn",
        #[cfg(feature = "emulator")]
        Command::Emulate(_) => "fe2o3_amqp=off",
    };
    init_logging(&cli.log_level, quiet);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("iot-sub: error: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    ExitCode::from(runtime.block_on(run(cli)))
}

async fn run(cli: Cli) -> u8 {
    let token = CancellationToken::new();
    if let Err(e) = shutdown::install(token.clone()) {
        eprintln!("iot-sub: error: cannot install signal handlers: {e}");
        return exit::FAILURE;
    }
    match cli.command {
        Command::Listen(args) => {
            let profile = match config::load(args.config.as_deref(), &args.profile) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("iot-sub: {e}");
                    return exit::CONFIG;
                }
            };
            let output = Arc::new(Output::stdout());
            let options = ListenOptions { count: args.count };
            let grace = {
                let token = token.clone();
                async move {
                    token.cancelled().await;
                    tokio::time::sleep(listen::SHUTDOWN_GRACE).await;
                }
            };
            tokio::select! {
                result = listen::listen(profile, options, output, token.clone()) => match result {
                    Ok(Outcome::Done(_)) | Ok(Outcome::OutputClosed) => exit::OK,
                    Err(ListenError::Config(e)) => {
                        eprintln!("iot-sub: {e}");
                        exit::CONFIG
                    }
                    Err(ListenError::Other(e)) => {
                        eprintln!("iot-sub: error: {e:#}");
                        exit::FAILURE
                    }
                },
                _ = grace => {
                    tracing::warn!("stop took longer than {:?}; exiting; unaccepted messages will be redelivered", listen::SHUTDOWN_GRACE);
                    exit::OK
                }
            }
        }
        #[cfg(feature = "emulator")]
        Command::Emulate(args) => match iot_sub::emulate::run(*args, token).await {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("iot-sub: error: {e:#}");
                exit::FAILURE
            }
        },
    }
}

/// Logs go to stderr (stdout carries data only), without colour unless stderr is a terminal.
/// `RUST_LOG` wins over `--log-level`; `quiet` directives apply unless the filter names them.
fn init_logging(level: &str, quiet: &str) {
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let mut directives = wanted.clone();
    for d in quiet.split(',') {
        let target = d.split('=').next().unwrap_or_default();
        if !wanted.contains(target) {
            directives.push(',');
            directives.push_str(d);
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("iot-sub: warning: log filter `{wanted}` is not valid ({e}); using `info`");
        tracing_subscriber::EnvFilter::new(format!("info,{quiet}"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
