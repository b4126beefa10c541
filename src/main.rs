//! The `iot-sub` binary: parse arguments, set up logging to stderr, run, map to an exit status.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use iot_sub::cli::{Cli, Command, LogFormat};
use iot_sub::listen::{self, ListenError, ListenOptions};
use iot_sub::sink::writer::Writer;
use iot_sub::stop::Stopper;
use iot_sub::topic::TopicFilters;
use iot_sub::{config, exit, shutdown};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // fe2o3-amqp logs routine closes at ERROR; its real failures reach our own log lines
    // through our error types. Under `listen`, the demo's embedded emulator only warns.
    let quiet = match cli.command {
        Command::Listen(_) => "fe2o3_amqp=off,iot_sub::emulator=warn",
        #[cfg(feature = "emulator")]
        Command::Emulate(_) => "fe2o3_amqp=off",
        Command::Check(_) => "fe2o3_amqp=off,iot_sub::emulator=warn",
        Command::Completions(_) | Command::Man(_) => "fe2o3_amqp=off",
    };
    init_logging(&cli.log_level, cli.log_format, quiet);
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
    let stopper = Stopper::new();
    if let Err(e) = shutdown::install(stopper.clone()) {
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
            let options = ListenOptions {
                count: args.count,
                idle_exit: args.idle_exit,
                duration: args.duration,
                format: args.format,
                body: args.body,
                filters: TopicFilters {
                    include: args.topics,
                    exclude: args.exclude_topics,
                },
                dedup: (!args.no_dedup).then_some((args.dedup_size, args.dedup_age)),
                reorder: args.reorder_window,
                exec: args.exec,
                exec_each: args.exec_each.map(|c| (c, args.jobs, args.exec_timeout)),
                metrics_listen: args.metrics_listen,
            };
            let count_given = options.count.is_some();
            let grace = {
                let token = stopper.token();
                async move {
                    token.cancelled().await;
                    tokio::time::sleep(listen::SHUTDOWN_GRACE).await;
                }
            };
            let stdout = iot_sub::sink::stdout::StdoutWriter::open();
            tracing::debug!(mode = stdout.mode(), "writing lines to stdout");
            let stdout = Writer::Stdout(stdout);
            tokio::select! {
                result = listen::listen(profile, options, stdout, stopper.clone()) => match result {
                    Ok(reason) => exit::for_stop(&reason, count_given),
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
                    stopper.reason().map_or(exit::OK, |r| exit::for_stop(&r, count_given))
                }
            }
        }
        #[cfg(feature = "emulator")]
        Command::Emulate(args) => match iot_sub::emulate::run(args, stopper.token()).await {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("iot-sub: error: {e:#}");
                exit::FAILURE
            }
        },
        Command::Check(args) => iot_sub::check::run(args, stopper.token()).await,
        Command::Completions(args) => iot_sub::generate::run_completions(&args),
        Command::Man(args) => iot_sub::generate::run_man(&args),
    }
}

/// Event targets that can carry a credential, dropped whatever the log filter says:
/// fe2o3-amqp's client SASL negotiation traces every SASL frame it sends (`sending = Init {
/// .. initial_response: [0, ..] }`), and the PLAIN initial response is the username (with any
/// STS token) and the password. Its SASL profile and the acceptor's SASL side are dropped too.
const NEVER_LOGGED: [&str; 3] = [
    "fe2o3_amqp::connection::builder",
    "fe2o3_amqp::sasl_profile",
    "fe2o3_amqp::acceptor::sasl_acceptor",
];

/// Whether an event or span from `target` may be logged at all.
fn may_log(target: &str) -> bool {
    !NEVER_LOGGED.iter().any(|t| {
        target
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Logs go to stderr (stdout carries data only), without colour unless stderr is a terminal.
/// `RUST_LOG` wins over `--log-level`; `quiet` directives apply unless the filter names them.
/// [`NEVER_LOGGED`] targets are dropped by a second filter that no directive can override
/// (not even a span directive such as `[negotiate_sasl]=trace`).
fn init_logging(level: &str, format: LogFormat, quiet: &str) {
    use tracing_subscriber::filter::{filter_fn, FilterExt};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

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
    let filter = filter.and(filter_fn(|meta| may_log(meta.target())));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let logs = match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => logs.json().with_current_span(false).boxed(),
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .init();
}

#[cfg(test)]
mod tests {
    use super::may_log;

    #[test]
    fn sasl_targets_are_never_logged() {
        assert!(!may_log("fe2o3_amqp::connection::builder"));
        assert!(!may_log("fe2o3_amqp::sasl_profile::scram"));
        assert!(may_log("fe2o3_amqp::connection::builderx"));
        assert!(may_log("fe2o3_amqp::connection::engine"));
        assert!(may_log("iot_sub::supervisor"));
    }
}
