//! Exit codes (docs/exit-codes.md): the one map of both binaries lives in `cli_support::exit`;
//! the error types the installer raises are its.

pub use cli_support::exit::{Cancelled, Locked, Malformed, NotFound, Refused, Untrusted, Usage, VerifyFailed};

pub const OK: i32 = 0;
pub const OTHER: i32 = 1;
pub const USAGE: i32 = 2;
pub const TRUST: i32 = 3;
pub const POLICY: i32 = 4;
pub const VERIFY_FAILED: i32 = 5;
pub const LOCKED: i32 = 6;
pub const MALFORMED: i32 = 7;

/// The exit code of an error (see `cli_support::exit::classify`).
pub fn exit_code(err: &anyhow::Error) -> i32 {
    cli_support::classify(err).code()
}
