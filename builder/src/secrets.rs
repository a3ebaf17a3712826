//! The secrets of a stage folder: `files:` entries of `type: secret` whose `path:` is an
//! age file encrypted to the stage's `recipients:` (the hosts' X25519 recipients, which
//! `op-dbus-stage identity` prints).
//!
//! ```text
//! images/stage-4-web/
//!   manifest.yaml              recipients: [age1...]; files: - path: secrets/api-token.age
//!                                                             target: /etc/web/api-token
//!                                                             type: secret
//!   secrets/api-token.age      binary age file: what `secret add` (or `age -r`) writes
//! ```
//!
//! `secret add` reads the plaintext from stdin or `--file`, never from an argument, and
//! writes only its ciphertext into the stage folder, which may then be committed; the
//! plaintext is never written anywhere. `build` checks that every secret is an age file
//! a host can decrypt, encrypted to at least as many X25519 recipients as the stage lists:
//! what is not age ciphertext (a plaintext put there by mistake) never reaches an image.
//! The builder holds no key that decrypts a secret, so a stage whose `recipients:` change
//! needs its secrets added again (with their plaintext) before it is built.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use formats::manifest::{FileSpec, FileType, StageDefinition};
use formats::path::RelPath;
use keys::secret::{MAX_SECRET, Recipient, Zeroizing};

use crate::assemble::{Node, Tree};
use crate::error::InputError;
use crate::fleet::Inventory;

/// The stage's recipients, parsed, each `@TAG` replaced by the recipients of the
/// inventory's hosts with that tag (without repeats).
fn recipients(def: &StageDefinition, manifest: &Path, inventory: Option<&Inventory>) -> Result<Vec<Recipient>> {
    let mut out: Vec<Recipient> = Vec::new();
    for (i, r) in def.recipients.iter().enumerate() {
        let field =
            |reason: String| InputError::Field { file: manifest.to_owned(), field: format!("recipients[{i}]"), reason };
        let texts = match (r.strip_prefix('@'), inventory) {
            (None, _) => vec![r.clone()],
            (Some(tag), Some(inv)) => inv.recipients_tagged(tag).with_context(|| format!("recipients[{i}] ({r})"))?,
            (Some(_), None) => {
                return Err(
                    field(format!("{r} names inventory hosts: give the inventory with --inventory FILE")).into()
                );
            }
        };
        for t in texts {
            let parsed: Recipient = t.parse().map_err(|e: keys::secret::SecretError| field(e.to_string()))?;
            if !out.contains(&parsed) {
                out.push(parsed);
            }
        }
    }
    Ok(out)
}

/// Why the bytes of the secret `f` cannot go into an image, if they cannot.
fn refusal(bytes: &[u8], f: &FileSpec, recipients: usize) -> Option<String> {
    match keys::secret::check_ciphertext(bytes) {
        Err(e) => Some(format!("{} {e}", f.path)),
        Ok(info) if info.x25519 < recipients => Some(format!(
            "{} is encrypted to {} recipient(s) but the stage lists {recipients}: encrypt it again \
             (`op-dbus-image secret add STAGE_DIR {}`)",
            f.path, info.x25519, f.path
        )),
        Ok(_) => None,
    }
}

/// Checks every secret of the assembled `tree` (see the module docs); `@TAG` recipients are
/// resolved in `inventory`.
pub fn check(tree: &Tree, manifest: &Path, def: &StageDefinition, inventory: Option<&Inventory>) -> Result<()> {
    if !def.files.iter().any(|f| f.kind == FileType::Secret) {
        return Ok(());
    }
    let recipients = recipients(def, manifest, inventory)?;
    for (i, f) in def.files.iter().enumerate().filter(|(_, f)| f.kind == FileType::Secret) {
        let field =
            |reason: String| InputError::Field { file: manifest.to_owned(), field: format!("files[{i}].path"), reason };
        let Some(Node::File { from, size, .. }) = tree.nodes.get(&f.path) else {
            return Err(field(format!("{} is not a regular file; a secret is an age file", f.path)).into());
        };
        if *size > MAX_SECRET {
            return Err(field(format!("{} is larger than {MAX_SECRET} bytes, too large for a secret", f.path)).into());
        }
        let bytes = read_bounded(from).map_err(|e| field(format!("{}: {e:#}", from.display())))?;
        if let Some(why) = refusal(&bytes, f, recipients.len()) {
            return Err(field(why).into());
        }
    }
    Ok(())
}

fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(path)?.take(MAX_SECRET + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_SECRET {
        bail!("larger than {MAX_SECRET} bytes, too large for a secret");
    }
    Ok(buf)
}

/// One secret of a stage folder (`secret list`).
#[derive(Debug, Serialize)]
pub struct Listed {
    pub path: String,
    pub target: String,
    /// The target's mode (declared, else 0600).
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Whether the encrypted file is in the stage folder.
    pub present: bool,
    /// The X25519 recipients it is encrypted to (when it is an age file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted_to: Option<usize>,
    /// Why `build` would refuse it; null when it would not.
    pub problem: Option<String>,
}

/// `secret list`: the secrets of the stage folder.
#[derive(Debug, Serialize)]
pub struct ListDoc {
    pub stage_dir: PathBuf,
    pub recipients: Vec<String>,
    pub secrets: Vec<Listed>,
}

/// `secret add` / `secret rm`.
#[derive(Debug, Serialize)]
pub struct Changed {
    /// The encrypted file written or deleted.
    pub file: PathBuf,
    pub path: String,
    /// The recipients it was encrypted to (`add`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    pub dry_run: bool,
}

fn read_definition(stage_dir: &Path) -> Result<(PathBuf, StageDefinition)> {
    let manifest = stage_dir.join("manifest.yaml");
    let def = StageDefinition::read(&manifest)?;
    Ok((manifest, def))
}

/// The `type: secret` entry whose path is `path`.
fn entry<'a>(def: &'a StageDefinition, manifest: &Path, path: &RelPath) -> Result<&'a FileSpec> {
    match def.files.iter().find(|f| &f.path == path) {
        Some(f) if f.kind == FileType::Secret => Ok(f),
        Some(f) => Err(crate::error::InputError::Path {
            path: manifest.to_owned(),
            reason: format!("{path} is a `type: {}` entry, not `type: secret`", f.kind.as_str()),
        }
        .into()),
        None => Err(crate::error::InputError::Path {
            path: manifest.to_owned(),
            reason: format!(
                "no `files:` entry has path {path}: add one with `type: secret` and its target first (see \
                 docs/building.md)"
            ),
        }
        .into()),
    }
}

/// Where the encrypted file of `path` lives: below the stage folder, reached through
/// directories only (a symlink on the way is refused). Missing directories are created
/// unless `dry_run`.
fn file_of(stage_dir: &Path, path: &RelPath, create: bool) -> Result<PathBuf> {
    let root = fsx::open_root(stage_dir).with_context(|| format!("opening {}", stage_dir.display()))?;
    let mut so_far = PathBuf::from(stage_dir);
    let comps: Vec<&str> = path.components().collect();
    let (dirs, _) = comps.split_at(comps.len().saturating_sub(1));
    for (i, d) in dirs.iter().enumerate() {
        so_far.push(d);
        if create && so_far.symlink_metadata().is_err() {
            std::fs::create_dir(&so_far).with_context(|| format!("creating {}", so_far.display()))?;
        }
        if let Err(e) = fsx::open_beneath(&root, dirs[..=i].iter().copied()) {
            if !create && matches!(e, fsx::BeneathError::Missing { .. }) {
                break;
            }
            bail!("{}: {e}", stage_dir.display());
        }
    }
    let file = stage_dir.join(path.as_str());
    if file.symlink_metadata().is_ok_and(|m| !m.is_file()) {
        bail!("{} is not a regular file; move it away first", file.display());
    }
    Ok(file)
}

/// Reads a secret's plaintext from `file`, or from stdin (at most [`MAX_SECRET`] bytes).
pub fn read_plaintext(file: Option<&Path>) -> Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    let (what, n) = match file {
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            (p.display().to_string(), f.take(MAX_SECRET + 1).read_to_end(&mut buf))
        }
        None => ("standard input".to_owned(), std::io::stdin().lock().take(MAX_SECRET + 1).read_to_end(&mut buf)),
    };
    n.with_context(|| format!("reading the secret from {what}"))?;
    if buf.len() as u64 > MAX_SECRET {
        bail!("the secret in {what} is larger than {MAX_SECRET} bytes");
    }
    if buf.is_empty() {
        return Err(crate::error::InputError::Path {
            path: PathBuf::from(what),
            reason: "the secret is empty: give its plaintext on stdin or with --file".into(),
        }
        .into());
    }
    Ok(buf)
}

/// `secret add`: encrypts `plaintext` to the stage's recipients into the file of `path`.
pub fn add(
    stage_dir: &Path,
    path: &RelPath,
    plaintext: &[u8],
    inventory: Option<&Inventory>,
    dry_run: bool,
) -> Result<Changed> {
    let (manifest, def) = read_definition(stage_dir)?;
    entry(&def, &manifest, path)?;
    let recipients = recipients(&def, &manifest, inventory)?;
    if recipients.is_empty() {
        return Err(InputError::Field {
            file: manifest,
            field: "recipients".into(),
            reason: "list the hosts' recipients (`op-dbus-stage identity` on each host) to encrypt to".into(),
        }
        .into());
    }
    let file = file_of(stage_dir, path, !dry_run)?;
    let ciphertext = keys::secret::encrypt(&recipients, plaintext)?;
    if !dry_run {
        let tmp =
            fsx::TempFile::write(&file, &ciphertext, 0o644).with_context(|| format!("writing {}", file.display()))?;
        tmp.replace(&file).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(Changed {
        file,
        path: path.to_string(),
        recipients: recipients.iter().map(ToString::to_string).collect(),
        dry_run,
    })
}

/// `secret rm`: deletes the encrypted file of `path` (the `files:` entry is the user's to
/// remove from manifest.yaml).
pub fn rm(stage_dir: &Path, path: &RelPath, dry_run: bool) -> Result<Changed> {
    let (manifest, def) = read_definition(stage_dir)?;
    entry(&def, &manifest, path)?;
    let file = file_of(stage_dir, path, false)?;
    if file.symlink_metadata().is_err() {
        bail!("{} does not exist: nothing to remove", file.display());
    }
    if !dry_run {
        std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        fsx::sync_dir(fsx::parent_dir(&file))
            .with_context(|| format!("syncing {}", fsx::parent_dir(&file).display()))?;
    }
    Ok(Changed { file, path: path.to_string(), recipients: Vec::new(), dry_run })
}

/// `secret list`.
pub fn list(stage_dir: &Path, inventory: Option<&Inventory>) -> Result<ListDoc> {
    let (manifest, def) = read_definition(stage_dir)?;
    let count = recipients(&def, &manifest, inventory)?.len();
    let mut secrets = Vec::new();
    for f in def.files.iter().filter(|f| f.kind == FileType::Secret) {
        let file = file_of(stage_dir, &f.path, false);
        let bytes = file.as_ref().ok().filter(|p| p.is_file()).map(|p| read_bounded(p));
        let (present, encrypted_to, problem) = match (&file, bytes) {
            (Err(e), _) => (false, None, Some(format!("{e:#}"))),
            (Ok(_), None) => (false, None, Some(format!("{} is missing: `op-dbus-image secret add`", f.path))),
            (Ok(_), Some(Err(e))) => (true, None, Some(format!("{e:#}"))),
            (Ok(_), Some(Ok(b))) => {
                (true, keys::secret::check_ciphertext(&b).ok().map(|i| i.x25519), refusal(&b, f, count))
            }
        };
        secrets.push(Listed {
            path: f.path.to_string(),
            target: f.target.to_string(),
            mode: f.secret_mode().to_string(),
            owner: f.owner.as_ref().map(ToString::to_string),
            group: f.group.as_ref().map(ToString::to_string),
            present,
            encrypted_to,
            problem,
        });
    }
    Ok(ListDoc { stage_dir: stage_dir.to_owned(), recipients: def.recipients.clone(), secrets })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keys::secret::HostIdentity;

    fn stage(recipients: &[Recipient]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let list: Vec<String> = recipients.iter().map(ToString::to_string).collect();
        std::fs::write(
            d.path().join("manifest.yaml"),
            format!(
                "version: 1.0.0\nrecipients: [{}]\nfiles:\n  - path: secrets/t.age\n    target: /etc/op-dbus/t\n    \
                 type: secret\n  - path: plain\n    target: /etc/op-dbus/plain\n",
                list.join(", ")
            ),
        )
        .unwrap();
        d
    }

    #[test]
    fn add_writes_ciphertext_only_and_list_rm_follow() {
        let (a, b) = (HostIdentity::generate(), HostIdentity::generate());
        let d = stage(&[a.recipient(), b.recipient()]);
        let p: RelPath = "secrets/t.age".parse().unwrap();
        let l = list(d.path(), None).unwrap();
        assert!(!l.secrets[0].present && l.secrets[0].problem.is_some());
        assert_eq!(l.secrets[0].mode, "0600");
        // A dry run writes nothing.
        add(d.path(), &p, b"hunter2-plaintext", None, true).unwrap();
        assert!(!d.path().join("secrets").exists());
        let c = add(d.path(), &p, b"hunter2-plaintext", None, false).unwrap();
        let written = std::fs::read(&c.file).unwrap();
        assert!(!written.windows(8).any(|w| w == b"hunter2-"));
        assert_eq!(&a.decrypt(&written).unwrap()[..], b"hunter2-plaintext");
        assert_eq!(&b.decrypt(&written).unwrap()[..], b"hunter2-plaintext");
        let l = list(d.path(), None).unwrap();
        assert_eq!((l.secrets[0].present, l.secrets[0].encrypted_to, &l.secrets[0].problem), (true, Some(2), &None));
        // Only entries of `type: secret`.
        let e = add(d.path(), &"plain".parse().unwrap(), b"x", None, false).unwrap_err();
        assert!(e.to_string().contains("not `type: secret`"), "{e}");
        let e = add(d.path(), &"nope".parse().unwrap(), b"x", None, false).unwrap_err();
        assert!(e.to_string().contains("no `files:` entry"), "{e}");
        rm(d.path(), &p, false).unwrap();
        assert!(!c.file.exists());
        assert!(rm(d.path(), &p, false).is_err());
    }

    #[test]
    fn recipients_by_inventory_tag() {
        let (a, b, c) = (HostIdentity::generate(), HostIdentity::generate(), HostIdentity::generate());
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("manifest.yaml"),
            format!(
                "version: 1.0.0\nrecipients: [\"@web\", {}]\nfiles:\n  - path: s.age\n    target: /etc/op-dbus/s\n    \
                 type: secret\n",
                c.recipient()
            ),
        )
        .unwrap();
        let inv_file = d.path().join("inventory.toml");
        let write_inv = |extra: &str| {
            std::fs::write(
                &inv_file,
                format!(
                    "[hosts.w1]\ntags = [\"web\"]\nrecipient = \"{}\"\n[hosts.w2]\ntags = [\"web\"]\nrecipient = \"{}\"\n\
                     [hosts.db]\ntags = [\"db\"]\n{extra}",
                    a.recipient(),
                    b.recipient()
                ),
            )
            .unwrap();
            Inventory::read(&inv_file)
        };
        let inv = write_inv("").unwrap();
        let p: RelPath = "s.age".parse().unwrap();
        let e = add(d.path(), &p, b"tagged", None, false).unwrap_err();
        assert!(format!("{e:#}").contains("--inventory"), "{e:#}");
        let r = add(d.path(), &p, b"tagged", Some(&inv), false).unwrap();
        assert_eq!(r.recipients.len(), 3);
        let ct = std::fs::read(d.path().join("s.age")).unwrap();
        for id in [&a, &b, &c] {
            assert_eq!(&id.decrypt(&ct).unwrap()[..], b"tagged");
        }
        assert_eq!(list(d.path(), Some(&inv)).unwrap().secrets[0].encrypted_to, Some(3));
        // A tagged host without a recipient, and a bad recipient, are refused.
        let untagged = "[hosts.w3]\ntags = [\"web\"]\n";
        let e = add(d.path(), &p, b"x", Some(&write_inv(untagged).unwrap()), false).unwrap_err();
        assert!(format!("{e:#}").contains("no `recipient`"), "{e:#}");
        assert!(write_inv("[hosts.x]\nrecipient = \"age1nope\"\n").is_err());
    }

    #[test]
    fn a_symlink_on_the_way_is_refused() {
        let a = HostIdentity::generate();
        let d = stage(&[a.recipient()]);
        let out = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(out.path(), d.path().join("secrets")).unwrap();
        let e = add(d.path(), &"secrets/t.age".parse().unwrap(), b"x", None, false).unwrap_err();
        assert!(format!("{e:#}").contains("not a directory"), "{e:#}");
        assert!(std::fs::read_dir(out.path()).unwrap().next().is_none());
    }

    #[test]
    fn build_refuses_plaintext_and_too_few_recipients() {
        let (a, b) = (HostIdentity::generate(), HostIdentity::generate());
        let d = stage(&[a.recipient(), b.recipient()]);
        std::fs::write(d.path().join("plain"), "x").unwrap();
        std::fs::create_dir(d.path().join("secrets")).unwrap();
        let manifest = d.path().join("manifest.yaml");
        let def = StageDefinition::read(&manifest).unwrap();
        let tree_with = |bytes: &[u8]| {
            std::fs::write(d.path().join("secrets/t.age"), bytes).unwrap();
            let tree = crate::assemble::stage_tree(d.path(), &manifest, &def)?;
            check(&tree, &manifest, &def, None).map(|()| tree)
        };
        let e = tree_with(b"API_TOKEN=plaintext\n").unwrap_err().to_string();
        assert!(e.contains("files[0].path") && e.contains("not an age file"), "{e}");
        let one = keys::secret::encrypt(&[a.recipient()], b"x").unwrap();
        let e = tree_with(&one).unwrap_err().to_string();
        assert!(e.contains("encrypted to 1 recipient(s) but the stage lists 2"), "{e}");
        let both = keys::secret::encrypt(&[a.recipient(), b.recipient()], b"x").unwrap();
        let t = tree_with(&both).unwrap();
        // The ciphertext is staged with the target's mode (0600 unless declared).
        assert_eq!(t.nodes[&"secrets/t.age".parse::<RelPath>().unwrap()].mode().bits(), 0o600);
    }
}
