//! The command line of `op-dbus-stage` (docs/commands.md): clap types and the one dispatch.
// Doc comments on the clap types below are `--help` text, written for a terminal:
// `HOST[:PORT]` there is command-line syntax, not a rustdoc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use formats::StageName;

use crate::error;
use crate::ops::{self, Ctx, Options};
use crate::receive::Source;

/// Verifies, stages, activates and rolls back op-dbus stage images.
#[derive(Debug, Parser)]
#[command(name = "op-dbus-stage", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags accepted before or after the subcommand.
#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// The root to install into, treated like a chroot.
    #[arg(long, global = true, default_value = "/")]
    pub root: PathBuf,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print the plan and change nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// More log output.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// How long to wait for another operation's lock, in seconds.
    #[arg(long, global = true, default_value_t = 30, value_name = "SECONDS")]
    pub lock_timeout: u64,
    /// Install a version older than one installed before.
    #[arg(long, global = true)]
    pub allow_downgrade: bool,
    /// Accept signatures past their signed expiry.
    #[arg(long, global = true)]
    pub allow_expired: bool,
    #[command(flatten)]
    pub registry: crate::receive::RegistryOpts,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the staging area, the store and the trust store.
    Init,
    /// Manage the keys this host trusts.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Verify, receive and activate images from SOURCE: FILE.oci.tar, an OCI layout
    /// directory, NAME[:VERSION] of the local store, HOST[:PORT]/REPO:TAG in a registry,
    /// or - (an .oci.tar on stdin).
    Deploy { source: String },
    /// Same as deploy (the name the users' documents use).
    DeployFromImage { source: String },
    /// Verify and store images from SOURCE without activating them.
    Receive { source: String },
    /// Deployed stages and the images available in the store.
    List,
    /// What is deployed, by whom signed, unfinished transactions, broken links.
    Status,
    /// Check links, staged files against their signed hashes, and verify commands.
    Verify { stage: Option<StageName> },
    /// Go back to the previous generation of STAGE (or of every stage, or to a snapshot).
    Rollback(RollbackOpts),
    /// List the restore points, with the bytes of the generations they keep.
    Snapshots,
    /// Return the whole host to a snapshot.
    Restore { snapshot: String },
    /// Deactivate a stage: remove its links and copies, restore what they displaced.
    Remove { stage: StageName },
    /// Put back missing or changed links of a stage.
    FixSymlinks { stage: StageName },
    /// Delete old generations, keeping N per stage (and those snapshots need).
    Gc {
        #[arg(long, default_value_t = 2)]
        keep: usize,
    },
    /// Finish an interrupted transaction (every changing command does this first).
    Recover,
}

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Trust a public key (SPKI PEM), optionally only for stage names matching GLOB.
    Add {
        file: PathBuf,
        #[arg(long)]
        scope: Vec<String>,
    },
    /// The trusted keys, their scopes and revocations.
    List,
    /// Revoke a key id: its signatures no longer count.
    Revoke { key_id: keys::KeyId },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RollbackOpts {
    pub stage: Option<StageName>,
    #[arg(long)]
    pub all: bool,
    #[arg(long)]
    pub snapshot: Option<String>,
}

/// Parses the arguments, runs the command and returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { error::USAGE } else { error::OK };
            let _ = e.print();
            return code;
        }
    };
    let level = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    let cli_root = cli.global.root.clone();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("op-dbus-stage: error: {e:#}");
            if no_space(&e) {
                eprintln!(
                    "op-dbus-stage: the filesystem is full: free some space under {} and run the command again                      (nothing was changed; `op-dbus-stage gc` removes old generations)",
                    cli_root.display()
                );
            }
            error::exit_code(&e)
        }
    }
}

/// Whether an error comes from a full filesystem (ENOSPC or EDQUOT).
fn no_space(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().and_then(|io| io.raw_os_error()).is_some_and(|n| n == 28 || n == 122)
            || c.downcast_ref::<formats::unpack::UnpackError>()
                .is_some_and(|u| matches!(u, formats::unpack::UnpackError::NoSpace { .. }))
            || c.to_string().contains("No space left on device")
    })
}

fn emit<T: Serialize>(json: bool, value: &T, text: impl FnOnce(&T) -> String) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, value)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", text(value))?;
    }
    Ok(())
}

fn render_report(r: &ops::Report) -> String {
    let mut s = format!("{}{}\n", if r.dry_run { "would " } else { "" }, r.operation);
    for step in &r.steps {
        s += &format!("  {step}\n");
    }
    for c in &r.checks {
        s += &format!("  verify `{}`: {}\n", c.command, if c.passed { "ok" } else { "FAILED" });
    }
    for n in &r.notes {
        s += &format!("  note: {n}\n");
    }
    for n in &r.snapshots {
        s += &format!("  snapshot {n}\n");
    }
    s
}

/// Runs a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> Result<i32> {
    let g = &cli.global;
    let opts = Options {
        root: g.root.clone(),
        dry_run: g.dry_run,
        quiet: g.quiet,
        lock_timeout: Duration::from_secs(g.lock_timeout),
        allow_downgrade: g.allow_downgrade,
        allow_expired: g.allow_expired,
        keep: 2,
    };
    let json = g.json;
    match cli.command {
        Command::Init => {
            let r = ops::init(&opts)?;
            emit(json, &r, |r| {
                format!(
                    "{}staging {}\nstore {}\ntrusted keys {}\npolicy {}\nbackend {}\n",
                    if opts.dry_run { "would create\n" } else { "" },
                    r.staging.display(),
                    r.store.display(),
                    r.trusted_keys.display(),
                    r.policy.display(),
                    r.backend
                )
            })?;
        }
        Command::Trust(TrustCommand::Add { file, scope }) => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::trust_add(&ctx, &file, &scope)?;
            emit(json, &r, |r| format!("trusted key {} ({})\n", r["key_id"].as_str().unwrap_or(""), r["file"]))?;
        }
        Command::Trust(TrustCommand::List) => {
            let ctx = Ctx::reading(&opts)?;
            let keys = ops::trust_list(&ctx)?;
            emit(json, &serde_json::json!({ "keys": keys }), |_| {
                let mut s = String::new();
                for k in &keys {
                    s += &format!(
                        "{} {}{}{}\n",
                        k.key_id,
                        k.file.display(),
                        if k.scopes.is_empty() { String::new() } else { format!(" scope {}", k.scopes.join(",")) },
                        if k.revoked { " REVOKED" } else { "" }
                    );
                }
                if keys.is_empty() {
                    s += "no trusted keys: add one with `op-dbus-stage trust add KEY.pub`\n";
                }
                s
            })?;
        }
        Command::Trust(TrustCommand::Revoke { key_id }) => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::trust_revoke(&ctx, &key_id)?;
            emit(json, &r, |_| format!("revoked {key_id}\n"))?;
        }
        Command::Deploy { source } | Command::DeployFromImage { source } => {
            deploy(&opts, json, &source, &g.registry, true)?
        }
        Command::Receive { source } => deploy(&opts, json, &source, &g.registry, false)?,
        Command::List => {
            let ctx = Ctx::reading(&opts)?;
            let stages = ops::list(&ctx)?;
            emit(json, &serde_json::json!({ "stages": stages }), |_| {
                let mut s = String::new();
                for l in &stages {
                    s += &format!("{:<32} {:<12} {:<10} {}\n", l.name, l.version, l.status, l.digest);
                }
                if stages.is_empty() {
                    s += "nothing deployed\n";
                }
                s
            })?;
        }
        Command::Status => {
            let ctx = Ctx::reading(&opts)?;
            let st = ops::status(&ctx)?;
            emit(json, &st, |st| {
                let mut s = format!("root {} (staging backend: {})\n", st.root.display(), st.backend);
                for x in &st.stages {
                    s += &format!(
                        "{} {} generation {} {} signed by {} at {}\n",
                        x.name,
                        x.version,
                        x.generation,
                        x.digest,
                        x.signers.join(","),
                        x.deployed_at
                    );
                    for p in &x.previous {
                        s += &format!("  kept: {p}\n");
                    }
                }
                if let Some(t) = &st.unfinished_transaction {
                    s += &format!("unfinished transaction: {t} (run `op-dbus-stage recover`)\n");
                }
                for b in &st.broken_links {
                    s += &format!("broken: {b}\n");
                }
                s
            })?;
        }
        Command::Verify { stage } => {
            let ctx = Ctx::reading(&opts)?;
            let r = ops::verify(&ctx, stage.as_ref())?;
            emit(json, &r, |r| {
                let mut s = String::new();
                for st in &r.stages {
                    s += &format!("{}\n", st.name);
                    for l in &st.links {
                        s += &format!("  link: {l}\n");
                    }
                    for f in &st.files {
                        s += &format!("  file: {f}\n");
                    }
                    for c in &st.checks {
                        s += &format!("  verify `{}`: {}\n", c.command, if c.passed { "ok" } else { "FAILED" });
                    }
                }
                s += if r.ok { "ok\n" } else { "verify FAILED\n" };
                s
            })?;
            if !r.ok {
                return Ok(error::VERIFY_FAILED);
            }
        }
        Command::Rollback(o) => {
            let ctx = Ctx::changing(&opts)?;
            let r = match (o.stage, o.all, o.snapshot) {
                (_, _, Some(snap)) => ops::restore(&ctx, &snap)?,
                (Some(stage), _, _) => ops::rollback(&ctx, &[stage])?,
                _ => ops::rollback(&ctx, &[])?,
            };
            emit(json, &r, render_report)?;
        }
        Command::Snapshots => {
            let ctx = Ctx::reading(&opts)?;
            let list = crate::snapshot::list(&ctx.staging)?;
            emit(json, &serde_json::json!({ "snapshots": list }), |_| {
                let mut s = String::new();
                for x in &list {
                    s += &format!("{:<48} {:>12} bytes  {}\n", x.name, x.bytes, x.stages.join(" "));
                }
                s
            })?;
        }
        Command::Restore { snapshot } => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::restore(&ctx, &snapshot)?;
            emit(json, &r, render_report)?;
        }
        Command::Remove { stage } => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::remove(&ctx, &stage)?;
            emit(json, &r, render_report)?;
        }
        Command::FixSymlinks { stage } => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::fix_symlinks(&ctx, &stage)?;
            emit(json, &r, render_report)?;
        }
        Command::Gc { keep } => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::gc(&ctx, keep)?;
            emit(json, &r, render_report)?;
        }
        Command::Recover => {
            let ctx = Ctx::changing(&opts)?;
            let outcome = ctx.recovered.map(|o| format!("{o:?}").to_lowercase());
            emit(json, &serde_json::json!({ "recovered": outcome }), |_| match &outcome {
                Some(o) => format!("recovered the interrupted transaction: {o}\n"),
                None => "nothing to recover\n".into(),
            })?;
        }
    }
    Ok(error::OK)
}

fn deploy(
    opts: &Options,
    json: bool,
    source: &str,
    registry: &crate::receive::RegistryOpts,
    activate: bool,
) -> Result<()> {
    let source = Source::parse_with(source, registry)?;
    let ctx = Ctx::changing(opts)?;
    let r = ops::deploy(&ctx, &source, activate)?;
    emit(json, &r, |r| {
        let mut s = String::new();
        for v in &r.received {
            s += &format!("verified {} {} signed by {}\n", v.reference, v.digest, v.signers.join(","));
        }
        for d in &r.deployed {
            s += &render_report(d);
        }
        for k in &r.skipped {
            s += &format!("{k}\n");
        }
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let c = Cli::try_parse_from(["op-dbus-stage", "deploy", "x.oci.tar", "--root", "/tmp/r", "--json"]).unwrap();
        assert!(c.global.json);
        assert!(
            Cli::try_parse_from(["op-dbus-stage", "rollback"]).is_err(),
            "rollback needs a stage, --all or --snapshot"
        );
        Cli::try_parse_from(["op-dbus-stage", "rollback", "--all"]).unwrap();
        Cli::try_parse_from(["op-dbus-stage", "--dry-run", "rollback", "--snapshot", "pre-x"]).unwrap();
        Cli::try_parse_from(["op-dbus-stage", "deploy-from-image", "dir"]).unwrap();
        assert!(Cli::try_parse_from(["op-dbus-stage", "trust", "revoke", "nothex"]).is_err());
    }
}
