//! The host's age identity, `/etc/op-dbus/host.age`: the X25519 key that decrypts the
//! `type: secret` files of the stages deployed here (see `keys::secret`).
//!
//! ```text
//! /etc/op-dbus/host.age    # public key: age1...     root:root, mode 0600, made by `init`
//!                          AGE-SECRET-KEY-1...       `age -d -i /etc/op-dbus/host.age` reads it
//! ```
//!
//! `init` creates it when it is missing (never replaces one); `identity` prints its
//! recipient, which goes into the `recipients:` of the stages this host may decrypt.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use keys::secret::{HostIdentity, MAX_IDENTITY_FILE};

use crate::error::Untrusted;
use crate::host::{ETC, Host};

/// The identity file, relative to the root.
pub const IDENTITY: &str = "etc/op-dbus/host.age";

/// Creates the identity file when it is missing (mode 0600, owned by root when run as
/// root). Returns its path and whether it was created.
pub fn create_if_missing(host: &Host) -> Result<(PathBuf, bool)> {
    let etc = host.ensure_dir(ETC).with_context(|| format!("creating {ETC} under the root"))?;
    let path = etc.join("host.age");
    if path.symlink_metadata().is_ok() {
        return Ok((path, false));
    }
    let id = HostIdentity::generate();
    let tmp = fsx::TempFile::write(&path, id.to_file_text().as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))?;
    // Linked to its name, not renamed: an identity that appeared meanwhile is never replaced.
    tmp.link_new(&path).with_context(|| format!("creating {}", path.display()))?;
    if rustix::process::geteuid().is_root() {
        rustix::fs::chown(&path, Some(rustix::fs::Uid::ROOT), Some(rustix::fs::Gid::ROOT))
            .with_context(|| format!("making root the owner of {}", path.display()))?;
    }
    Ok((path, true))
}

/// Reads the host identity. A missing one says to run `init`; one that group or others may
/// read is refused (exit 3), as a private key is.
pub fn load(host: &Host) -> Result<HostIdentity> {
    let shown = format!("{}/{IDENTITY}", host.root.display());
    let path = match host.resolve(IDENTITY) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("this host has no age identity ({shown}): run `op-dbus-stage init` to create one")
        }
        Err(e) => return Err(e).with_context(|| format!("opening {shown}")),
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(&path)
        .with_context(|| format!("opening {shown}"))?;
    let meta = f.metadata().with_context(|| format!("reading {shown}"))?;
    if !meta.is_file() {
        bail!("{shown} is not a regular file: it must be the host's age identity file");
    }
    if meta.mode() & 0o077 != 0 {
        return Err(Untrusted(format!(
            "refusing to use the host identity {shown}: its mode {:04o} lets group or others read it; run `chmod 600 \
             {shown}`",
            meta.mode() & 0o7777
        ))
        .into());
    }
    let mut text = Vec::with_capacity(256);
    f.take(MAX_IDENTITY_FILE + 1).read_to_end(&mut text).with_context(|| format!("reading {shown}"))?;
    let id = HostIdentity::parse(&text).with_context(|| format!("reading the host identity {shown}"));
    text.iter_mut().for_each(|b| *b = 0);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_creates_it_once_and_load_refuses_a_readable_one() {
        let d = tempfile::tempdir().unwrap();
        let host = Host::open(d.path()).unwrap();
        assert!(load(&host).unwrap_err().to_string().contains("op-dbus-stage init"));
        let (path, made) = create_if_missing(&host).unwrap();
        assert!(made);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o600);
        let id = load(&host).unwrap();
        let (_, again) = create_if_missing(&host).unwrap();
        assert!(!again);
        assert_eq!(load(&host).unwrap().recipient(), id.recipient());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load(&host).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), crate::error::TRUST, "{e:#}");
    }
}
