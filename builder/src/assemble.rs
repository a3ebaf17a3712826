//! Assembling a stage tree: which paths an image stages, from where, with which modes.
//!
//! The tree of a stage folder is every file below it except the top-level `manifest.yaml`
//! and top-level names starting with `.` (`.gitignore`, `.git`), plus the `sources:`
//! overlaid on it. Symlinks are kept as links when they stay inside the stage; anything
//! else (links out, devices, fifos, sockets, names that are not UTF-8) is refused.
//!
//! Modes are normalised: directories 0755, files 0755 when the owner may execute them and
//! 0644 otherwise, unless a `files:` entry declares a mode for that path. setuid, setgid and
//! sticky bits come only from a declared mode.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use formats::manifest::{EntryKind, FileSpec, MAX_ENTRIES, Mode, StageDefinition};
use formats::path::{RelPath, confine_link};

use crate::error::InputError;

const DIR_MODE: Mode = Mode::new(0o755).expect("valid");
const EXEC_MODE: Mode = Mode::new(0o755).expect("valid");
const FILE_MODE: Mode = Mode::new(0o644).expect("valid");

const LINK_MODE: Mode = Mode::new(0o777).expect("valid");

/// One path of the assembled tree: its kind decides what else it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir {
        mode: Mode,
    },
    /// A file, its content read from `from` (`size` bytes when assembled).
    File {
        mode: Mode,
        from: PathBuf,
        size: u64,
    },
    /// A symlink with its link text (no mode of its own).
    Symlink {
        link: String,
    },
}

impl Node {
    pub(crate) const DIR: Node = Node::Dir { mode: DIR_MODE };

    pub fn kind(&self) -> EntryKind {
        match self {
            Node::Dir { .. } => EntryKind::Dir,
            Node::File { .. } => EntryKind::File,
            Node::Symlink { .. } => EntryKind::Symlink,
        }
    }

    /// The mode staged: a symlink's is 0777.
    pub fn mode(&self) -> Mode {
        match self {
            Node::Dir { mode } | Node::File { mode, .. } => *mode,
            Node::Symlink { .. } => LINK_MODE,
        }
    }

    /// Bytes of content (files; 0 for the rest).
    pub fn size(&self) -> u64 {
        match self {
            Node::File { size, .. } => *size,
            _ => 0,
        }
    }
}

/// The assembled tree, sorted by path (parents before children).
#[derive(Debug, Default, Clone)]
pub struct Tree {
    pub nodes: BTreeMap<RelPath, Node>,
}

impl Tree {
    /// Total bytes of file content.
    pub fn content_bytes(&self) -> u64 {
        self.nodes.values().map(Node::size).sum()
    }

    /// Inserts `path`, with its missing ancestors as directories.
    fn insert(&mut self, path: RelPath, node: Node, origin: &Path) -> Result<(), InputError> {
        for a in path.ancestors() {
            match self.nodes.get(&a) {
                Some(n) if n.kind() != EntryKind::Dir => {
                    return Err(InputError::Path {
                        path: origin.to_owned(),
                        reason: format!("{path} would be staged below {a}, which is not a directory"),
                    });
                }
                Some(_) => {}
                None => {
                    self.nodes.insert(a, Node::DIR);
                }
            }
        }
        self.insert_below_dir(path, node, |_| origin.to_owned())
    }

    /// Inserts `path` whose parent is known to be a staged directory (one a walk has just
    /// inserted): its ancestors are not looked up again.
    /// `origin` names where it comes from, in an error.
    fn insert_below_dir(
        &mut self,
        path: RelPath,
        node: Node,
        origin: impl Fn(&RelPath) -> PathBuf,
    ) -> Result<(), InputError> {
        use std::collections::btree_map::Entry;
        let is_dir = node.kind() == EntryKind::Dir;
        let full = self.nodes.len() >= MAX_ENTRIES;
        match self.nodes.entry(path) {
            Entry::Vacant(v) if full => {
                Err(InputError::Path { path: origin(v.key()), reason: format!("more than {MAX_ENTRIES} entries") })
            }
            Entry::Vacant(v) => {
                v.insert(node);
                Ok(())
            }
            Entry::Occupied(o) if (o.get().kind() == EntryKind::Dir) != is_dir => Err(InputError::Path {
                path: origin(o.key()),
                reason: format!("{} is staged twice, once as a directory and once not", o.key()),
            }),
            Entry::Occupied(mut o) => {
                o.insert(node);
                Ok(())
            }
        }
    }

    /// Adds `fs_path` (a file, link or directory tree) at `at`; with `at` = `None` the
    /// contents of the directory `fs_path` go to the top, skipping `skip_top` names.
    ///
    /// `fs_path` itself is staged as it is: a link is staged as a link (inside the stage),
    /// never copied through. With `at` = `None` it is the stage folder, which may be a
    /// link to one.
    pub fn add(
        &mut self,
        fs_path: &Path,
        at: Option<&RelPath>,
        skip_top: &dyn Fn(&str) -> bool,
    ) -> Result<(), InputError> {
        if let Some(at) = at {
            check_reserved(at, fs_path)?;
            let node = node_for(fs_path, at)?;
            let is_dir = node.kind() == EntryKind::Dir;
            self.insert(at.clone(), node, fs_path)?;
            if !is_dir {
                return Ok(());
            }
        }
        // Sorted, each directory before what it holds: nothing below a directory of the
        // walk looks its ancestors up again.
        let origin = |path: &RelPath| {
            let below = match at {
                Some(at) => path.as_str().strip_prefix(at.as_str()).unwrap_or_default().trim_start_matches('/'),
                None => path.as_str(),
            };
            fs_path.join(below)
        };
        for (path, node) in crate::walk::walk(fs_path, at, skip_top)? {
            self.insert_below_dir(path, node, origin)?;
        }
        Ok(())
    }

    /// Applies the modes declared in `files:` and checks every listed path is staged.
    pub fn apply_file_specs(
        &mut self,
        files: &[FileSpec],
        manifest: &Path,
        stage_dir: &Path,
    ) -> Result<(), InputError> {
        for (i, f) in files.iter().enumerate() {
            let Some(node) = self.nodes.get_mut(&f.path) else {
                return Err(InputError::Field {
                    file: manifest.to_owned(),
                    field: format!("files[{i}].path"),
                    reason: format!("{} does not exist in the stage folder {}", f.path, stage_dir.display()),
                });
            };
            // A secret's ciphertext is staged with its target's mode: 0600 unless declared.
            let declared = if f.kind == formats::manifest::FileType::Secret { Some(f.secret_mode()) } else { f.mode };
            if let Some(declared) = declared {
                match node {
                    Node::Dir { mode } | Node::File { mode, .. } => *mode = declared,
                    Node::Symlink { .. } => {
                        return Err(InputError::Field {
                            file: manifest.to_owned(),
                            field: format!("files[{i}].mode"),
                            reason: format!("{} is a symlink, which has no mode of its own", f.path),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Refuses the names the image format reserves.
pub(crate) fn check_reserved(path: &RelPath, fs_path: &Path) -> Result<(), InputError> {
    if path.file_name().starts_with(formats::payload::WHITEOUT_PREFIX) || path.as_str() == "manifest.json" {
        return Err(InputError::Path {
            path: fs_path.to_owned(),
            reason: format!(
                "{path}: names starting with {:?} (OCI whiteouts) and a top-level manifest.json are reserved; rename it",
                formats::payload::WHITEOUT_PREFIX
            ),
        });
    }
    Ok(())
}

fn node_for(fs_path: &Path, path: &RelPath) -> Result<Node, InputError> {
    let meta = fs::symlink_metadata(fs_path)
        .map_err(|e| InputError::Path { path: fs_path.to_owned(), reason: e.to_string() })?;
    node_of(fs_path, path, &meta)
}

/// The node of `fs_path`, staged at `path`, of metadata `meta` (not following a link).
pub(crate) fn node_of(fs_path: &Path, path: &RelPath, meta: &fs::Metadata) -> Result<Node, InputError> {
    let ft = meta.file_type();
    let bad = |reason: String| InputError::Path { path: fs_path.to_owned(), reason };
    if ft.is_dir() {
        Ok(Node::DIR)
    } else if ft.is_file() {
        let mode = if meta.permissions().mode() & 0o100 != 0 { EXEC_MODE } else { FILE_MODE };
        Ok(Node::File { mode, from: fs_path.to_owned(), size: meta.len() })
    } else if ft.is_symlink() {
        let link = fs::read_link(fs_path).map_err(|e| bad(e.to_string()))?;
        let link = link.to_str().ok_or_else(|| bad("the link text is not valid UTF-8".into()))?.to_owned();
        confine_link(path, &link)
            .map_err(|e| bad(format!("{e}; make it a relative link inside the stage, or copy the file in")))?;
        Ok(Node::Symlink { link })
    } else {
        let what = if ft.is_fifo() {
            "a fifo"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_block_device() || ft.is_char_device() {
            "a device node"
        } else {
            "not a file, directory or symlink"
        };
        Err(bad(format!("{what} cannot be staged; remove it from the stage folder")))
    }
}

/// Assembles the tree of a stage folder with its `sources:` overlaid.
pub fn stage_tree(stage_dir: &Path, manifest: &Path, def: &StageDefinition) -> Result<Tree, InputError> {
    let mut tree = Tree::default();
    tree.add(stage_dir, None, &|name| name == "manifest.yaml" || name.starts_with('.'))?;
    for (i, s) in def.sources.iter().enumerate() {
        let from = stage_dir.join(&s.from);
        if fs::symlink_metadata(&from).is_err() {
            return Err(InputError::Field {
                file: manifest.to_owned(),
                field: format!("sources[{i}].from"),
                reason: format!("{} does not exist; does a `build:` step make it?", from.display()),
            });
        }
        // Replace what the folder had there: a source overrides the checked-in file.
        tree.nodes.retain(|p, _| !p.starts_with(&s.to));
        tree.add(&from, Some(&s.to), &|_| false)?;
    }
    tree.apply_file_specs(&def.files, manifest, stage_dir)?;
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn def(yaml: &str) -> StageDefinition {
        StageDefinition::parse(yaml, Path::new("manifest.yaml")).unwrap()
    }

    #[test]
    fn tree_of_a_folder() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        fs::create_dir_all(s.join("bin")).unwrap();
        fs::create_dir_all(s.join(".git")).unwrap();
        fs::write(s.join("manifest.yaml"), "x").unwrap();
        fs::write(s.join("bin/tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(s.join("bin/tool"), fs::Permissions::from_mode(0o4775)).unwrap();
        fs::write(s.join("conf"), "a=1\n").unwrap();
        fs::write(s.join("out.txt"), "built\n").unwrap();
        symlink("tool", s.join("bin/alias")).unwrap();
        let def = def(
            "version: 1.0.0\nfiles:\n  - path: conf\n    target: /etc/op-dbus/conf\n    mode: 0600\nsources:\n  - from: out.txt\n    to: share/out.txt\n",
        );
        let t = stage_tree(s, &s.join("manifest.yaml"), &def).unwrap();
        let names: Vec<_> = t.nodes.keys().map(|p| p.as_str()).collect();
        assert_eq!(names, ["bin", "bin/alias", "bin/tool", "conf", "out.txt", "share", "share/out.txt"]);
        let tool = &t.nodes[&"bin/tool".parse().unwrap()];
        assert_eq!(tool.mode().bits(), 0o755, "setuid dropped, exec kept");
        assert_eq!(t.nodes[&"conf".parse().unwrap()].mode().bits(), 0o600);
        assert_eq!(t.nodes[&"bin/alias".parse().unwrap()], Node::Symlink { link: "tool".into() });
        assert_eq!(t.nodes[&"share".parse().unwrap()], Node::Dir { mode: DIR_MODE });
        assert!(
            matches!(&t.nodes[&"share/out.txt".parse().unwrap()], Node::File { size: 6, from, .. } if from.ends_with("out.txt"))
        );
    }

    #[test]
    fn refusals() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        fs::write(s.join("manifest.yaml"), "x").unwrap();
        symlink("/etc/passwd", s.join("evil")).unwrap();
        let e = stage_tree(s, &s.join("manifest.yaml"), &def("version: 1.0.0\n")).unwrap_err().to_string();
        assert!(e.contains("evil") && e.contains("outside"), "{e}");
        fs::remove_file(s.join("evil")).unwrap();
        let e = stage_tree(
            s,
            &s.join("manifest.yaml"),
            &def("version: 1.0.0\nfiles:\n  - path: bin/x\n    target: /usr/local/bin/x\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("files[0].path") && e.contains("does not exist"), "{e}");
        let e = stage_tree(s, &s.join("manifest.yaml"), &def("version: 1.0.0\nsources:\n  - from: nope\n    to: x\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sources[0].from"), "{e}");
        nix_mkfifo(&s.join("fifo"));
        let e = stage_tree(s, &s.join("manifest.yaml"), &def("version: 1.0.0\n")).unwrap_err().to_string();
        assert!(e.contains("fifo"), "{e}");
    }

    #[test]
    fn a_source_that_links_to_a_folder_is_staged_as_the_link() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        fs::write(s.join("manifest.yaml"), "x").unwrap();
        fs::create_dir_all(s.join("real/sub")).unwrap();
        fs::write(s.join("real/sub/x"), "x").unwrap();
        symlink("real", s.join("alias")).unwrap();
        let def = def("version: 1.0.0\nsources:\n  - from: alias\n    to: share\n");
        let t = stage_tree(s, &s.join("manifest.yaml"), &def).unwrap();
        let names: Vec<_> = t.nodes.iter().map(|(p, n)| format!("{p} {:?}", n.kind())).collect();
        assert_eq!(names, ["alias Symlink", "real Dir", "real/sub Dir", "real/sub/x File", "share Symlink"]);
        assert_eq!(t.nodes[&"share".parse().unwrap()], Node::Symlink { link: "real".into() });
        // The stage folder itself may be a link to one.
        symlink(s, d.path().with_extension("link")).unwrap();
        let via = d.path().with_extension("link");
        let t = stage_tree(&via, &via.join("manifest.yaml"), &self::def("version: 1.0.0\n")).unwrap();
        assert_eq!(t.nodes.len(), 4);
        fs::remove_file(&via).unwrap();
    }

    #[test]
    fn reserved_names_and_names_that_are_not_utf8_are_refused_at_any_depth() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        fs::write(s.join("manifest.yaml"), "x").unwrap();
        fs::create_dir_all(s.join("a/b")).unwrap();
        fs::write(s.join("a/b/.wh.x"), "").unwrap();
        let e = stage_tree(s, &s.join("manifest.yaml"), &def("version: 1.0.0\n")).unwrap_err().to_string();
        assert!(e.contains("a/b/.wh.x") && e.contains("reserved"), "{e}");
        fs::remove_file(s.join("a/b/.wh.x")).unwrap();
        fs::write(s.join("manifest.json"), "{}").unwrap();
        let e = stage_tree(s, &s.join("manifest.yaml"), &def("version: 1.0.0\n")).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("reserved"), "{e}");
        fs::remove_file(s.join("manifest.json")).unwrap();
        fs::write(s.join("a").join(std::ffi::OsStr::from_bytes(b"\xff")), "").unwrap();
        let e = stage_tree(s, &s.join("manifest.yaml"), &def("version: 1.0.0\n")).unwrap_err().to_string();
        assert!(e.contains("not valid UTF-8"), "{e}");
    }

    fn nix_mkfifo(p: &Path) {
        let st = std::process::Command::new("mkfifo").arg(p).status().unwrap();
        assert!(st.success());
    }
}
