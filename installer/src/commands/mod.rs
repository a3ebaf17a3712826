//! One module per command, as uv has them. A changing command reads what it needs, plans
//! (pure functions: [`crate::admit`], [`crate::plan`]), then applies that plan through
//! `crate::ops::execute` as one journaled transaction; `--dry-run` reports the same plan
//! and changes nothing.

pub mod backup;
pub mod deploy;
pub mod feature;
pub mod fix_symlinks;
pub mod gc;
pub mod init;
pub mod inspect;
pub mod plugin;
pub mod remove;
pub mod repair;
pub mod restore;
pub mod rollback;
pub mod trust;
#[cfg(feature = "registry")]
pub mod update;
pub mod with_deps;
