//! Exit codes (docs/exit-codes.md) and the errors of stage input.

use std::path::PathBuf;

pub const OK: i32 = 0;
pub const OTHER: i32 = 1;
pub const USAGE: i32 = 2;
pub const TRUST: i32 = 3;
pub const POLICY: i32 = 4;
pub const MALFORMED: i32 = 7;

/// A stage folder or listed file that cannot become an image (exit 7).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{file}: field `{field}`: {reason}")]
    Field { file: PathBuf, field: String, reason: String },
    #[error("{path}: {reason}")]
    Path { path: PathBuf, reason: String },
}

/// The exit code for an error: the one map of both binaries (`cli_support::exit`), with
/// the builder's own [`InputError`] (exit 7).
pub fn exit_code(err: &anyhow::Error) -> i32 {
    classify(err).code()
}

/// The classification of an error (see [`exit_code`]).
pub fn classify(err: &anyhow::Error) -> cli_support::ExitCode {
    cli_support::classify_with(err, &|c| {
        if let Some(f) = c.downcast_ref::<crate::fleet::FleetFailed>() {
            return Some(f.code);
        }
        (c.is::<InputError>() || c.is::<formats::unpack::check::CheckError>())
            .then_some(cli_support::ExitCode::Malformed)
    })
}
