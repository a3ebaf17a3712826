//! Checks a parsed send stream against what an op-dbus payload may do, before anything
//! reaches the kernel.
//!
//! `btrfs receive` trusts its input: it joins each path to the subvolume's directory and
//! resolves it like any path, following symlinks in every component (and in the last one
//! for writes, clones, truncate and chmod), and CLONE may name any subvolume of the
//! filesystem. Lexical checks on the paths alone do not stop a stream that first makes a
//! symlink and then writes through it. So the checker keeps a model of the subvolume's
//! tree (kind of every entry, and link texts) and follows each command in it:
//!
//! ```text
//! stream     starts with SUBVOL (full) or SNAPSHOT (incremental); exactly one of them;
//!            SNAPSHOT only against the declared parent UUID, SUBVOL only when none is
//!            declared; the subvolume name is one path component; ends with END
//! paths      RelPaths (the reader parses them); no component before the last may be a
//!            symlink or a non-directory in the model; a name is created only where
//!            nothing is, removed only where something of the right kind is
//! symlinks   texts neither empty nor absolute; at END every symlink of the tree must
//!            resolve inside the subvolume from where it lies (confine_link): new links
//!            are born under temporary names at the top and moved into place, so the
//!            check is on the final tree
//! following  write, clone (both ends), truncate, fallocate and chmod never act on a
//!            symlink (btrfs receive would follow it)
//! refused    mknod, mkfifo, mksock; hard links to directories; encoded (compressed)
//!            writes; xattrs btrfs.* (properties such as compression), trusted.*,
//!            security.capability (file capabilities are privileges), and names outside
//!            user.*, security.*, system.posix_acl_*; modes beyond 07777; fallocate
//!            modes other than allocate, keep-size and punch-hole; offsets and sizes
//!            beyond MAX_FILE_SIZE
//! clone      its source subvolume is the stream's own or its parent (CLONE_UUID);
//!            the source path is a file in that tree
//! bounds     at most MAX_TREE_ENTRIES entries in the model
//! ```
//!
//! For an incremental stream the model starts from the parent's tree when the caller
//! gives it ([`ParentTree`], scanned from the parent on disk): then the checks are
//! exact. Without it ([`validate_stream`] with a parent UUID), what the parent holds is
//! unknown: paths into it are taken as they come, and only what the stream itself creates
//! is tracked, so a stream could still resolve a path through a symlink that the parent
//! holds. Pass the parent tree wherever the parent is at hand.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Serialize;

use super::StreamError;
use super::contents::{Contents, FileId};
use super::fsops;
use super::stream::{At, Command, StreamPath, StreamReader, Uuid};
use crate::path::{RelPath, confine_link};

/// Largest file offset or size a stream may use (1 TiB).
pub const MAX_FILE_SIZE: u64 = 1 << 40;
/// Most entries (files, directories, links) the checker models at once.
pub const MAX_TREE_ENTRIES: usize = 1 << 20;

const FALLOC_FL_KEEP_SIZE: u32 = 1;
const FALLOC_FL_PUNCH_HOLE: u32 = 2;

/// The sha256 and length of files of a received tree, by path (see
/// [`Forwarded::files`](super::Forwarded::files)).
pub type FileDigests = BTreeMap<String, (crate::Digest, u64)>;

/// What a stream was found to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamSummary {
    /// Protocol version (1 or 2).
    pub version: u32,
    /// The subvolume's name in the stream.
    pub name: String,
    /// The UUID the received subvolume will carry as its received UUID.
    pub uuid: Uuid,
    pub ctransid: u64,
    /// For an incremental stream: the parent's UUID and ctransid.
    pub parent_uuid: Option<Uuid>,
    pub parent_ctransid: Option<u64>,
    /// Commands, END included.
    pub commands: u64,
    /// Commands per name (`write`, `rename`, ...).
    pub counts: BTreeMap<String, u64>,
    /// Data bytes carried by WRITE commands.
    pub bytes_written: u64,
    /// Bytes copied by CLONE commands.
    pub bytes_cloned: u64,
    /// Bytes FALLOCATE commands reserve (punched holes excluded).
    pub bytes_allocated: u64,
    /// Length of the stream in bytes.
    pub stream_bytes: u64,
}

impl StreamSummary {
    /// Bytes the stream makes the receiver store: written, cloned and reserved.
    pub fn bytes_stored(&self) -> u64 {
        self.bytes_written.saturating_add(self.bytes_cloned).saturating_add(self.bytes_allocated)
    }

    /// Entries the stream creates (files, directories, links, special files).
    pub fn entries_created(&self) -> u64 {
        ["mkfile", "mkdir", "mknod", "mkfifo", "mksock", "symlink", "link"]
            .iter()
            .filter_map(|k| self.counts.get(*k))
            .fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// An entry of the modelled tree.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    /// `complete`: every child is listed; otherwise children may exist that the model
    /// does not know (a directory of a parent that was not given).
    Dir {
        children: BTreeMap<String, Node>,
        complete: bool,
    },
    /// A regular file: which one, to follow its content (see [`FileId`]).
    File(FileId),
    Symlink(String),
    /// A device node, FIFO or socket of the parent tree.
    Special,
    /// Something of the parent that the model does not know.
    Unknown,
}

impl Node {
    fn dir(complete: bool) -> Node {
        Node::Dir { children: BTreeMap::new(), complete }
    }

    fn kind(&self) -> &'static str {
        match self {
            Node::Dir { .. } => "directory",
            Node::File(_) => "regular file",
            Node::Symlink(_) => "symlink",
            Node::Special => "special file",
            Node::Unknown => "entry of the parent",
        }
    }
}

/// Drops a tree without recursion: renames can nest a tree deeper than the stack allows.
fn drop_iteratively(root: Node) {
    let mut stack = vec![root];
    while let Some(mut n) = stack.pop() {
        if let Node::Dir { children, .. } = &mut n {
            stack.extend(std::mem::take(children).into_values());
        }
    }
}

/// The tree of a parent subvolume, for checking an incremental stream exactly.
#[derive(Debug, Clone)]
pub struct ParentTree {
    pub(crate) root: Node,
    pub(crate) entries: usize,
}

impl ParentTree {
    /// Reads the tree under `dir` (the parent snapshot or generation) through directory
    /// handles, without following symlinks. Names must be valid path components.
    pub fn scan(dir: &Path) -> Result<ParentTree, StreamError> {
        let mut entries = 0;
        let root = fsops::scan_tree(dir, &mut entries, MAX_TREE_ENTRIES)?;
        Ok(ParentTree { root, entries })
    }

    /// How many entries the tree holds (the root not counted).
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

/// What [`Found`] a lookup gives.
enum Found<'a> {
    Node(&'a Node),
    Absent,
    /// Inside what the model does not know.
    Unknown,
}

/// Looks `path` up; errors when a component before the last is not a directory.
fn lookup<'a>(root: &'a Node, path: &RelPath) -> Result<Found<'a>, String> {
    let comps: Vec<&str> = path.components().collect();
    let mut node = root;
    let mut so_far = String::new();
    for (i, c) in comps.iter().enumerate() {
        if !so_far.is_empty() {
            so_far.push('/');
        }
        so_far.push_str(c);
        let Node::Dir { children, complete } = node else { unreachable!("only directories are descended into") };
        let last = i + 1 == comps.len();
        let child = match children.get(*c) {
            Some(child) => child,
            None if !*complete => return Ok(Found::Unknown),
            None if last => return Ok(Found::Absent),
            None => return Err(format!("its directory {so_far} is not present")),
        };
        if last {
            return Ok(Found::Node(child));
        }
        match child {
            Node::Dir { .. } => node = child,
            Node::Unknown => return Ok(Found::Unknown),
            Node::Symlink(_) => {
                return Err(format!("{so_far} is a symlink: no path is resolved through a symlink"));
            }
            other => return Err(format!("{so_far} is a {}, not a directory", other.kind())),
        }
    }
    unreachable!("a RelPath has at least one component")
}

/// The children of directory `dir` (the root for `None`), made known on the way: a
/// component the model does not know is taken to be a directory, since the command
/// needs one there. Returns the children, whether they are complete, and how many
/// entries were added.
fn dir_mut<'a>(
    root: &'a mut Node,
    dir: Option<&RelPath>,
) -> Result<(&'a mut BTreeMap<String, Node>, bool, usize), String> {
    let mut node = root;
    let mut added = 0;
    if let Some(dir) = dir {
        let mut so_far = String::new();
        for c in dir.components() {
            if !so_far.is_empty() {
                so_far.push('/');
            }
            so_far.push_str(c);
            let Node::Dir { children, complete } = node else { unreachable!("only directories are descended into") };
            if !children.contains_key(c) {
                if *complete {
                    return Err(format!("its directory {so_far} is not present"));
                }
                children.insert(c.to_owned(), Node::dir(false));
                added += 1;
            }
            let child = children.get_mut(c).expect("inserted above");
            match child {
                Node::Dir { .. } => {}
                Node::Unknown => *child = Node::dir(false),
                Node::Symlink(_) => {
                    return Err(format!("{so_far} is a symlink: no path is resolved through a symlink"));
                }
                other => return Err(format!("{so_far} is a {}, not a directory", other.kind())),
            }
            node = child;
        }
    }
    match node {
        Node::Dir { children, complete } => Ok((children, *complete, added)),
        _ => unreachable!("dir_mut ends on a directory"),
    }
}

/// How a stream must relate to a parent.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Expect {
    /// A full stream (SUBVOL).
    Full,
    /// An incremental stream (SNAPSHOT) against this parent.
    Parent(Uuid),
    /// An incremental stream against whatever parent the caller holds (the applier,
    /// which is given the parent as a directory).
    AnyParent,
}

#[derive(Debug, Clone)]
struct Start {
    name: String,
    uuid: Uuid,
    ctransid: u64,
    parent: Option<(Uuid, u64)>,
}

/// Follows a stream command by command; see the module documentation.
#[derive(Debug)]
pub(crate) struct Checker {
    expect: Expect,
    /// The parent's tree as given: the model's start, and the source of parent clones.
    parent_tree: Option<ParentTree>,
    tree: Node,
    entries: usize,
    start: Option<Start>,
    ended: bool,
    commands: u64,
    counts: BTreeMap<String, u64>,
    bytes_written: u64,
    bytes_cloned: u64,
    bytes_allocated: u64,
    /// The last [`FileId`] given to a file the stream created.
    last_file: FileId,
    /// The content of the files the stream creates, when asked for ([`Checker::hashing`]).
    contents: Option<Contents>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        drop_iteratively(std::mem::replace(&mut self.tree, Node::File(0)));
    }
}

impl Checker {
    pub(crate) fn new(expect: Expect, parent_tree: Option<ParentTree>) -> Checker {
        Checker {
            expect,
            parent_tree,
            tree: Node::dir(true),
            entries: 0,
            start: None,
            ended: false,
            commands: 0,
            counts: BTreeMap::new(),
            bytes_written: 0,
            bytes_cloned: 0,
            bytes_allocated: 0,
            last_file: 0,
            contents: None,
        }
    }

    /// Also hashes the content of each file the stream creates as its writes pass (see
    /// [`contents`](super::contents)): [`Checker::file_digests`] gives them at the end.
    pub(crate) fn hashing(mut self) -> Checker {
        self.contents = Some(Contents::default());
        self
    }

    /// The sha256 and length of every file of the final tree whose content the stream
    /// wrote in order from its creation, by path (hard links under each of their paths);
    /// empty unless [`Checker::hashing`]. Files missing here must be read to be checked.
    pub(crate) fn file_digests(&mut self) -> FileDigests {
        let mut out = FileDigests::new();
        let Some(contents) = &mut self.contents else { return out };
        contents.finish();
        for (path, node) in self.tree.walk() {
            if let Node::File(id) = node
                && let Some(d) = contents.digest(*id)
            {
                out.insert(path, d);
            }
        }
        out
    }

    /// The UUID of the stream's own subvolume, once its first command was checked.
    pub(crate) fn own_uuid(&self) -> Option<Uuid> {
        self.start.as_ref().map(|s| s.uuid)
    }

    /// What the commands checked so far store and create.
    pub(crate) fn progress(&self) -> super::forward::Progress {
        let entries = ["mkfile", "mkdir", "mknod", "mkfifo", "mksock", "symlink", "link"]
            .iter()
            .filter_map(|k| self.counts.get(*k))
            .fold(0u64, |a, b| a.saturating_add(*b));
        super::forward::Progress {
            bytes_stored: self.bytes_written.saturating_add(self.bytes_cloned).saturating_add(self.bytes_allocated),
            entries_created: entries,
        }
    }

    /// The summary, once END was checked.
    pub(crate) fn finish(&self, version: u32, stream_bytes: u64) -> Result<StreamSummary, StreamError> {
        let start = self
            .start
            .as_ref()
            .filter(|_| self.ended)
            .ok_or(StreamError::MissingEnd { offset: stream_bytes, commands: self.commands })?;
        Ok(StreamSummary {
            version,
            name: start.name.clone(),
            uuid: start.uuid,
            ctransid: start.ctransid,
            parent_uuid: start.parent.map(|p| p.0),
            parent_ctransid: start.parent.map(|p| p.1),
            commands: self.commands,
            counts: self.counts.clone(),
            bytes_written: self.bytes_written,
            bytes_cloned: self.bytes_cloned,
            bytes_allocated: self.bytes_allocated,
            stream_bytes,
        })
    }

    /// [`Checker::check`], then `watch` is shown what the stream stores and creates so far;
    /// its refusal (`Err(reason)`) refuses the stream at this command (the budget of an
    /// unpack, as the forwarder and the applier enforce it).
    pub(crate) fn check_watched(
        &mut self,
        at: At,
        cmd: &Command,
        watch: &mut impl FnMut(super::forward::Progress) -> Result<(), String>,
    ) -> Result<(), StreamError> {
        self.check(at, cmd)?;
        watch(self.progress()).map_err(|reason| StreamError::Refused {
            index: at.index,
            offset: at.offset,
            command: cmd.name(),
            path: String::new(),
            reason,
        })
    }

    /// Checks one command and applies it to the model.
    pub(crate) fn check(&mut self, at: At, cmd: &Command) -> Result<(), StreamError> {
        let refuse = |path: &dyn std::fmt::Display, reason: String| StreamError::Refused {
            index: at.index,
            offset: at.offset,
            command: cmd.name(),
            path: path.to_string(),
            reason,
        };
        self.commands += 1;
        *self.counts.entry(cmd.name().to_owned()).or_default() += 1;
        if self.ended {
            return Err(refuse(&"", "a command after END".into()));
        }
        if self.start.is_none() && !matches!(cmd, Command::Subvol { .. } | Command::Snapshot { .. }) {
            return Err(refuse(&cmd.path_display(), "the stream must begin with a subvol or snapshot command".into()));
        }
        let in_bounds = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= MAX_FILE_SIZE);
        let bounds = |path: &RelPath, offset: u64, len: u64| {
            if in_bounds(offset, len) {
                Ok(())
            } else {
                Err(refuse(
                    path,
                    format!("reaches byte {offset} + {len}, beyond the {MAX_FILE_SIZE} bytes a staged file may have"),
                ))
            }
        };
        match cmd {
            Command::Subvol { path, uuid, ctransid } => {
                self.begin(path, *uuid, *ctransid, None).map_err(|r| refuse(path, r))?;
            }
            Command::Snapshot { path, uuid, ctransid, clone_uuid, clone_ctransid } => {
                self.begin(path, *uuid, *ctransid, Some((*clone_uuid, *clone_ctransid)))
                    .map_err(|r| refuse(path, r))?;
            }
            Command::Mkfile { path, .. } => {
                let id = self.new_file();
                self.create(path, Node::File(id)).map_err(|r| refuse(path, r))?;
            }
            Command::Mkdir { path, .. } => self.create(path, Node::dir(true)).map_err(|r| refuse(path, r))?,
            Command::Mknod { path, mode, rdev, .. } => {
                return Err(refuse(
                    path,
                    format!("is a device node (mode {mode:o}, rdev {rdev:#x}); device nodes are never staged"),
                ));
            }
            Command::Mkfifo { path, .. } => return Err(refuse(path, "is a FIFO; FIFOs are never staged".into())),
            Command::Mksock { path, .. } => return Err(refuse(path, "is a socket; sockets are never staged".into())),
            Command::Symlink { path, target, .. } => {
                if target.is_empty() || target.starts_with('/') {
                    return Err(refuse(
                        path,
                        format!("symlink to {target:?}: link texts must be relative and stay inside the subvolume"),
                    ));
                }
                self.create(path, Node::Symlink(target.clone())).map_err(|r| refuse(path, r))?;
            }
            Command::Rename { from, to } => self.rename(from, to).map_err(|r| refuse(from, r))?,
            Command::Link { path, target } => {
                let node = match lookup(&self.tree, target)
                    .map_err(|r| refuse(path, format!("link target {target}: {r}")))?
                {
                    Found::Node(n @ (Node::File(_) | Node::Symlink(_) | Node::Special)) => n.clone(),
                    Found::Node(Node::Unknown) | Found::Unknown => Node::Unknown,
                    Found::Node(n) => {
                        return Err(refuse(path, format!("hard link to {target}, a {}", n.kind())));
                    }
                    Found::Absent => return Err(refuse(path, format!("hard link to {target}, which is not present"))),
                };
                self.create(path, node).map_err(|r| refuse(path, r))?;
            }
            Command::Unlink { path } => self.remove(path, false).map_err(|r| refuse(path, r))?,
            Command::Rmdir { path } => self.remove(path, true).map_err(|r| refuse(path, r))?,
            Command::SetXattr { path, name, .. } | Command::RemoveXattr { path, name } => {
                check_xattr_name(name).map_err(|r| refuse(path, format!("xattr {name:?}: {r}")))?;
                self.existing(path, Follow::No).map_err(|r| refuse(path, r))?;
            }
            Command::Write { path, offset, data } => {
                bounds(path, *offset, data.len() as u64)?;
                let id = self.file(path).map_err(|r| refuse(path, r))?;
                if let Some(c) = &mut self.contents {
                    c.write(id, *offset, data);
                }
                self.bytes_written = self.bytes_written.saturating_add(data.len() as u64);
            }
            Command::Clone { path, offset, len, clone_uuid, clone_path, clone_offset, .. } => {
                bounds(path, *offset, *len)?;
                bounds(clone_path, *clone_offset, *len)?;
                let id = self.file(path).map_err(|r| refuse(path, r))?;
                self.clone_source(*clone_uuid, clone_path).map_err(|r| refuse(path, r))?;
                self.spoil(id);
                self.bytes_cloned = self.bytes_cloned.saturating_add(*len);
            }
            Command::Truncate { path, size } => {
                bounds(path, *size, 0)?;
                let id = self.file(path).map_err(|r| refuse(path, r))?;
                if let Some(c) = &mut self.contents {
                    c.truncate(id, *size);
                }
            }
            Command::Chmod { path, mode } => {
                if *mode > 0o7777 {
                    return Err(refuse(path, format!("mode {mode:o} has bits beyond 07777")));
                }
                self.existing(path, Follow::Yes).map_err(|r| refuse(path, r))?;
            }
            Command::Chown { path, .. } | Command::Utimes { path, .. } | Command::Fileattr { path, .. } => {
                self.existing(path, Follow::No).map_err(|r| refuse(path, r))?;
            }
            Command::UpdateExtent { path, offset, len } => {
                bounds(path, *offset, *len)?;
                let id = self.file(path).map_err(|r| refuse(path, r))?;
                self.spoil(id);
            }
            Command::Fallocate { path, mode, offset, len } => {
                let ok =
                    matches!(*mode, 0 | FALLOC_FL_KEEP_SIZE) || *mode == FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
                if !ok {
                    return Err(refuse(
                        path,
                        format!("fallocate mode {mode:#x}: only allocate, keep-size and punch-hole are applied"),
                    ));
                }
                bounds(path, *offset, *len)?;
                let id = self.file(path).map_err(|r| refuse(path, r))?;
                self.spoil(id);
                if *mode & FALLOC_FL_PUNCH_HOLE == 0 {
                    self.bytes_allocated = self.bytes_allocated.saturating_add(*len);
                }
            }
            Command::EncodedWrite { path, compression, .. } => {
                return Err(refuse(
                    path,
                    format!(
                        "encoded (compressed, type {compression}) writes are not supported: send without --compressed-data"
                    ),
                ));
            }
            Command::End => {
                self.ended = true;
                self.check_links().map_err(|(p, r)| refuse(&p, r))?;
            }
        }
        if self.entries > MAX_TREE_ENTRIES {
            return Err(refuse(
                &cmd.path_display(),
                format!("the subvolume would hold more than {MAX_TREE_ENTRIES} entries"),
            ));
        }
        Ok(())
    }

    fn begin(&mut self, path: &RelPath, uuid: Uuid, ctransid: u64, parent: Option<(Uuid, u64)>) -> Result<(), String> {
        if let Some(s) = &self.start {
            return Err(format!("a second subvolume in one stream (the first was {})", s.name));
        }
        if path.components().count() != 1 {
            return Err("the subvolume name must be a single path component".into());
        }
        match (self.expect, parent) {
            (Expect::Full, None) => {}
            (Expect::Full, Some((p, _))) => {
                return Err(format!("an incremental stream against parent {p}, but no parent was declared for it"));
            }
            (Expect::Parent(want), None) => {
                return Err(format!(
                    "a full stream, but the parent {want} was declared: expected an incremental stream"
                ));
            }
            (Expect::AnyParent, None) => {
                return Err("a full stream, but it is applied onto a parent: expected an incremental stream".into());
            }
            (Expect::Parent(want), Some((p, _))) if p != want => {
                return Err(format!("an incremental stream against parent {p}, but the declared parent is {want}"));
            }
            (Expect::Parent(_) | Expect::AnyParent, Some(_)) => {}
        }
        self.tree = match (&parent, &self.parent_tree) {
            (None, _) => Node::dir(true),
            (Some(_), Some(t)) => {
                self.entries = t.entries;
                t.root.clone()
            }
            (Some(_), None) => Node::dir(false),
        };
        self.start = Some(Start { name: path.to_string(), uuid, ctransid, parent });
        Ok(())
    }

    fn create(&mut self, path: &RelPath, node: Node) -> Result<(), String> {
        let (children, _, added) = dir_mut(&mut self.tree, path.parent().as_ref())?;
        self.entries += added;
        let name = path.file_name();
        if let Some(old) = children.get(name) {
            return Err(format!("already exists (a {})", old.kind()));
        }
        children.insert(name.to_owned(), node);
        self.entries += 1;
        Ok(())
    }

    fn remove(&mut self, path: &RelPath, dir: bool) -> Result<(), String> {
        let (children, complete, added) = dir_mut(&mut self.tree, path.parent().as_ref())?;
        self.entries += added;
        let name = path.file_name();
        match children.get(name) {
            None if complete => return Err("is not present".into()),
            None => return Ok(()),
            Some(Node::Dir { children: c, .. }) if dir => {
                if !c.is_empty() {
                    return Err("is a directory that is not empty".into());
                }
            }
            Some(Node::Unknown) => {}
            Some(n @ Node::Dir { .. }) => {
                return Err(format!("is a {}; unlink removes only files and links", n.kind()));
            }
            Some(n) if dir => return Err(format!("is a {}, not a directory", n.kind())),
            Some(_) => {}
        }
        children.remove(name);
        self.entries -= 1;
        Ok(())
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath) -> Result<(), String> {
        if to.starts_with(from) {
            return Err(format!("cannot be moved into itself ({to})"));
        }
        // Where it goes: the directory must be there (made known on the way).
        let (_, _, added) =
            dir_mut(&mut self.tree, to.parent().as_ref()).map_err(|r| format!("destination {to}: {r}"))?;
        self.entries += added;
        let (children, complete, added) = dir_mut(&mut self.tree, from.parent().as_ref())?;
        self.entries += added;
        let node = match children.remove(from.file_name()) {
            Some(n) => n,
            None if complete => return Err("is not present".into()),
            None => {
                self.entries += 1;
                Node::Unknown
            }
        };
        let (children, _, _) = dir_mut(&mut self.tree, to.parent().as_ref()).expect("made known above");
        let name = to.file_name();
        if let Some(old) = children.get(name) {
            let fits = match (&node, old) {
                (_, Node::Unknown) | (Node::Unknown, _) => true,
                (Node::Dir { .. }, Node::Dir { children, .. }) => children.is_empty(),
                (Node::Dir { .. }, _) | (_, Node::Dir { .. }) => false,
                _ => true,
            };
            if !fits {
                let kind = node.kind();
                let old_kind = old.kind();
                // Put it back: the model stays as it was.
                let (children, _, _) = dir_mut(&mut self.tree, from.parent().as_ref()).expect("present");
                children.insert(from.file_name().to_owned(), node);
                return Err(format!("a {kind} cannot replace {to}, a {old_kind}"));
            }
            self.entries -= 1;
        }
        children.insert(name.to_owned(), node);
        Ok(())
    }

    /// Checks that `path` names something (or something unknown) reached without
    /// passing through a symlink; with `Follow::Yes`, not a symlink itself either.
    fn existing(&self, path: &StreamPath, follow: Follow) -> Result<(), String> {
        let StreamPath::Rel(rel) = path else {
            return Ok(());
        };
        match lookup(&self.tree, rel)? {
            Found::Absent => Err("is not present".into()),
            Found::Node(Node::Symlink(t)) if follow == Follow::Yes => {
                Err(format!("is a symlink (to {t:?}): btrfs receive would act on what it points to"))
            }
            _ => Ok(()),
        }
    }

    /// Checks that `path` is a regular file (or unknown); which one (0 when unknown or not
    /// created by the stream).
    fn file(&self, path: &RelPath) -> Result<FileId, String> {
        file_in(&self.tree, path)
    }

    /// Numbers a file the stream creates (0, not followed, once the numbers run out).
    fn new_file(&mut self) -> FileId {
        let Some(id) = self.last_file.checked_add(1) else { return 0 };
        self.last_file = id;
        if let Some(c) = &mut self.contents {
            c.created(id);
        }
        id
    }

    /// The content of file `id` is no longer followed.
    fn spoil(&mut self, id: FileId) {
        if let Some(c) = &mut self.contents {
            c.spoil(id);
        }
    }

    fn clone_source(&self, uuid: Uuid, path: &RelPath) -> Result<(), String> {
        let start = self.start.as_ref().expect("checked before");
        if uuid == start.uuid {
            return file_in(&self.tree, path).map(drop).map_err(|r| format!("clone source {path}: {r}"));
        }
        match start.parent {
            Some((p, _)) if p == uuid => match &self.parent_tree {
                Some(t) => {
                    file_in(&t.root, path).map(drop).map_err(|r| format!("clone source {path} in the parent: {r}"))
                }
                None => Ok(()),
            },
            Some((p, _)) => Err(format!(
                "clones from subvolume {uuid}, which is neither this subvolume ({}) nor its parent ({p})",
                start.uuid
            )),
            None => Err(format!(
                "clones from subvolume {uuid}, which is not this subvolume ({}); a full stream clones only from itself",
                start.uuid
            )),
        }
    }

    /// Every symlink of the final tree must stay inside the subvolume.
    fn check_links(&self) -> Result<(), (String, String)> {
        for (path, node) in self.tree.walk() {
            if let Node::Symlink(target) = node {
                let rel = RelPath::parse(&path).map_err(|e| (path.clone(), e.to_string()))?;
                confine_link(&rel, target).map_err(|e| (path.clone(), e.to_string()))?;
            }
        }
        Ok(())
    }
}

impl Node {
    /// Every node below this one (not itself), each with its path from here, parents first.
    fn walk(&self) -> Vec<(String, &Node)> {
        let mut out = Vec::new();
        let mut stack: Vec<(String, &Node)> = vec![(String::new(), self)];
        while let Some((path, node)) = stack.pop() {
            if let Node::Dir { children, .. } = node {
                for (name, child) in children {
                    let p = if path.is_empty() { name.clone() } else { format!("{path}/{name}") };
                    stack.push((p.clone(), child));
                    out.push((p, child));
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follow {
    Yes,
    No,
}

fn file_in(root: &Node, path: &RelPath) -> Result<FileId, String> {
    match lookup(root, path)? {
        Found::Node(Node::File(id)) => Ok(*id),
        Found::Node(Node::Unknown) | Found::Unknown => Ok(0),
        Found::Node(n) => Err(format!("is a {}, not a regular file", n.kind())),
        Found::Absent => Err("is not present".into()),
    }
}

/// Which extended attributes a stream may set or remove.
fn check_xattr_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("names are 1 to 255 bytes".into());
    }
    if name.starts_with("btrfs.") {
        return Err("btrfs.* properties (compression and the like) are not taken from images".into());
    }
    if name.starts_with("trusted.") {
        return Err("trusted.* attributes are not taken from images".into());
    }
    if name == "security.capability" {
        return Err("file capabilities are privileges and are not taken from images".into());
    }
    let ok = ["user.", "security."].iter().any(|p| name.len() > p.len() && name.starts_with(p))
        || name == "system.posix_acl_access"
        || name == "system.posix_acl_default";
    if !ok {
        return Err("only user.*, security.* and POSIX ACL attributes are staged".into());
    }
    Ok(())
}

fn run<R: Read>(r: R, mut checker: Checker) -> Result<StreamSummary, StreamError> {
    let mut reader = StreamReader::new(r)?;
    loop {
        let offset = reader.position();
        let Some(cmd) = reader.next_command()? else { break };
        checker.check(At { index: reader.commands(), offset }, &cmd)?;
    }
    checker.finish(reader.version(), reader.position())
}

/// Parses and checks every command of a send stream (see the module documentation);
/// nothing is written anywhere. `declared_parent` is the parent UUID the image declares:
/// `None` for a full stream.
///
/// For an incremental stream whose parent tree is at hand, prefer
/// [`validate_stream_against`], which also checks paths into the parent's tree.
pub fn validate_stream<R: Read>(r: R, declared_parent: Option<Uuid>) -> Result<StreamSummary, StreamError> {
    let expect = match declared_parent {
        Some(u) => Expect::Parent(u),
        None => Expect::Full,
    };
    run(r, Checker::new(expect, None))
}

/// Like [`validate_stream`] for an incremental stream, with the parent's tree: every
/// path is followed exactly, through what the parent holds too.
pub fn validate_stream_against<R: Read>(
    r: R,
    parent_uuid: Uuid,
    parent: &ParentTree,
) -> Result<StreamSummary, StreamError> {
    run(r, Checker::new(Expect::Parent(parent_uuid), Some(parent.clone())))
}

/// Like [`validate_stream_against`] for a stream to be applied onto `parent`'s tree,
/// whatever parent UUID the stream names (the caller chose the parent); a full stream
/// when `parent` is `None`. What [`apply_to_dir`](super::apply_to_dir) would apply, checked
/// without writing anything.
pub fn validate_stream_onto<R: Read>(r: R, parent: Option<&ParentTree>) -> Result<StreamSummary, StreamError> {
    match parent {
        None => run(r, Checker::new(Expect::Full, None)),
        Some(p) => run(r, Checker::new(Expect::AnyParent, Some(p.clone()))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::stream::writer::StreamWriter;
    use super::*;

    const OWN: [u8; 16] = [0x11; 16];
    const PARENT: [u8; 16] = [0x22; 16];
    const OTHER: [u8; 16] = [0x33; 16];

    fn full() -> StreamWriter {
        let mut w = StreamWriter::new(2);
        w.subvol("vol", OWN).chown("", 0, 0).chmod("", 0o755);
        w
    }

    fn refused(w: &StreamWriter, parent: Option<[u8; 16]>, expect: &str) -> StreamError {
        let err = validate_stream(&w.bytes()[..], parent.map(Uuid)).unwrap_err();
        assert!(err.to_string().contains(expect), "expected {expect:?} in: {err}");
        assert!(err.is_malformed(), "{err}");
        err
    }

    /// What the kernel sends for a small tree: temporary names renamed into place.
    fn kernel_like() -> StreamWriter {
        let mut w = full();
        w.mkdir("o257-7-0")
            .rename("o257-7-0", "bin")
            .chmod("bin", 0o755)
            .mkfile("o258-7-0")
            .rename("o258-7-0", "bin/tool")
            .write("bin/tool", 0, b"#!/bin/sh\n")
            .chmod("bin/tool", 0o755)
            .mkfile("o259-7-0")
            .rename("o259-7-0", "bin/copy")
            .clone_range("bin/copy", 0, 10, OWN, "bin/tool", 0)
            .link("bin/hard", "bin/tool")
            .symlink("o260-7-0", "../bin/tool")
            .mkdir("o261-7-0")
            .rename("o261-7-0", "lib")
            .rename("o260-7-0", "lib/tool")
            .set_xattr("bin/tool", "user.origin", b"build")
            .utimes("lib/tool", 1_700_000_000)
            .utimes("", 1_700_000_000)
            .end();
        w
    }

    #[test]
    fn the_summary_counts_what_the_receiver_stores() {
        let mut w = full();
        w.mkfile("f")
            .write("f", 0, b"abc")
            .fallocate("f", 0, 0, 100)
            .fallocate("f", FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 50)
            .mkfile("g")
            .clone_range("g", 0, 3, OWN, "f", 0)
            .mkdir("d")
            .symlink("l", "f")
            .link("h", "f")
            .end();
        let s = validate_stream(&w.bytes()[..], None).unwrap();
        assert_eq!((s.bytes_written, s.bytes_cloned, s.bytes_allocated), (3, 3, 100));
        assert_eq!(s.bytes_stored(), 106);
        assert_eq!(s.entries_created(), 5);
    }

    #[test]
    fn accepts_a_kernel_like_stream() {
        let s = validate_stream(&kernel_like().bytes()[..], None).unwrap();
        assert_eq!(s.name, "vol");
        assert_eq!(s.uuid, Uuid(OWN));
        assert_eq!(s.parent_uuid, None);
        assert_eq!(s.version, 2);
        assert_eq!(s.bytes_written, 10);
        assert_eq!(s.bytes_cloned, 10);
        assert_eq!(s.counts["rename"], 5);
        assert_eq!(s.commands, 22);
        assert_eq!(s.stream_bytes, kernel_like().bytes().len() as u64);
    }

    #[test]
    fn refuses_unsafe_paths() {
        let mut w = full();
        w.mkfile("../escape").end();
        let err = refused(&w, None, "'..'");
        assert!(matches!(err, StreamError::Refused { index: 4, command: "mkfile", .. }), "{err:?}");
        let mut w = full();
        w.mkfile("o257-7-0").rename("o257-7-0", "a/../../etc/cron.d/x").end();
        refused(&w, None, "'..'");
        let mut w = full();
        w.mkfile("/etc/passwd").end();
        refused(&w, None, "absolute");
        let mut w = full();
        w.mkfile("a//b").end();
        refused(&w, None, "normalised");
        // The subvolume name is one component.
        let mut w = StreamWriter::new(2);
        w.subvol("a/b", OWN).end();
        refused(&w, None, "single path component");
    }

    #[test]
    fn refuses_special_files() {
        let mut w = full();
        w.mknod("o257-7-0").end();
        refused(&w, None, "device node");
        let mut w = full();
        w.mkfifo("o257-7-0").end();
        refused(&w, None, "FIFO");
        let mut w = full();
        w.mksock("o257-7-0").end();
        refused(&w, None, "socket");
    }

    #[test]
    fn refuses_escaping_symlinks() {
        let mut w = full();
        w.symlink("l", "/etc/shadow").end();
        refused(&w, None, "relative");
        // Relative, but out of the subvolume from where it ends up.
        let mut w = full();
        w.mkdir("d").symlink("o257-7-0", "../../etc/shadow").rename("o257-7-0", "d/l").end();
        let err = refused(&w, None, "points outside");
        assert!(matches!(err, StreamError::Refused { command: "end", ref path, .. } if path == "d/l"), "{err:?}");
        // Fine where it is created, out of the subvolume after a rename.
        let mut w = full();
        w.mkdir("a").mkdir("a/b").symlink("a/b/l", "../../x").rename("a/b/l", "l").end();
        refused(&w, None, "points outside");
        // A hard link gives a symlink a second place.
        let mut w = full();
        w.mkdir("a").symlink("a/l", "../x").link("l2", "a/l").end();
        refused(&w, None, "points outside");
    }

    #[test]
    fn refuses_paths_through_symlinks() {
        // A confined link, then a write through it: btrfs receive would follow it.
        let mut w = full();
        w.mkdir("d").symlink("l", "d").mkfile("l/x").end();
        refused(&w, None, "l is a symlink");
        // The chained-link escape: each link confined on its own, together they leave.
        let mut w = full();
        w.mkdir("d1")
            .mkdir("d1/d2")
            .mkdir("d1/d2/d3")
            .symlink("d1/d2/d3/up", "../..")
            .symlink("d1/d2/d3/up3", "../d3/up/../..")
            .mkfile("d1/d2/d3/up3/x")
            .end();
        refused(&w, None, "is a symlink");
        // Writes, truncates and chmods never act on a symlink.
        let mut w = full();
        w.mkfile("f").symlink("l", "f").write("l", 0, b"x").end();
        refused(&w, None, "not a regular file");
        let mut w = full();
        w.mkfile("f").symlink("l", "f").chmod("l", 0o4755).end();
        refused(&w, None, "btrfs receive would act on what it points to");
        let mut w = full();
        w.mkfile("f").symlink("l", "f").truncate("l", 0).end();
        refused(&w, None, "not a regular file");
        // ... but lchown and utimes (no following) are fine, as the kernel sends them.
        let mut w = full();
        w.mkfile("f").symlink("l", "f").chown("l", 0, 0).utimes("l", 1).end();
        validate_stream(&w.bytes()[..], None).unwrap();
    }

    #[test]
    fn refuses_clones_from_elsewhere() {
        let mut w = full();
        w.mkfile("f").clone_range("f", 0, 4096, OTHER, "f", 0).end();
        let err = refused(&w, None, "clones from subvolume 33333333-3333-3333-3333-333333333333");
        assert!(err.to_string().contains("command #5") && err.to_string().contains("\"f\""), "{err}");
        // From the parent, in an incremental stream: fine; from a third subvolume: not.
        let mut w = StreamWriter::new(2);
        w.snapshot("v2", OWN, PARENT).mkfile("g").clone_range("g", 0, 10, PARENT, "f", 0).end();
        let s = validate_stream(&w.bytes()[..], Some(Uuid(PARENT))).unwrap();
        assert_eq!(s.parent_uuid, Some(Uuid(PARENT)));
        let mut w = StreamWriter::new(2);
        w.snapshot("v2", OWN, PARENT).mkfile("g").clone_range("g", 0, 10, OTHER, "f", 0).end();
        refused(&w, Some(PARENT), "neither this subvolume");
        // The source must be a file of the tree it names.
        let mut w = full();
        w.mkfile("f").mkdir("d").clone_range("f", 0, 10, OWN, "d", 0).end();
        refused(&w, None, "not a regular file");
    }

    #[test]
    fn refuses_wrong_parents() {
        let mut w = StreamWriter::new(2);
        w.snapshot("v2", OWN, OTHER).end();
        refused(&w, Some(PARENT), "the declared parent is 22222222");
        refused(&w, None, "no parent was declared");
        let w = kernel_like();
        refused(&w, Some(PARENT), "a full stream, but the parent");
        let mut w = full();
        w.subvol("again", OWN).end();
        refused(&w, None, "a second subvolume");
        let mut w = StreamWriter::new(2);
        w.mkfile("f").end();
        refused(&w, None, "must begin with a subvol");
    }

    #[test]
    fn refuses_unsafe_metadata() {
        for (name, what) in [
            ("btrfs.compression", "btrfs.*"),
            ("security.capability", "capabilities"),
            ("trusted.overlay.redirect", "trusted.*"),
            ("other.x", "only user.*"),
            ("user.", "only user.*"),
        ] {
            let mut w = full();
            w.mkfile("f").set_xattr("f", name, b"zstd").end();
            refused(&w, None, what);
        }
        let mut w = full();
        w.mkfile("f").chmod("f", 0o104755).end();
        refused(&w, None, "beyond 07777");
        let mut w = full();
        w.mkfile("f").truncate("f", MAX_FILE_SIZE + 1).end();
        refused(&w, None, "beyond");
        let mut w = full();
        w.mkfile("f").write("f", u64::MAX - 1, b"xy").end();
        refused(&w, None, "beyond");
        let mut w = full();
        w.mkfile("f").fallocate("f", 0x10, 0, 1).end();
        refused(&w, None, "fallocate mode");
        let mut w = full();
        w.mkfile("f").encoded_write("f", b"compressed").end();
        refused(&w, None, "encoded");
        // A hard link to a directory.
        let mut w = full();
        w.mkdir("d").link("l", "d").end();
        refused(&w, None, "hard link to d, a directory");
    }

    #[test]
    fn refuses_inconsistent_trees() {
        let mut w = full();
        w.write("nothing", 0, b"x").end();
        refused(&w, None, "not present");
        let mut w = full();
        w.mkfile("f").mkfile("f").end();
        refused(&w, None, "already exists");
        let mut w = full();
        w.mkdir("d").mkfile("d/f").rmdir("d").end();
        refused(&w, None, "not empty");
        let mut w = full();
        w.mkdir("d").unlink("d").end();
        refused(&w, None, "unlink removes only");
        let mut w = full();
        w.mkdir("d").rename("d", "d/e").end();
        refused(&w, None, "into itself");
        let mut w = full();
        w.mkdir("d").mkfile("f").rename("f", "d").end();
        refused(&w, None, "cannot replace d");
        let mut w = full();
        w.mkfile("f").mkfile("f/x").end();
        refused(&w, None, "not a directory");
    }

    #[test]
    fn incremental_with_and_without_the_parent_tree() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir(p.join("d")).unwrap();
        std::fs::write(p.join("d/f"), b"old").unwrap();
        std::os::unix::fs::symlink("d", p.join("l")).unwrap();
        let tree = ParentTree::scan(p).unwrap();
        assert_eq!(tree.len(), 3);
        // Writing through the parent's symlink `l`: only the parent tree shows it.
        let mut w = StreamWriter::new(2);
        w.snapshot("v2", OWN, PARENT).write("l/f", 0, b"new").end();
        validate_stream(&w.bytes()[..], Some(Uuid(PARENT))).unwrap();
        let err = validate_stream_against(&w.bytes()[..], Uuid(PARENT), &tree).unwrap_err();
        assert!(err.to_string().contains("l is a symlink"), "{err}");
        // A normal incremental: modify, delete, add, rename.
        let mut w = StreamWriter::new(2);
        w.snapshot("v2", OWN, PARENT)
            .write("d/f", 0, b"new")
            .unlink("l")
            .mkfile("o300-8-0")
            .rename("o300-8-0", "d/g")
            .rename("d", "e")
            .clone_range("e/g", 0, 3, PARENT, "d/f", 0)
            .end();
        validate_stream_against(&w.bytes()[..], Uuid(PARENT), &tree).unwrap();
        // With the tree, paths that are not in the parent are refused.
        let mut w = StreamWriter::new(2);
        w.snapshot("v2", OWN, PARENT).unlink("missing").end();
        validate_stream(&w.bytes()[..], Some(Uuid(PARENT))).unwrap();
        let err = validate_stream_against(&w.bytes()[..], Uuid(PARENT), &tree).unwrap_err();
        assert!(err.to_string().contains("not present"), "{err}");
    }

    #[test]
    fn deep_renames_do_not_overflow() {
        // Nest a directory into another again and again; dropping the model must not recurse.
        let mut w = full();
        w.mkdir("a");
        for i in 0..20_000 {
            w.mkdir("b").rename("a", "b/a").rename("b", "a");
            if i % 5000 == 0 {
                w.utimes("a", 1);
            }
        }
        w.end();
        validate_stream(&w.bytes()[..], None).unwrap();
    }
}
