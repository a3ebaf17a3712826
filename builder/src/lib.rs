//! `op-dbus-image`, the builder: runs a stage's build steps, assembles its files, embeds
//! the stage manifest, signs the image with ed25519, stores it in an OCI layout and
//! exports images as one `.oci.tar` for air-gapped hosts.
//!
//! ```text
//! op-dbus-image key generate --out signing.key
//! op-dbus-image --store ./store --key signing.key build images/stage-1-core-dbus
//! op-dbus-image --store ./store export stage-1-core-dbus:1.0.0 --out stage-1.oci.tar
//! ```

pub mod assemble;
pub mod btrfs;
pub mod build;
pub mod channel;
pub mod check;
pub mod cli;
pub mod deps;
pub mod error;
pub mod export;
pub mod fleet;
pub mod hide;
pub mod inspect;
pub mod listed;
pub mod patches;
pub mod progress;
pub mod registry_cmd;
pub mod secrets;
pub mod sign;
mod walk;
