//! Checking a tar layer as the installer unpacks it, without writing a tree: the builder
//! runs it over the layer it writes, as the bytes are produced, before anything is signed.
//!
//! The entries go through the unpacker's own parser and checks (`read_entries`,
//! `check_entry`, `whiteout_target`); what the unpacker does on disk (open the parent
//! directory beneath `dest`, clear what a lower layer left, white out, write, compare the
//! tree with the manifest) is done here on a model of the tree: the entries of the tree
//! below (the parent's signed entries), changed entry by entry.
//!
//! Not checked here: whether a patch applies to the parent's file (its header, length and
//! the parent file's size are; the builder hashed the file the patch makes as it made it),
//! and the image-wide budgets count this layer plus the parent's final tree, a lower
//! bound of what the parent's layers applied.

use std::collections::BTreeMap;
use std::io::{self, Read};

use super::{
    Budget, CHUNK, Checked, Extensions, Fail, Forward, LayerState, MAX_TRAILING, Rules, Step, UnpackError, check_entry,
    read_entries,
};
use crate::digest::{Digest, Hasher};
use crate::manifest::{Entry, EntryKind, Mode, StageConfig};
use crate::path::RelPath;

/// Why a layer was refused: the installer would refuse it for this reason.
#[derive(Debug, thiserror::Error)]
#[error("{}{reason}", entry.as_ref().map(|e| format!("entry {e:?}: ")).unwrap_or_default())]
pub struct CheckError {
    /// The entry refused, when one is.
    pub entry: Option<String>,
    pub reason: String,
}

impl CheckError {
    fn of(e: UnpackError) -> CheckError {
        match e {
            UnpackError::Unsafe { entry, reason, .. } => CheckError { entry: Some(entry), reason },
            UnpackError::Mismatch { path, reason } => {
                CheckError { entry: Some(path), reason: format!("{reason}; it differs from the manifest") }
            }
            UnpackError::Corrupt { reason, .. } => CheckError { entry: None, reason },
            other => CheckError { entry: None, reason: other.to_string() },
        }
    }

    fn fail(f: Fail) -> CheckError {
        match f {
            Fail::Read(e) => CheckError { entry: None, reason: format!("not a readable tar stream: {e}") },
            Fail::Content(e) | Fail::Disk(e) => CheckError::of(e),
        }
    }

    fn at(path: &str, reason: String) -> CheckError {
        CheckError { entry: Some(path.to_owned()), reason }
    }
}

/// A path of the modelled tree.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: EntryKind,
    mode: Mode,
    size: Option<u64>,
    sha256: Option<Digest>,
    link: Option<String>,
}

impl Node {
    fn of(e: &Entry) -> Node {
        Node { kind: e.kind, mode: e.mode, size: e.size, sha256: e.sha256, link: e.link.clone() }
    }

    /// Whether this is what `e` says (`Node::of(e) == *self`, without the copy).
    fn is(&self, e: &Entry) -> bool {
        self.kind == e.kind
            && self.mode == e.mode
            && self.size == e.size
            && self.sha256 == e.sha256
            && self.link == e.link
    }
}

/// What a checked layer held.
#[derive(Debug, Clone, Default)]
pub struct LayerSummary {
    /// Files carried as patches.
    pub patches: u64,
    /// Entries, whiteouts included.
    pub entries: u64,
}

/// Checks the top layer of an image (the only one for a full image) as the installer
/// unpacks it; see the module's documentation.
pub struct LayerCheck {
    config: StageConfig,
    budget: Budget,
    layers: usize,
    state: LayerState,
    /// The tree: what the layers below make, then changed by this layer's entries.
    tree: BTreeMap<String, Node>,
    /// The parent's entries and content bytes, counted as the layers below applied them.
    below_entries: u64,
    below_bytes: u64,
    entries: u64,
    bytes: u64,
    out: LayerSummary,
}

impl std::fmt::Debug for LayerCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerCheck").field("stage", &self.config.name).field("entries", &self.entries).finish()
    }
}

impl LayerCheck {
    /// Checks a layer against `config`, the manifest to be signed (a file's sha256 may be
    /// missing: [`LayerCheck::finish`] fills it in as the layer holds it), on top of
    /// `below`, the entries of the tree the layers below make (none for a full image).
    /// `layers` is the image's layer count, this one included; `patches`: a
    /// `tar-patch+zstd` layer.
    pub fn new(config: StageConfig, below: &[Entry], layers: usize, patches: bool) -> LayerCheck {
        let max_file_size = config.entries.iter().filter_map(|e| e.size).max().unwrap_or(0);
        let below_bytes = below.iter().filter_map(|e| e.size).fold(0u64, u64::saturating_add);
        LayerCheck {
            budget: Budget::of(&config, layers),
            config,
            layers,
            state: LayerState {
                digest: Digest::of(b""),
                last: true,
                first: below.is_empty(),
                max_file_size,
                seen: Default::default(),
                patches,
                buf: vec![0; CHUNK],
                bytes: 0,
                entries: 0,
                signed_next: 0,
            },
            tree: below.iter().map(|e| (e.path.as_str().to_owned(), Node::of(e))).collect(),
            below_entries: below.len() as u64,
            below_bytes,
            entries: 0,
            bytes: 0,
            out: LayerSummary::default(),
        }
    }

    /// Reads the layer's tar stream (decompressed) to its end, checking every entry and
    /// hashing every file.
    pub fn read<R: Read>(&mut self, tar: R) -> Result<(), CheckError> {
        let mut archive = tar::Archive::new(Forward::new(tar));
        let digest = self.state.digest;
        read_entries(&mut archive, digest, |entry, ext| self.entry(entry, ext)).map_err(CheckError::fail)?;
        // Tar padding after the end-of-archive marker, as the installer bounds it.
        let mut rest = archive.into_inner().into_inner();
        match io::copy(&mut (&mut rest).take(MAX_TRAILING + 1), &mut io::sink()) {
            Ok(n) if n > MAX_TRAILING => Err(CheckError {
                entry: None,
                reason: format!("more than {MAX_TRAILING} bytes follow the end of the tar archive"),
            }),
            Ok(_) => Ok(()),
            Err(e) => Err(CheckError { entry: None, reason: format!("reading the layer: {e}") }),
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, ext: Extensions) -> Result<(), Fail> {
        let rules = Rules {
            config: &self.config,
            budget: self.budget,
            layers: self.layers,
            entries: self.below_entries.saturating_add(self.entries),
            bytes: self.below_bytes.saturating_add(self.bytes),
        };
        let step = check_entry(&rules, entry, ext, &mut self.state)?;
        self.entries += 1;
        self.out.entries += 1;
        let Checked { path, shown, kind, mode, size, link, patch, signed } = match step {
            Step::Whiteout { entry, target } => {
                let gone = || refuse(&entry, format!("whites out {target}, which is not present"));
                if self.parent_dir(&target).is_err() || !self.tree.contains_key(target.as_str()) {
                    return Err(gone());
                }
                self.forget(target.as_str());
                return Ok(());
            }
            Step::Entry(c) => c,
        };
        let signed = signed.and_then(|e| e.sha256);
        self.parent_dir(&path).map_err(|r| refuse_shown(&shown, r))?;
        let reference = match patch {
            Some((_, old_size)) => match self.tree.get(path.as_str()) {
                Some(n) if n.kind == EntryKind::File => {
                    if n.size != Some(old_size) {
                        return Err(Fail::Content(UnpackError::Mismatch {
                            path: path.to_string(),
                            reason: crate::patch::PatchError::Reference { have: n.size.unwrap_or(0), want: old_size }
                                .to_string(),
                        }));
                    }
                    Some(n.clone())
                }
                Some(_) => {
                    return Err(refuse(&path, "is a patch, but what the tree below holds there is not a file".into()));
                }
                None => {
                    return Err(refuse(
                        &path,
                        "is a patch against the parent's version of the file, but the tree below holds no file there"
                            .into(),
                    ));
                }
            },
            None => None,
        };
        // What a lower layer left at the path goes, except a directory for a directory.
        match self.tree.get(path.as_str()) {
            Some(n) if n.kind == EntryKind::Dir && kind != EntryKind::Dir => {
                let prefix = format!("{path}/");
                if self.state.seen.range(prefix.clone()..).next().is_some_and(|k| k.starts_with(&prefix)) {
                    return Err(refuse(&path, "replaces a directory whose contents this layer wrote".into()));
                }
                self.forget(path.as_str());
            }
            // A directory over a directory keeps what is below it (and takes the new mode).
            Some(_) | None => {}
        }
        let node = match kind {
            EntryKind::Dir => Node { kind, mode, size: None, sha256: None, link: None },
            EntryKind::Symlink => Node { kind, mode, size: None, sha256: None, link },
            EntryKind::File => {
                let sha256 = match (patch, reference) {
                    (Some((body, _)), Some(_)) => {
                        // The patch is read, not applied: the file it makes is the signed one.
                        let n = io::copy(&mut (&mut *entry).take(body), &mut io::sink()).map_err(Fail::Read)?;
                        if n != body {
                            return Err(Fail::Content(UnpackError::Corrupt {
                                layer: self.state.digest,
                                reason: format!("the archive ends inside the patch of {path}"),
                            }));
                        }
                        self.out.patches += 1;
                        signed
                    }
                    _ => Some(self.hash_file(entry, &path, size)?),
                };
                if let (Some(want), Some(got)) = (signed, sha256)
                    && want != got
                {
                    return Err(Fail::Content(UnpackError::Mismatch {
                        path: path.to_string(),
                        reason: format!("its content hashes to {got}, the signed manifest says {want}"),
                    }));
                }
                self.bytes += size;
                Node { kind, mode, size: Some(size), sha256, link: None }
            }
        };
        self.tree.insert(path.as_str().to_owned(), node);
        Ok(())
    }

    /// Reads exactly `size` bytes of a file's data, hashing them.
    fn hash_file<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, path: &RelPath, size: u64) -> Result<Digest, Fail> {
        let mut hasher = Hasher::new();
        let mut left = size;
        while left > 0 {
            let want = left.min(self.state.buf.len() as u64) as usize;
            let n = match entry.read(&mut self.state.buf[..want]) {
                Ok(0) => {
                    return Err(Fail::Content(UnpackError::Corrupt {
                        layer: self.state.digest,
                        reason: format!("the archive ends inside {path}: {} of {size} bytes", size - left),
                    }));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fail::Read(e)),
            };
            hasher.update(&self.state.buf[..n]);
            left -= n as u64;
        }
        Ok(hasher.finish())
    }

    /// The directory holding `path` is in the tree, and every directory above it: the
    /// unpacker opens them one component at a time, never through a link or a file.
    fn parent_dir(&self, path: &RelPath) -> Result<(), String> {
        let Some(parent) = path.parent() else { return Ok(()) };
        let mut at = String::new();
        for c in parent.components() {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(c);
            match self.tree.get(&at) {
                None => return Err(format!("its directory {at} is not present")),
                Some(n) if n.kind != EntryKind::Dir => {
                    return Err(format!(
                        "{at} is not a directory (a symlink or a file): nothing is written through it"
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Removes `path` and everything below it from the tree.
    fn forget(&mut self, path: &str) {
        super::forget(&mut self.tree, path);
    }

    /// Fills in the sha256 the manifest lacks with the file's as the layer holds it, then
    /// compares the tree the layer makes with the manifest exactly as the unpacker does at
    /// the end: kind, mode, size, sha256, link text, nothing missing, nothing extra.
    /// Returns the manifest to sign and what the layer held.
    pub fn finish(mut self) -> Result<(StageConfig, LayerSummary), CheckError> {
        // Both are in path order (the manifest's entries are sorted and unique, the tree
        // is a map): one pass side by side pairs them. Entries out of order cannot pair
        // up with the tree's and are reported, never passed.
        let mut problems = Vec::new();
        let mut tree = self.tree.iter().peekable();
        for e in &mut self.config.entries {
            while let Some((path, _)) = tree.next_if(|(p, _)| p.as_str() < e.path.as_str()) {
                problems.push(CheckError::at(path, "is not in the signed manifest".into()));
            }
            let Some((_, node)) = tree.next_if(|(p, _)| p.as_str() == e.path.as_str()) else {
                problems.push(CheckError::at(e.path.as_str(), format!("{} is missing", super::kind_name(e.kind))));
                continue;
            };
            if e.kind == EntryKind::File && e.sha256.is_none() {
                e.sha256 = node.sha256;
            }
            if !node.is(e) {
                problems.push(CheckError::at(
                    e.path.as_str(),
                    format!("the layer makes {node:?}, the signed manifest says {:?}", Node::of(e)),
                ));
            }
        }
        for (path, _) in tree {
            problems.push(CheckError::at(path, "is not in the signed manifest".into()));
        }
        let n = problems.len();
        match problems.into_iter().next() {
            None => Ok((self.config, self.out)),
            Some(mut first) => {
                if n > 1 {
                    first.reason = format!("{} (and {} more differences)", first.reason, n - 1);
                }
                Err(first)
            }
        }
    }
}

fn refuse(path: &RelPath, reason: String) -> Fail {
    refuse_shown(path.as_str(), reason)
}

fn refuse_shown(shown: &str, reason: String) -> Fail {
    Fail::Content(UnpackError::Unsafe { layer: Digest::of(b""), entry: shown.to_owned(), reason })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::manifest::StageDefinition;

    fn rel(s: &str) -> RelPath {
        s.parse().unwrap()
    }

    fn m(bits: u32) -> Mode {
        Mode::new(bits).unwrap()
    }

    fn dir(p: &str) -> Entry {
        Entry { path: rel(p), kind: EntryKind::Dir, mode: m(0o755), size: None, sha256: None, link: None }
    }

    fn file(p: &str, content: &[u8]) -> Entry {
        Entry {
            path: rel(p),
            kind: EntryKind::File,
            mode: m(0o644),
            size: Some(content.len() as u64),
            sha256: Some(Digest::of(content)),
            link: None,
        }
    }

    fn config(mut entries: Vec<Entry>) -> StageConfig {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let def = StageDefinition::parse("version: 1.0.0\n", Path::new("manifest.yaml")).unwrap();
        StageConfig::from_definition("test-stage".parse().unwrap(), &def, entries)
    }

    /// The tar stream the builder writes for `ops` (directories, files, whiteouts).
    fn tar_of(ops: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in ops {
            let mut h = tar::Header::new_gnu();
            match data {
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{p}/"), io::empty()).unwrap();
                }
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(d.len() as u64);
                    b.append_data(&mut h, p, *d).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn check(config: &StageConfig, below: &[Entry], tar: &[u8]) -> Result<LayerSummary, CheckError> {
        let mut c = LayerCheck::new(config.clone(), below, if below.is_empty() { 1 } else { 2 }, false);
        c.read(tar)?;
        c.finish().map(|(_, s)| s)
    }

    fn full() -> (StageConfig, Vec<u8>) {
        let c = config(vec![dir("bin"), file("bin/a", b"hello"), file("bin/b", b"")]);
        let t = tar_of(&[("bin", None), ("bin/a", Some(b"hello")), ("bin/b", Some(b""))]);
        (c, t)
    }

    #[test]
    fn a_layer_the_installer_takes_passes_with_its_files_hashed_from_the_stream() {
        let (c, t) = full();
        let mut unhashed = c.clone();
        for e in &mut unhashed.entries {
            e.sha256 = None;
        }
        let mut lc = LayerCheck::new(unhashed, &[], 1, false);
        lc.read(&t[..]).unwrap();
        let (signed, s) = lc.finish().unwrap();
        assert_eq!(signed, c, "the hashes filled in are the files' as the layer holds them");
        assert_eq!((s.entries, s.patches), (3, 0));
    }

    #[test]
    fn a_manifest_whose_entries_are_out_of_order_is_refused_not_paired_by_luck() {
        // The tree below is the manifest's own entries, so only the order differs.
        let (c, _) = full();
        let finish = |c: &StageConfig| LayerCheck::new(c.clone(), &c.entries, 2, false).finish();
        assert!(finish(&c).is_ok());
        let mut swapped = c.clone();
        swapped.entries.swap(1, 2);
        let e = finish(&swapped).unwrap_err().to_string();
        assert!(e.contains("bin/") && e.contains("more differences"), "{e}");
        // Every difference is counted: one extra path and one missing.
        let mut other = c.clone();
        other.entries[2].path = rel("bin/c");
        let e = LayerCheck::new(other, &c.entries, 2, false).finish().unwrap_err().to_string();
        assert_eq!(e, "entry \"bin/b\": is not in the signed manifest (and 1 more differences)");
    }

    #[test]
    fn an_empty_or_cut_layer_is_refused() {
        let (c, t) = full();
        let e = check(&c, &[], b"").unwrap_err();
        assert!(e.to_string().contains("is missing"), "{e}");
        // Cut inside bin/a's data, after its header, inside bin/b's header.
        for cut in [1024 + 2, 1024, 1536 + 2] {
            let e = check(&c, &[], &t[..cut]).unwrap_err();
            let e = e.to_string();
            assert!(
                e.contains("ends inside") || e.contains("not a readable") || e.contains("is missing"),
                "{cut}: {e}"
            );
        }
        // Cut after bin/a: bin/b is missing.
        let e = check(&c, &[], &t[..1536]).unwrap_err();
        assert!(e.to_string().contains("bin/b") && e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn what_the_unpacker_refuses_is_refused() {
        let (c, _) = full();
        // Content that is not what the manifest says (after the fact: the hashes are compared by finish).
        let t = tar_of(&[("bin", None), ("bin/a", Some(b"HELLO")), ("bin/b", Some(b""))]);
        let e = check(&c, &[], &t).unwrap_err();
        assert!(e.to_string().contains("bin/a"), "{e}");
        // A file in a directory the layer has not made.
        let t = tar_of(&[("bin/a", Some(b"hello"))]);
        let e = check(&c, &[], &t).unwrap_err();
        assert!(e.to_string().contains("its directory bin is not present"), "{e}");
        // A path that is not in the manifest, a duplicate.
        let t = tar_of(&[("bin", None), ("bin/a", Some(b"hello")), ("bin/b", Some(b"")), ("x", Some(b""))]);
        assert!(check(&c, &[], &t).unwrap_err().to_string().contains("not in the signed manifest"));
        let t = tar_of(&[("bin", None), ("bin/a", Some(b"hello")), ("bin/a", Some(b"hello"))]);
        assert!(check(&c, &[], &t).unwrap_err().to_string().contains("appears twice"));
        // A name the parser refuses.
        let mut t = tar_of(&[("bin", None)]);
        t[..3].copy_from_slice(b"../");
        let mut h = tar::Header::from_byte_slice(&t[..512]).clone();
        h.set_cksum();
        t[..512].copy_from_slice(h.as_bytes());
        let e = check(&c, &[], &t).unwrap_err();
        assert!(e.to_string().contains("'..' component"), "{e}");
        // More than a megabyte of bytes after the end of the archive.
        let (c, mut t) = full();
        t.extend(std::iter::repeat_n(0u8, (MAX_TRAILING + 1024) as usize));
        assert!(check(&c, &[], &t).unwrap_err().to_string().contains("follow the end"));
    }

    #[test]
    fn a_delta_is_checked_on_the_tree_below() {
        let below = vec![dir("bin"), file("bin/a", b"hello"), file("bin/old", b"x")];
        let c = config(vec![dir("bin"), file("bin/a", b"hello2")]);
        let wh = |p: &str| {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(0);
            b.append_data(&mut h, p, io::empty()).unwrap();
            let mut v = b.into_inner().unwrap();
            v.truncate(v.len() - 1024);
            v
        };
        let mut t = wh("bin/.wh.old");
        t.extend(tar_of(&[("bin/a", Some(b"hello2"))]));
        check(&c, &below, &t).unwrap();
        // Without the whiteout bin/old stays, which the manifest does not have.
        let t = tar_of(&[("bin/a", Some(b"hello2"))]);
        assert!(check(&c, &below, &t).unwrap_err().to_string().contains("bin/old"));
        // A whiteout of what is not there.
        let mut t = wh("bin/.wh.nothing");
        t.extend(tar_of(&[("bin/a", Some(b"hello2"))]));
        assert!(check(&c, &below, &t).unwrap_err().to_string().contains("not present"));
        // The signed hash is compared as the file passes.
        let mut t = wh("bin/.wh.old");
        t.extend(tar_of(&[("bin/a", Some(b"hellX2"))]));
        let e = check(&c, &below, &t).unwrap_err();
        assert!(e.to_string().contains("hashes to"), "{e}");
    }
}
