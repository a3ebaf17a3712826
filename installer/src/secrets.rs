//! `type: secret` files on the host: the generation keeps the age ciphertext the image
//! carried; activation decrypts it with the host identity ([`crate::identity`]) into the
//! target (mode 0600 unless declared, the declared owner), and nothing else on the host
//! holds the plaintext: not the image store, the generations, `state.json`, snapshots,
//! the journal (a secret on its way out is removed, and put back by decrypting again,
//! never stashed), `backups/` or the history.
//!
//! Deploy decrypts every secret of the unpacked images before it changes anything: a
//! secret this host is not a recipient of refuses the deploy (exit 3), naming it and the
//! host's recipient. `verify` checks each secret's target and that its ciphertext still
//! decrypts ([`verify_stage`]).

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

use formats::manifest::{FileType, StageConfig};
use keys::secret::{HostIdentity, MAX_SECRET, SecretError, Zeroizing};

use crate::error::{Malformed, Untrusted};
use crate::host::{Host, TargetState};
use crate::state::{Placement, StageState, State};

/// Reads the age file `path` (at most [`MAX_SECRET`] bytes), not through a symlink.
fn read_ciphertext(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut buf = Vec::new();
    f.take(MAX_SECRET + 1).read_to_end(&mut buf).with_context(|| format!("reading {}", path.display()))?;
    if buf.len() as u64 > MAX_SECRET {
        return Err(
            Malformed(format!("{} is larger than {MAX_SECRET} bytes, too large for a secret", path.display())).into()
        );
    }
    Ok(buf)
}

/// The plaintext of the staged age file `path`, with `id`. `what` names it in errors; a
/// host that is not among its recipients is exit 3, a damaged file exit 7.
fn decrypt_file(id: &HostIdentity, path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>> {
    let ct = read_ciphertext(path)?;
    id.decrypt(&ct).map_err(|e| match e {
        SecretError::NotARecipient { recipient } => Untrusted(format!(
            "{what} is not encrypted to this host's recipient {recipient}: add it to the stage's `recipients:`, \
             encrypt the secret again (`op-dbus-image secret add`) and build a new version"
        ))
        .into(),
        e => anyhow::Error::from(Malformed(format!("{what}: {e}"))),
    })
}

/// The plaintext of the staged age file `path`, decrypted with the host identity.
pub fn decrypt_staged(host: &Host, path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let id = crate::identity::load(host)?;
    decrypt_file(&id, path, &format!("the secret {}", path.display()))
}

/// Before a deploy changes anything: every secret of `config`, unpacked in `dir`, decrypts
/// with the host identity (exit 3 naming the first that does not).
pub fn check_unpacked(host: &Host, dir: &Path, config: &StageConfig) -> Result<()> {
    let mut secrets = config.files.iter().filter(|f| f.kind == FileType::Secret).peekable();
    if secrets.peek().is_none() {
        return Ok(());
    }
    let id = crate::identity::load(host)?;
    for f in secrets {
        let what = format!("{}: the secret {} (for {})", config.name, f.path, f.target);
        decrypt_file(&id, &dir.join(f.path.as_str()), &what)?;
    }
    Ok(())
}

/// What `verify` found wrong with the secrets of one stage.
#[derive(Debug, Default)]
pub struct SecretProblems {
    /// One line per problem.
    pub problems: Vec<String>,
    /// The secrets this host is not a recipient of (`verify` exits 3 for these).
    pub not_for_this_host: Vec<String>,
}

/// Checks every secret of the active generation of `name`: its target is a regular file
/// with the mode and owner the manifest says, holding what the generation's ciphertext
/// decrypts to with the host identity.
pub fn verify_stage(
    host: &Host,
    gen_dir: &Path,
    name: &formats::StageName,
    s: &StageState,
    state: &State,
) -> SecretProblems {
    let mut out = SecretProblems::default();
    let secrets: Vec<_> = s.active.activation.files.iter().filter(|f| f.kind == FileType::Secret).collect();
    if secrets.is_empty() {
        return out;
    }
    let id = match crate::identity::load(host) {
        Ok(id) => id,
        Err(e) => {
            out.problems.push(format!("the host identity cannot be read: {e:#}"));
            return out;
        }
    };
    for f in secrets {
        let target = &f.target;
        let placed =
            state.placed.get(target).is_some_and(|p| &p.stage == name && matches!(p.how, Placement::Secret { .. }));
        if !placed {
            out.problems.push(format!("{target}: the secret {} is not placed there", f.path));
            continue;
        }
        let staged = gen_dir.join(f.path.as_str());
        let what = format!("{name}: the secret {} (for {target})", f.path);
        let plain = match decrypt_file(&id, &staged, &what) {
            Ok(p) => p,
            Err(e) => {
                if e.downcast_ref::<Untrusted>().is_some() {
                    out.not_for_this_host.push(format!("{name}: {}", f.path));
                }
                out.problems.push(format!("{e:#}"));
                continue;
            }
        };
        match host.state(target) {
            Ok(TargetState::File) => {}
            Ok(other) => {
                out.problems.push(format!("{target}: expected the secret {}, found {other}", f.path));
                continue;
            }
            Err(e) => {
                out.problems.push(format!("{target}: {e}"));
                continue;
            }
        }
        match host.read_file(target, MAX_SECRET).map(|h| h.flatten().map(Zeroizing::new)) {
            Ok(Some(held)) if held[..] == plain[..] => {}
            Ok(_) => out.problems.push(format!(
                "{target}: differs from the secret {} (changed by hand? `op-dbus-stage rollback` and deploy again, \
                 or remove and deploy the stage, to put it back)",
                f.path
            )),
            Err(e) => out.problems.push(format!("{target}: {e}")),
        }
        match host.resolve(target.relative().as_str()).and_then(std::fs::symlink_metadata) {
            Ok(meta) => {
                use std::os::unix::fs::MetadataExt;
                let mode = meta.mode() & 0o7777;
                if mode != f.mode {
                    out.problems.push(format!(
                        "{target}: mode {mode:04o}, the manifest says {:04o} (`chmod {:04o} {target}`)",
                        f.mode, f.mode
                    ));
                }
            }
            Err(e) => out.problems.push(format!("{target}: {e}")),
        }
        out.problems.extend(crate::users::copy_owner_problem(host, target, &staged));
    }
    out
}
