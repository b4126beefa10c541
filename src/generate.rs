//! `iot-sub completions` and `iot-sub man`: shell completion scripts and man pages, generated
//! from the command-line definition in [`crate::cli`].

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs, ManArgs};
use crate::exit;

/// The binary's name, as completions and man pages call it.
const BIN: &str = "iot-sub";

/// `iot-sub completions SHELL`: the script on stdout; returns the exit status.
pub fn run_completions(args: &CompletionsArgs) -> u8 {
    status(completions(args.shell, &mut std::io::stdout().lock()))
}

/// `iot-sub man [--out-dir DIR]`: the page on stdout, or every page into DIR.
pub fn run_man(args: &ManArgs) -> u8 {
    status(match &args.out_dir {
        Some(dir) => man_pages(dir),
        None => man(&mut std::io::stdout().lock()),
    })
}

fn status(result: std::io::Result<()>) -> u8 {
    match result {
        Ok(()) => exit::OK,
        // The reader went away (`| head`).
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
        Err(e) => {
            eprintln!("iot-sub: error: {e}");
            exit::FAILURE
        }
    }
}

/// Writes the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) -> std::io::Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, BIN, out);
    out.flush()
}

/// Writes the man page of the whole command (`iot-sub(1)`, listing the subcommands) in roff.
pub fn man(out: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out)?;
    out.flush()
}

/// Writes `iot-sub.1` and `iot-sub-COMMAND.1` for every command into `dir`.
pub fn man_pages(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_commands() {
        use clap::ValueEnum;
        for shell in clap_complete::Shell::value_variants() {
            let mut out = Vec::new();
            completions(*shell, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("listen") && text.contains("check"), "{shell}");
        }
    }

    #[test]
    fn man_pages_are_roff() {
        let mut out = Vec::new();
        man(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(".ie") || text.starts_with(".TH"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        man_pages(dir.path()).unwrap();
        assert!(dir.path().join("iot-sub.1").exists());
        assert!(dir.path().join("iot-sub-listen.1").exists());
        assert!(dir.path().join("iot-sub-check.1").exists());
    }
}
