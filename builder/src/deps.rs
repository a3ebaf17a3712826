//! `export --with-deps`: the stages an image depends on, from the embedded stage manifests'
//! `dependencies`, each resolved to the highest version in the store that matches the
//! requirement, recursively.

use std::collections::VecDeque;

use anyhow::{Result, bail};

use formats::Reference;
use formats::layout::Layout;
use formats::oci::ANNOTATION_REF_NAME;

use crate::inspect::StoredImage;

/// `images` followed by every stage they depend on (transitively), each once.
pub fn with_dependencies(layout: &Layout, images: &[Reference]) -> Result<Vec<Reference>> {
    let tags: Vec<Reference> = layout
        .index()?
        .manifests
        .iter()
        .filter_map(|d| d.annotation(ANNOTATION_REF_NAME))
        .filter_map(|t| t.parse::<Reference>().ok())
        .collect();
    let mut out: Vec<Reference> = Vec::new();
    let mut queue: VecDeque<Reference> = images.iter().cloned().collect();
    while let Some(r) = queue.pop_front() {
        if out.contains(&r) {
            continue;
        }
        let image = StoredImage::load(layout, &r)?;
        for dep in &image.config.dependencies {
            let chosen = out.iter().chain(queue.iter()).find(|x| x.name == dep.stage && dep.matches(&x.version));
            if chosen.is_some() {
                continue;
            }
            let best = tags
                .iter()
                .filter(|t| t.name == dep.stage && dep.matches(&t.version))
                .max_by(|a, b| a.version.cmp(&b.version));
            match best {
                Some(b) => queue.push_back(b.clone()),
                None => bail!(
                    "{r} depends on {dep}, and the store {} has no image of {} that matches: build or pull it first \
                     (see `op-dbus-image list`), or export without --with-deps",
                    layout.root().display(),
                    dep.stage
                ),
            }
        }
        out.push(r);
    }
    Ok(out)
}
