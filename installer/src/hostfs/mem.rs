//! An in-memory host for tests: the tree under the root as a map of paths to nodes, the
//! backups and the stash as named subtrees, the staging area as published generations,
//! stage links and enabled units. Equality is the whole host, so "as before" is `==`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, anyhow, bail};

use formats::StageName;
use formats::digest::Digest;
use formats::path::TargetPath;

use super::{HostFs, Kept, UnitAction};
use crate::host::TargetState;

/// A node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Link(String),
}

/// A subtree: paths relative to its top ("" is the top itself).
pub type Tree = BTreeMap<String, Node>;

/// Everything the host holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct World {
    /// The tree under the root, by absolute path ("/opt/a"); "/" is implied.
    pub nodes: BTreeMap<String, Node>,
    pub kept: BTreeMap<(Kept, String), Tree>,
    /// Unpacked trees under `.tmp/`.
    pub tmp: BTreeMap<String, Tree>,
    pub generations: BTreeMap<(StageName, u64), Tree>,
    pub stage_links: BTreeMap<StageName, u64>,
    pub units: BTreeSet<String>,
}

/// The in-memory host. Operations take `&self`, as the real host's do.
#[derive(Debug, Default)]
pub struct MemFs {
    pub world: RefCell<World>,
    pub systemctl: bool,
}

fn parent_of(path: &str) -> Option<&str> {
    match path.rsplit_once('/') {
        Some(("", _)) => Some("/"),
        Some((p, _)) => Some(p),
        None => None,
    }
}

impl World {
    /// Whether every directory above `path` is a directory.
    fn parents_are_dirs(&self, path: &str) -> bool {
        let mut p = path;
        while let Some(parent) = parent_of(p) {
            if parent == "/" {
                return true;
            }
            if self.nodes.get(parent) != Some(&Node::Dir) {
                return false;
            }
            p = parent;
        }
        true
    }

    fn node(&self, path: &str) -> Option<&Node> {
        if !self.parents_are_dirs(path) {
            return None;
        }
        self.nodes.get(path)
    }

    /// Takes `path` and everything under it out of the tree.
    fn take(&mut self, path: &str) -> Tree {
        let prefix = format!("{path}/");
        let names: Vec<String> = self.nodes.keys().filter(|k| *k == path || k.starts_with(&prefix)).cloned().collect();
        names
            .into_iter()
            .filter_map(|k| {
                let node = self.nodes.remove(&k)?;
                Some((k[path.len()..].trim_start_matches('/').to_owned(), node))
            })
            .collect()
    }

    fn put(&mut self, path: &str, tree: Tree) {
        for (rel, node) in tree {
            let at = if rel.is_empty() { path.to_owned() } else { format!("{path}/{rel}") };
            self.nodes.insert(at, node);
        }
    }

    /// The staged file `.generations/<stage>/<generation>/<path>`.
    fn staged(&self, staged: &str) -> Result<&Node> {
        // A file extracted into the temp area (`backup restore`).
        if let Some((tmp, path)) = staged.strip_prefix(".tmp/").and_then(|r| r.split_once('/')) {
            return self.tmp.get(tmp).and_then(|t| t.get(path)).ok_or_else(|| anyhow!("{staged} is not there"));
        }
        let mut parts = staged.splitn(4, '/');
        let (Some(".generations"), Some(stage), Some(generation), Some(path)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("{staged} is not a staged path");
        };
        let key: (StageName, u64) = (stage.parse()?, generation.parse()?);
        self.generations.get(&key).and_then(|t| t.get(path)).ok_or_else(|| anyhow!("{staged} is not staged"))
    }
}

impl MemFs {
    pub fn new(systemctl: bool) -> MemFs {
        MemFs { world: RefCell::new(World::default()), systemctl }
    }

    /// A copy of everything the host holds.
    pub fn snapshot(&self) -> World {
        self.world.borrow().clone()
    }

    fn free(w: &World, target: &TargetPath) -> Result<()> {
        if !w.parents_are_dirs(target.as_str()) {
            bail!("{target}: a parent is not a directory");
        }
        if w.nodes.contains_key(target.as_str()) {
            bail!("{target} exists");
        }
        Ok(())
    }
}

impl HostFs for MemFs {
    fn state(&self, target: &TargetPath) -> Result<TargetState> {
        Ok(match self.world.borrow().node(target.as_str()) {
            None => TargetState::Missing,
            Some(Node::Dir) => TargetState::Dir,
            Some(Node::File { .. }) => TargetState::File,
            Some(Node::Link(t)) => TargetState::Symlink(t.clone()),
        })
    }

    fn file_digest(&self, target: &TargetPath) -> Result<Option<Digest>> {
        Ok(match self.world.borrow().node(target.as_str()) {
            Some(Node::File { data, .. }) => Some(Digest::of(data)),
            _ => None,
        })
    }

    fn dir_exists(&self, dir: &TargetPath) -> Result<bool> {
        Ok(self.world.borrow().node(dir.as_str()) == Some(&Node::Dir))
    }

    fn has_kept(&self, area: Kept, name: &str) -> Result<bool> {
        Ok(self.world.borrow().kept.contains_key(&(area, name.to_owned())))
    }

    fn systemctl_available(&self) -> bool {
        self.systemctl
    }

    fn mkdir(&self, dir: &TargetPath) -> Result<()> {
        let mut w = self.world.borrow_mut();
        match w.node(dir.as_str()) {
            // As mkdirat's EEXIST: whatever is there stays (the next step finds out).
            Some(_) => Ok(()),
            None => {
                MemFs::free(&w, dir)?;
                w.nodes.insert(dir.as_str().to_owned(), Node::Dir);
                Ok(())
            }
        }
    }

    fn rmdir_if_empty(&self, dir: &TargetPath) -> Result<()> {
        let mut w = self.world.borrow_mut();
        let prefix = format!("{dir}/");
        if w.node(dir.as_str()) == Some(&Node::Dir) && !w.nodes.keys().any(|k| k.starts_with(&prefix)) {
            w.nodes.remove(dir.as_str());
        }
        Ok(())
    }

    fn replace_symlink(&self, target: &TargetPath, text: &str) -> Result<()> {
        let mut w = self.world.borrow_mut();
        if !w.parents_are_dirs(target.as_str()) {
            bail!("{target}: a parent is not a directory");
        }
        if w.nodes.get(target.as_str()) == Some(&Node::Dir) {
            bail!("{target} is a directory");
        }
        w.nodes.insert(target.as_str().to_owned(), Node::Link(text.to_owned()));
        Ok(())
    }

    fn remove(&self, target: &TargetPath) -> Result<()> {
        let mut w = self.world.borrow_mut();
        match w.node(target.as_str()) {
            Some(Node::Dir) => bail!("{target} is a directory"),
            Some(_) => {
                w.nodes.remove(target.as_str());
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn remove_temp(&self, _target: &TargetPath) -> Result<()> {
        // Every change here is atomic: no temp entries are ever left.
        Ok(())
    }

    fn move_out(&self, target: &TargetPath, area: Kept, name: &str) -> Result<()> {
        let mut w = self.world.borrow_mut();
        if w.node(target.as_str()).is_none() {
            bail!("{target} does not exist");
        }
        if w.kept.contains_key(&(area, name.to_owned())) {
            bail!("{name} exists");
        }
        let tree = w.take(target.as_str());
        w.kept.insert((area, name.to_owned()), tree);
        Ok(())
    }

    fn move_in(&self, area: Kept, name: &str, target: &TargetPath) -> Result<()> {
        let mut w = self.world.borrow_mut();
        MemFs::free(&w, target)?;
        let tree = w.kept.remove(&(area, name.to_owned())).ok_or_else(|| anyhow!("{name} does not exist"))?;
        w.put(target.as_str(), tree);
        Ok(())
    }

    fn write_new(&self, target: &TargetPath, bytes: &[u8], mode: u32) -> Result<()> {
        let mut w = self.world.borrow_mut();
        if !w.parents_are_dirs(target.as_str()) {
            bail!("{target}: a parent is not a directory");
        }
        if w.nodes.get(target.as_str()) == Some(&Node::Dir) {
            bail!("{target} is a directory");
        }
        w.nodes.insert(target.as_str().to_owned(), Node::File { data: bytes.to_vec(), mode });
        Ok(())
    }

    /// Decryption is modelled as a copy: the staged file's bytes are the "plaintext".
    fn secret_at(&self, target: &TargetPath, staged: &str) -> Result<bool> {
        let w = self.world.borrow();
        // Not staged (yet, or any more): nothing at the target can be what it decrypts to.
        let Ok(Node::File { data, .. }) = w.staged(staged) else { return Ok(false) };
        Ok(matches!(w.node(target.as_str()), Some(Node::File { data: held, .. }) if held == data))
    }

    fn decrypt_in(&self, staged: &str, target: &TargetPath, mode: u32) -> Result<()> {
        self.copy_in(staged, target, mode)
    }

    fn copy_in(&self, staged: &str, target: &TargetPath, mode: u32) -> Result<()> {
        let mut w = self.world.borrow_mut();
        let Node::File { data, .. } = w.staged(staged)?.clone() else { bail!("{staged} is not a file") };
        if !w.parents_are_dirs(target.as_str()) {
            bail!("{target}: a parent is not a directory");
        }
        if w.nodes.get(target.as_str()) == Some(&Node::Dir) {
            bail!("{target} is a directory");
        }
        w.nodes.insert(target.as_str().to_owned(), Node::File { data, mode });
        Ok(())
    }

    fn publish_generation(&self, stage: &StageName, generation: u64, tmp: &str) -> Result<()> {
        let mut w = self.world.borrow_mut();
        let key = (stage.clone(), generation);
        if w.generations.contains_key(&key) {
            return Ok(());
        }
        let tree = w.tmp.remove(tmp).ok_or_else(|| anyhow!(".tmp/{tmp} does not exist"))?;
        w.generations.insert(key, tree);
        Ok(())
    }

    fn unpublish_generation(&self, stage: &StageName, generation: u64) -> Result<()> {
        self.world.borrow_mut().generations.remove(&(stage.clone(), generation));
        Ok(())
    }

    fn set_aside_generation(&self, stage: &StageName, generation: u64, name: &str) -> Result<()> {
        let mut w = self.world.borrow_mut();
        if let Some(tree) = w.generations.remove(&(stage.clone(), generation)) {
            w.kept.insert((Kept::Stash, name.to_owned()), tree);
        }
        Ok(())
    }

    fn take_back_generation(&self, stage: &StageName, generation: u64, name: &str) -> Result<()> {
        let mut w = self.world.borrow_mut();
        let key = (stage.clone(), generation);
        if w.generations.contains_key(&key) {
            bail!(".generations/{stage}/{generation} is not free");
        }
        let tree = w
            .kept
            .remove(&(Kept::Stash, name.to_owned()))
            .ok_or_else(|| anyhow!("journal/stash/{name} does not exist"))?;
        w.generations.insert(key, tree);
        Ok(())
    }

    fn set_stage_link(&self, stage: &StageName, generation: Option<u64>) -> Result<()> {
        let mut w = self.world.borrow_mut();
        match generation {
            Some(g) => w.stage_links.insert(stage.clone(), g),
            None => w.stage_links.remove(stage),
        };
        Ok(())
    }

    fn unit(&self, action: UnitAction, unit: &str) -> Result<()> {
        let mut w = self.world.borrow_mut();
        match action {
            UnitAction::Enable => w.units.insert(unit.to_owned()),
            UnitAction::Disable => w.units.remove(unit),
        };
        Ok(())
    }
}
