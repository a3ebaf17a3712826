//! The command-line plumbing `op-dbus-image` and `op-dbus-stage` share: the global flags,
//! logging set-up, output (text or one JSON document), the one exit-code map ([`exit`]),
//! error reports (a JSON document too under `--json`), progress bars, confirmation
//! prompts, and man pages and shell completions generated from the clap definitions.
//!
//! ```no_run
//! use clap::Parser;
//! #[derive(Debug, Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     global: cli_support::GlobalArgs,
//! }
//! let cli = Cli::parse();
//! cli_support::init_logging(&cli.global);
//! let out = cli_support::Output::new(&cli.global);
//! out.emit(&serde_json::json!({"ok": true}), |_| "ok\n".into()).unwrap();
//! ```

pub mod docs;
pub mod exit;
pub mod output;
pub mod progress;
pub mod prompt;

pub use exit::{ExitCode, classify, classify_with};
pub use output::{Output, human_bytes, table};

use std::io::Write;

use clap::Args;
use serde::Serialize;

/// Flags common to both binaries, accepted before or after the subcommand.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Print one JSON document on stdout instead of text (errors too); see docs/json.md.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print the plan and change nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// More log output on stderr: -v what is done, -vv why (RUST_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors: no text output, warnings or progress bars (--json still prints its document).
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// Logs to stderr: warnings by default, `-v` info, `-vv` debug, `-q` errors only;
/// `RUST_LOG` overrides.
pub fn init_logging(g: &GlobalArgs) {
    let level = match (g.quiet, g.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // With -v every operation says when it starts and, with its time, when it ends.
    let spans = if g.verbose > 0 {
        tracing_subscriber::fmt::format::FmtSpan::NEW | tracing_subscriber::fmt::format::FmtSpan::CLOSE
    } else {
        tracing_subscriber::fmt::format::FmtSpan::NONE
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(spans)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Parses the command line; on `--help`/`--version` or a usage error, prints it and
/// returns the exit code instead.
pub fn parse<C: clap::Parser>() -> Result<C, i32> {
    C::try_parse().map_err(|e| {
        let code = if e.use_stderr() { ExitCode::Usage } else { ExitCode::Ok };
        // A closed stdout for --help is a clean end too.
        let _ = e.print();
        code.code()
    })
}

/// The `{"error": {...}}` document printed on stdout under `--json` when a command fails.
#[derive(Debug, Serialize)]
pub struct ErrorDocument {
    pub error: ErrorBody,
}

/// The body of an [`ErrorDocument`].
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The exit code's stable name: `other`, `usage`, `trust`, `policy`, `verify-failed`,
    /// `locked`, `malformed`.
    pub code: ExitCode,
    /// The process exit status (the same with and without `--json`).
    pub exit_code: i32,
    /// The whole error, outermost context first, as printed on stderr.
    pub message: String,
    /// Each cause of the chain on its own, outermost first.
    pub causes: Vec<String>,
    /// What to do about it, when there is a general remedy (a full disk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Reports a failed command on stderr (and as a JSON document on stdout under `--json`),
/// returning its exit code. A closed stdout is a clean end: nothing printed, exit 0.
///
/// `code` is the binary's classification (see [`classify_with`]); `disk_full_hint` is the
/// remedy printed when the filesystem is full; `rewrite` adjusts messages (the installer
/// adds `--root` to the commands its hints name).
pub fn report_error(
    program: &str,
    json: bool,
    err: &anyhow::Error,
    code: ExitCode,
    disk_full_hint: &str,
    rewrite: &dyn Fn(String) -> String,
) -> i32 {
    if exit::is_stdout_closed(err) {
        return ExitCode::Ok.code();
    }
    let message = rewrite(format!("{err:#}"));
    let hint = exit::is_disk_full(err).then(|| disk_full_hint.to_owned());
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{program}: error: {message}");
    if let Some(h) = &hint {
        let _ = writeln!(stderr, "{program}: {h}");
    }
    if json {
        let doc = ErrorDocument {
            error: ErrorBody {
                code,
                exit_code: code.code(),
                message,
                causes: err.chain().map(|c| rewrite(c.to_string())).collect(),
                hint,
            },
        };
        let mut out = std::io::stdout().lock();
        if serde_json::to_writer_pretty(&mut out, &doc).is_ok() {
            let _ = writeln!(out);
        }
    }
    code.code()
}
