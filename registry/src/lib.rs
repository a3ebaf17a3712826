//! A small blocking client of OCI registries (the Distribution API) for op-dbus stage
//! images, shared by the builder (`op-dbus-image push`/`pull`) and the installer
//! (`op-dbus-stage deploy HOST/REPO:TAG`). No async runtime: `ureq` with rustls.
//!
//! - Plain HTTP only to loopback hosts (127.0.0.0/8, ::1, `localhost`) or with
//!   `insecure`; otherwise HTTPS verified against the system's roots, or `--ca FILE`.
//! - Basic and bearer-token authentication from the registry's `WWW-Authenticate`
//!   challenge; credentials from the command line or a containers auth file.
//! - Transient failures (connection errors, 5xx, 429) retried with bounded backoff; an
//!   interrupted blob download resumed with a ranged GET.
//! - Everything fetched is bounded and hashed as it streams into an OCI layout
//!   ([`formats::layout::BlobWriter::finish_expecting`]); a blob that does not match its
//!   digest is refused and discarded.
//!
//! ```no_run
//! use registry::{Access, Client, ClientOptions, RegistryRef, transfer};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let src: RegistryRef = "127.0.0.1:5000/op-dbus/core:1.0.0".parse()?;
//! let client = Client::new(&src.host, ClientOptions::default(), Access::Pull)?;
//! let layout = formats::layout::Layout::open_or_create(std::path::Path::new("store"))?;
//! let head = transfer::fetch_head(&client, &src, &layout)?;   // manifest, config, signatures
//! // ... verify the signatures here, before any payload byte ...
//! transfer::fetch_layers(&client, &src, &head.manifest.layers, &layout, |_| false)?;
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod auth;
pub mod client;
pub mod error;
pub mod reference;
pub mod transfer;

pub use auth::Credentials;
pub use client::{Access, Client, ClientOptions, Limits, RetryPolicy};
pub use error::RegistryError;
pub use reference::RegistryRef;
