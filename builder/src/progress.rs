//! Progress bars on stderr, only when stderr is a terminal and output is not quiet (the
//! shared ones of `cli_support::progress`).

pub use cli_support::progress::{bytes, spinner};
