//! The commands that only read: `list`, `status`, `verify`.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use formats::StageName;
use formats::layout::Layout;

use crate::checks::CheckResult;
use crate::commands::repair::{self, GenerationHealth};
use crate::error::Usage;
use crate::host::{STORE, TargetState};
use crate::ops::{Ctx, run_checks};
use crate::state::{Activation, Placement, State};
use crate::txn::Journal;

/// `list`.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub status: &'static str,
    /// A deployed stage whose generation is missing or has lost its manifest, or whose stage
    /// link is gone: what is wrong and the command that rebuilds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Which of `digests` the image store has.
pub fn have(ctx: &Ctx, digests: &[formats::Digest]) -> Result<Vec<formats::Digest>> {
    let Ok(p) = ctx.host.resolve(STORE) else { return Ok(Vec::new()) };
    let Ok(store) = Layout::open(&p) else { return Ok(Vec::new()) };
    let mut out: Vec<formats::Digest> = digests.iter().copied().filter(|d| store.has_blob(d)).collect();
    out.dedup();
    Ok(out)
}

pub fn list(ctx: &Ctx) -> Result<Vec<Listed>> {
    let state = ctx.state()?;
    let mut out: Vec<Listed> = state
        .stages
        .iter()
        .map(|(n, s)| Listed {
            name: n.to_string(),
            version: s.active.version.to_string(),
            digest: s.active.digest.to_string(),
            status: "deployed",
            problem: repair::health(&ctx.staging, n, &s.active, false).problem(n, s.active.generation),
        })
        .collect();
    if let Ok(p) = ctx.host.resolve(STORE)
        && let Ok(store) = Layout::open(&p)
    {
        for d in store.index()?.manifests {
            let Some(tag) = d.annotation(formats::oci::ANNOTATION_REF_NAME) else { continue };
            let Ok(r) = tag.parse::<formats::Reference>() else { continue };
            if state.stages.get(&r.name).is_some_and(|s| s.active.digest == d.digest) {
                continue;
            }
            out.push(Listed {
                name: r.name.to_string(),
                version: r.version.to_string(),
                digest: d.digest.to_string(),
                status: "available",
                problem: None,
            });
        }
    }
    out.sort_by(|a, b| (&a.name, a.status, &a.version).cmp(&(&b.name, b.status, &b.version)));
    Ok(out)
}

/// `status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub root: PathBuf,
    pub backend: &'static str,
    pub stages: Vec<StageStatus>,
    pub unfinished_transaction: Option<String>,
    pub broken_links: Vec<String>,
    /// A deploy awaiting its confirmation (`deploy --confirm-timeout`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub awaiting_confirmation: Option<crate::confirm::Awaiting>,
}

#[derive(Debug, Serialize)]
pub struct StageStatus {
    pub name: String,
    pub version: String,
    pub generation: u64,
    pub digest: String,
    pub signers: Vec<keys::KeyId>,
    pub deployed_at: String,
    pub previous: Vec<String>,
    /// What is wrong with its generation or stage link (see [`Listed::problem`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

pub fn status(ctx: &Ctx) -> Result<Status> {
    let state = ctx.state()?;
    let unfinished = Journal::read(&ctx.staging).ok().flatten().map(|j| j.operation);
    Ok(Status {
        root: ctx.host.root.clone(),
        backend: crate::host::backend(&ctx.staging.dir),
        stages: state
            .stages
            .iter()
            .map(|(n, s)| StageStatus {
                name: n.to_string(),
                version: s.active.version.to_string(),
                generation: s.active.generation,
                digest: s.active.digest.to_string(),
                signers: s.active.signers.clone(),
                deployed_at: s.active.deployed_at.clone(),
                previous: s.previous.iter().map(|g| format!("{} (generation {})", g.version, g.generation)).collect(),
                problem: repair::health(&ctx.staging, n, &s.active, false).problem(n, s.active.generation),
            })
            .collect(),
        unfinished_transaction: unfinished,
        broken_links: link_problems(ctx, &state, None)?,
        awaiting_confirmation: crate::confirm::awaiting(&ctx.staging)?,
    })
}

fn link_problems(ctx: &Ctx, state: &State, only: Option<&StageName>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (target, p) in &state.placed {
        if only.is_some_and(|s| s != &p.stage) {
            continue;
        }
        match &p.how {
            Placement::Symlink { link } => {
                let want = link.clone();
                match ctx.host.state(target)? {
                    TargetState::Symlink(t) if t == want => {
                        let staged = ctx.staging.stage_link(&p.stage).join(p.path.as_str());
                        if fs::symlink_metadata(&staged).is_err() {
                            out.push(format!("{target}: {} is missing", staged.display()));
                        }
                    }
                    other => out.push(format!("{target}: expected a link to {want}, found {other}")),
                }
            }
            Placement::Copy { sha256 } => {
                if ctx.host.file_digest(target)? != Some(*sha256) {
                    out.push(format!(
                        "{target}: the copy differs from the staged file (run `deploy` again to replace it)"
                    ));
                } else {
                    let staged = ctx.staging.stage_link(&p.stage).join(p.path.as_str());
                    out.extend(crate::users::copy_owner_problem(&ctx.host, target, &staged));
                }
            }
            // Checked with the host identity by `secrets::verify_stage`.
            Placement::CopyIfNotExists { .. } | Placement::Secret { .. } => {}
        }
    }
    Ok(out)
}

/// `verify [STAGE]`.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub stages: Vec<StageVerify>,
    pub ok: bool,
    /// `STAGE: PATH` of each secret this host is not a recipient of: `verify` exits 3
    /// (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_for_this_host: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct StageVerify {
    pub name: String,
    /// A missing or damaged generation, or a stage link that does not point at it: what is
    /// wrong and the command that rebuilds it; null when intact.
    pub generation: Option<String>,
    pub links: Vec<String>,
    pub files: Vec<String>,
    /// Secrets whose target is missing, changed, of another mode or owner, or whose
    /// ciphertext does not decrypt with the host identity (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    pub checks: Vec<CheckResult>,
}

#[tracing::instrument(name = "verify", skip(ctx))]
pub fn verify(ctx: &Ctx, only: Option<&StageName>) -> Result<VerifyReport> {
    let state = ctx.state()?;
    if let Some(s) = only
        && !state.stages.contains_key(s)
    {
        return Err(Usage(format!("{s} is not deployed (see `op-dbus-stage list`)")).into());
    }
    let mut stages = Vec::new();
    let mut not_for_this_host = Vec::new();
    for (name, s) in &state.stages {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let health = repair::health(&ctx.staging, name, &s.active, false);
        let generation = health.problem(name, s.active.generation);
        let mut links = link_problems(ctx, &state, Some(name))?;
        // Without its tree (or its manifest) there is nothing to check the files against,
        // and the verify commands would run in a folder that is not there.
        if health.generation != GenerationHealth::Intact {
            stages.push(StageVerify {
                name: name.to_string(),
                generation,
                links,
                files: Vec::new(),
                secrets: Vec::new(),
                checks: Vec::new(),
            });
            continue;
        }
        let config = ctx.config_of(name, s.active.generation)?;
        let dir = ctx.staging.generation(name, s.active.generation);
        let mut files: Vec<String> = formats::unpack::check_tree_ignoring(&dir, &config, &["manifest.json"])
            .with_context(|| format!("checking {}", dir.display()))?
            .into_iter()
            .map(|m| format!("{}: {}", m.path, m.problem))
            .collect();
        files.extend(crate::users::verify_generation(&ctx.host, &dir, &config)?);
        if Activation::of(&config) != s.active.activation {
            files.insert(0, "manifest.json: not the one deployed".into());
        }
        let generation = generation.or_else(|| {
            (!files.is_empty()).then(|| {
                format!(
                    "generation {} is damaged ({} file(s) differ from the signed manifest); \
                     `op-dbus-stage repair {name}` rebuilds it from the image store",
                    s.active.generation,
                    files.len()
                )
            })
        });
        links.extend(crate::plugins::problems(&ctx.host, name, s));
        let found = crate::secrets::verify_stage(&ctx.host, &dir, name, s, &state);
        not_for_this_host.extend(found.not_for_this_host);
        let mut checks = run_checks(ctx, &state, name)?;
        checks.extend(crate::services::checks(&ctx.host, &state, std::slice::from_ref(name))?);
        stages.push(StageVerify { name: name.to_string(), generation, links, files, secrets: found.problems, checks });
    }
    let ok = stages.iter().all(|s| {
        s.generation.is_none()
            && s.links.is_empty()
            && s.files.is_empty()
            && s.secrets.is_empty()
            && s.checks.iter().all(|c| c.passed)
    });
    Ok(VerifyReport { stages, ok, not_for_this_host })
}
