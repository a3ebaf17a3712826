//! `op-dbus-stage`, the installer: verifies signatures against the host's trust store,
//! receives images, unpacks them into generations, activates them by symlinking staged
//! files to their targets, runs the stage's verify commands and rolls back on failure or
//! on request. Every change is a journaled transaction under one lock (see [`txn`]).
//!
//! ```text
//! op-dbus-stage --root /srv/scratch init
//! op-dbus-stage --root /srv/scratch trust add signing.key.pub
//! op-dbus-stage --root /srv/scratch deploy stages.oci.tar
//! op-dbus-stage --root /srv/scratch rollback stage-1-core-dbus
//! ```

pub mod admit;
pub mod backup;
pub mod btrfs;
pub mod checks;
pub mod cli;
pub mod commands;
pub mod confirm;
pub mod error;
pub mod faults;
pub mod history;
pub mod host;
pub mod host_parent;
pub mod hostfs;
pub mod identity;
pub mod lock;
pub mod names;
pub mod ops;
pub mod plan;
pub mod plugins;
pub mod progress;
pub mod receive;
pub mod retention;
pub mod sandbox;
pub mod secrets;
pub mod services;
pub mod snapshot;
pub mod state;
pub mod stream;
pub mod tar_stage;
pub mod txn;
pub mod users;
