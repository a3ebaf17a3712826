//! The command line of `op-dbus-stage` (docs/commands.md): clap types and the one dispatch.
// Doc comments on the clap types below are `--help` text, written for a terminal:
// `HOST[:PORT]` there is command-line syntax, not a rustdoc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use cli_support::docs::Shell;
use cli_support::{GlobalArgs, Output};
use serde::Serialize;

use crate::error;
use crate::ops::{self, Ctx, Options};
use crate::receive::Source;

/// Verifies, stages, activates and rolls back op-dbus stage images.
///
/// Exit codes: 0 ok; 1 other error; 2 usage, or something named that is not there;
/// 3 signature or trust failure; 4 refused by policy, a dependency or a conflict;
/// 5 a verify command failed (the change was rolled back); 6 another operation holds the
/// lock; 7 malformed or corrupt input.
#[derive(Debug, Parser)]
#[command(name = "op-dbus-stage", version, about, long_about = None, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags accepted before or after the subcommand.
#[derive(Debug, Args)]
pub struct GlobalOpts {
    #[command(flatten)]
    pub common: GlobalArgs,
    /// The root to install into, treated like a chroot.
    #[arg(long, global = true, default_value = "/", value_name = "DIR")]
    pub root: PathBuf,
    /// How long to wait for another operation's lock, in seconds.
    #[arg(long, global = true, default_value_t = 30, value_name = "SECONDS")]
    pub lock_timeout: u64,
    /// Install a version older than one installed before.
    #[arg(long, global = true)]
    pub allow_downgrade: bool,
    /// Accept signatures past their signed expiry.
    #[arg(long, global = true)]
    pub allow_expired: bool,
    /// Abandon a source (stdin, a file, a registry) that sends nothing for this long, in
    /// seconds: nothing is activated, the lock is released, exit 1.
    #[arg(long, global = true, default_value_t = 60, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stall_timeout: u64,
    /// Progress on stderr: auto (a line when stderr is a terminal), json (one event per
    /// line, see docs/json.md) or none.
    #[arg(long, global = true, value_enum, default_value_t = crate::progress::Mode::Auto, value_name = "HOW", hide_possible_values = true)]
    pub progress: crate::progress::Mode,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the root if needed, the staging area, the store, the trust store and the host's
    /// age identity.
    Init,
    /// Print this host's age recipient (age1...), for the `recipients:` of stages with secrets.
    ///
    /// The recipient is the public half of /etc/op-dbus/host.age, the identity `init` creates
    /// (mode 0600, root); activation decrypts `type: secret` files with it.
    Identity,
    /// Manage the keys this host trusts.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Enable or disable host features (for a stage's `requires_feature`).
    #[command(subcommand)]
    Feature(FeatureCommand),
    /// Verify, receive and activate the images of every SOURCE: all of them or none.
    Deploy(DeployOpts),
    /// Same as deploy (the name the users' documents use).
    DeployFromImage(DeployOpts),
    /// Verify and store images from each SOURCE without activating them.
    Receive(SourceOpts),
    /// Deploy the stage that provides plugin NAME: its newest image in SOURCE, else in the
    /// local store. Nothing is done when NAME is registered already, unless --force.
    DeployPlugin(PluginOpts),
    /// Update the stage that provides the registered plugin NAME to its newest image in
    /// SOURCE, else in the local store, when that is newer than the active one.
    UpdatePlugin(PluginOpts),
    /// Deploy what a signed registry channel offers in newer versions than the ones
    /// running, as one transaction (run periodically by dist/systemd/op-dbus-update.timer).
    Update(UpdateOpts),
    /// Deployed stages and the images available in the store.
    List,
    /// Which of the blobs DIGEST... this host's image store has (what a sender that resumes
    /// a cut transfer need not send again).
    Have {
        /// Blob digests (sha256:HEX).
        #[arg(required = true, value_name = "DIGEST")]
        digests: Vec<formats::Digest>,
    },
    /// What is deployed, by whom signed, unfinished transactions, broken links.
    Status,
    /// Check generations, links, staged files against their signed hashes, and verify commands.
    Verify {
        /// Only this stage, by its name or a unique prefix of it (default: every deployed stage).
        stage: Option<String>,
    },
    /// Go back to the previous generation of STAGE (or of every stage, or to a snapshot).
    Rollback(RollbackOpts),
    /// List the restore points, oldest first, with what each keeps alone; prune or keep them.
    Snapshots {
        #[command(subcommand)]
        action: Option<SnapshotsCommand>,
    },
    /// The audit trail: every change, who signed it, its snapshots and outcome.
    History {
        /// Check the log's hash chain; name the first entry edited, removed or cut (exit 5).
        #[arg(long)]
        verify: bool,
    },
    /// Save the stages' data and copied files (their edited configs) in an archive, list,
    /// check, restore and prune such backups.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Return the whole host to a snapshot.
    Restore {
        /// The snapshot's name, as `snapshots` lists it.
        snapshot: String,
        /// Do not ask before removing stages the snapshot does not have.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Deactivate a stage: remove its links and copies, restore what they displaced.
    Remove {
        /// The deployed stage to remove (its name or a unique prefix of it).
        stage: String,
    },
    /// Rebuild missing or damaged generations (and stage links) from the image store.
    Repair {
        /// The stages to repair, by their names or unique prefixes (default: every deployed
        /// stage that needs it).
        #[arg(value_name = "STAGE")]
        stages: Vec<String>,
    },
    /// Put back missing or changed links of a stage, and its missing plugin registrations.
    FixSymlinks {
        /// The deployed stage whose links to repair (its name or a unique prefix of it).
        stage: String,
    },
    /// Delete old generations, keeping N per stage (and those snapshots need).
    Gc {
        /// Previous generations to keep per stage, besides the active one.
        #[arg(long, default_value_t = 2, value_name = "N")]
        keep: usize,
    },
    /// Finish an interrupted transaction, and roll back a deploy that awaited its
    /// confirmation when nothing waits for it any more (every changing command does this first).
    Recover,
    /// Keep a deploy made with --confirm-timeout: its waiter ends, the host stays as it is.
    Confirm {
        /// The token the deploy reported (`confirmation.token` of `deploy --json`).
        token: String,
    },
    /// Waits for the confirmation of a deploy, and rolls it back at the deadline: the
    /// installer's own helper (see `confirm`).
    #[command(name = crate::confirm::WAITER, hide = true)]
    ConfirmWait {
        /// The token of the deploy it waits for.
        token: String,
    },
    /// Print a shell completion script on stdout.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write the man pages into DIR (one NAME.1 per command).
    #[command(hide = true)]
    Man {
        /// The folder to write NAME.1 files into (created if missing).
        dir: PathBuf,
    },
    /// Runs one verify command confined: the installer's own helper (see `sandbox`).
    #[command(name = crate::sandbox::HELPER, hide = true)]
    VerifyConfined {
        /// The user id to run as.
        uid: u32,
        /// The group id to run as.
        gid: u32,
        /// The command, for /bin/sh -c.
        #[arg(last = true, required = true)]
        command: std::ffi::OsString,
    },
}

/// `deploy` and `deploy-from-image`: the sources, and how to apply several images.
#[derive(Debug, Args)]
pub struct DeployOpts {
    #[command(flatten)]
    pub source: SourceOpts,
    /// One transaction per image, in dependency order, instead of one for all: the images
    /// before a failing one stay deployed.
    #[arg(long)]
    pub each: bool,
    /// Also deploy, in the same transaction, the stages the images depend on that are not
    /// deployed in a matching version: the highest matching version in the host's store.
    #[arg(long)]
    pub with_deps: bool,
    /// Mark the snapshots this change takes to keep (retention never prunes them).
    #[arg(long)]
    pub keep: bool,
    /// First take a backup (as `backup create`, without secrets) of the stages being
    /// deployed that are deployed already.
    #[arg(long)]
    pub backup: bool,
    /// After activating, wait this long for `op-dbus-stage confirm TOKEN` (sent over a new
    /// connection); without it the host goes back to the state before the deploy by itself.
    /// 0: no confirmation (the default).
    #[arg(long, default_value_t = 0, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(0..=crate::confirm::MAX_TIMEOUT))]
    pub confirm_timeout: u64,
}

/// `update`: the channel to follow.
#[derive(Debug, Args)]
pub struct UpdateOpts {
    /// The registry and prefix of the channel and its images: HOST[:PORT]/PREFIX (the
    /// channel is HOST[:PORT]/PREFIX:TAG, each image HOST[:PORT]/PREFIX/NAME).
    #[arg(long, required = true, value_name = "REGISTRY/PREFIX")]
    pub from: String,
    /// The channel (a registry tag) to follow.
    #[arg(long, default_value = "stable", value_name = "TAG")]
    pub channel: String,
    /// Also install the stages the channel offers that are not deployed here (by default
    /// only deployed stages are updated, with what they need).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub registry: crate::receive::RegistryOpts,
}

/// Where `deploy` and `receive` take images from, and how to reach a registry.
#[derive(Debug, Args)]
pub struct SourceOpts {
    /// FILE.oci.tar, an OCI layout directory, NAME[:VERSION] of the local store (NAME alone:
    /// its highest version), HOST[:PORT]/REPO:TAG (or @sha256:...) in a registry, or - (an
    /// .oci.tar on stdin). Several sources are deployed together, as one archive is.
    #[arg(required = true, value_name = "SOURCE")]
    pub source: Vec<String>,
    #[command(flatten)]
    pub registry: crate::receive::RegistryOpts,
}

/// The plugin `deploy-plugin` and `update-plugin` act for, and where its stage comes from.
#[derive(Debug, Args)]
pub struct PluginOpts {
    /// The plugin (as a stage's `plugins:` names it).
    #[arg(value_parser = parse_plugin)]
    pub plugin: String,
    /// Where to look for the stage that provides it (as for deploy); default: the local store.
    pub source: Option<String>,
    /// deploy-plugin: deploy the providing stage's newest image even when the plugin is
    /// registered already.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub registry: crate::receive::RegistryOpts,
}

fn parse_plugin(s: &str) -> std::result::Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 128 && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
    if ok && s != "." && s != ".." {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a plugin name (letters, digits, '.', '_', '-')"))
    }
}

#[derive(Debug, Subcommand)]
pub enum SnapshotsCommand {
    /// Apply the retention policy ([snapshots] keep in stage.toml) now: delete the
    /// snapshots it does not keep, then the generations and store images nothing kept needs.
    Prune,
    /// Mark snapshots to keep: retention never prunes them.
    Keep {
        /// Snapshot names, as `snapshots` lists them.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove the keep mark of snapshots (the next prune may delete them).
    Release {
        /// Snapshot names, as `snapshots` lists them.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Save the data paths and the copy / copy-if-not-exists targets of STAGE... (default:
    /// every deployed stage) as they are now, in /var/lib/op-dbus/backups.
    Create(BackupCreateOpts),
    /// The backups, oldest first: time, stages, size.
    List,
    /// What a backup holds: its time, host, stages and every saved path.
    Info {
        /// The backup's name, as `backup list` shows it.
        name: String,
    },
    /// Check a backup: the archive against what was written and every entry's sha256
    /// against its manifest (exit 5 when something does not match).
    Verify {
        /// The backup's name.
        name: String,
        /// The age identity to decrypt an encrypted backup with (default: the host's,
        /// /etc/op-dbus/host.age, when the backup is encrypted to it; without one only the
        /// archive file is checked).
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
    /// Put every path a backup saved back as it was saved, as one transaction. Paths
    /// changed after the backup are refused (exit 4) unless --force.
    Restore {
        /// The backup's name.
        name: String,
        /// Overwrite paths that were changed after the backup too.
        #[arg(long)]
        force: bool,
        /// The age identity to decrypt an encrypted backup with (default: the host's,
        /// /etc/op-dbus/host.age, when the backup is encrypted to it).
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
    /// Apply the retention policy ([backups] keep in stage.toml): delete all but the newest.
    Prune,
}

/// `backup create`.
#[derive(Debug, Args)]
pub struct BackupCreateOpts {
    /// The deployed stages to back up (their names or unique prefixes).
    #[arg(value_name = "STAGE")]
    pub stages: Vec<String>,
    /// Save the stages' secret targets too; needs a recipient (secrets never go in clear).
    #[arg(long)]
    pub include_secrets: bool,
    /// Encrypt the backup to this age recipient (age1...); repeat for more. Stock
    /// `age -d -i IDENTITY` decrypts it.
    #[arg(long, value_name = "AGE1...")]
    pub recipient: Vec<String>,
    /// Encrypt to the recipients listed in FILE (one age1... per line, # comments).
    #[arg(long, value_name = "FILE")]
    pub recipients_file: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Trust a public key (SPKI PEM); --scope adds stage globs it may sign.
    Add {
        /// The public key file (KEY.pub of `op-dbus-image key generate`).
        file: PathBuf,
        /// A stage-name glob (* and ?) the key may sign, added to its scopes; repeat for
        /// more. A key without scopes may sign any stage.
        #[arg(long, value_name = "GLOB")]
        scope: Vec<String>,
        /// Make the given --scope globs the key's only scopes.
        #[arg(long, requires = "scope")]
        replace: bool,
    },
    /// The trusted keys, their scopes and revocations.
    List,
    /// Revoke a key id: its signatures no longer count.
    Revoke {
        /// The key id (16 hex digits, as `trust list` prints it).
        key_id: keys::KeyId,
    },
}

#[derive(Debug, Subcommand)]
pub enum FeatureCommand {
    /// Enable a feature in stage.toml.
    Enable {
        /// The feature name (letters, digits, '.', '_', '-').
        name: String,
    },
    /// Disable a feature in stage.toml.
    Disable {
        /// The feature name.
        name: String,
    },
    /// The features this host enables.
    List,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RollbackOpts {
    /// The stages to roll back to their previous generation (their names or unique prefixes);
    /// a stage on its first generation is removed, as before it was deployed.
    #[arg(value_name = "STAGE")]
    pub stage: Vec<String>,
    /// Roll back every stage that has a previous generation; when every stage is on its
    /// first generation, remove them all (the host as before the earliest deploy).
    #[arg(long)]
    pub all: bool,
    /// Return the whole host to this snapshot (as `restore`).
    #[arg(long, value_name = "NAME")]
    pub snapshot: Option<String>,
    /// With --snapshot: do not ask before removing stages.
    #[arg(long, short = 'y', requires = "snapshot")]
    pub yes: bool,
}

/// Parses the arguments, runs the command and returns the exit code.
pub fn main() -> i32 {
    let cli: Cli = match cli_support::parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    cli_support::init_logging(&cli.global.common);
    let root = cli.global.root.clone();
    let json = cli.global.common.json;
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let hint = format!(
                "the filesystem is full: free some space under {} and run the command again \
                 (nothing was changed; `op-dbus-stage gc` removes old generations)",
                root.display()
            );
            let rewrite = |m: String| with_root(&m, &root);
            cli_support::report_error("op-dbus-stage", json, &e, cli_support::classify(&e), &hint, &rewrite)
        }
    }
}

/// The commands a message names, with `--root ROOT` when the root is not `/`, so that
/// every hint can be run as printed.
pub fn with_root(text: &str, root: &Path) -> String {
    if root == Path::new("/") {
        return text.to_owned();
    }
    text.replace("`op-dbus-stage ", &format!("`op-dbus-stage --root {} ", root.display()))
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
    for n in &r.pruned {
        s += &format!("  pruned snapshot {n}\n");
    }
    let gen_line = |g: &ops::GenerationRef| {
        format!("{} generation {} ({})", g.stage, g.generation, cli_support::human_bytes(g.bytes))
    };
    for g in &r.removed {
        s += &format!("  {} {}\n", if r.dry_run { "would remove" } else { "removed" }, gen_line(g));
    }
    for g in &r.kept {
        s += &format!("  kept {} ({})\n", gen_line(g), g.reason.unwrap_or(""));
    }
    if r.operation.starts_with("gc") && r.removed.is_empty() {
        s += "  nothing to remove\n";
    }
    s
}

/// `identity --json`.
#[derive(Debug, Serialize)]
pub struct IdentityDoc {
    /// The host's age X25519 recipient (`age1...`).
    pub recipient: String,
    /// The identity file it is the public half of.
    pub identity: PathBuf,
}

/// `have --json`.
#[derive(Debug, Serialize)]
pub struct HaveDoc {
    pub have: Vec<formats::Digest>,
}

/// `list --json`.
#[derive(Debug, Serialize)]
pub struct ListDoc {
    pub stages: Vec<ops::Listed>,
}

/// `trust list --json`.
#[derive(Debug, Serialize)]
pub struct TrustListDoc {
    pub keys: Vec<ops::TrustedInfo>,
}

/// `feature list --json`.
#[derive(Debug, Serialize)]
pub struct FeaturesDoc {
    pub features: Vec<String>,
}

/// `snapshots --json`.
#[derive(Debug, Serialize)]
pub struct SnapshotsDoc {
    pub snapshots: Vec<crate::snapshot::SnapshotInfo>,
}

/// `recover --json`.
#[derive(Debug, Serialize)]
pub struct RecoverDoc {
    /// What recovery did: `completed`, `rolled-back`, or null when nothing was pending.
    pub recovered: Option<crate::txn::RecoverOutcome>,
    /// The deploy rolled back because it awaited a confirmation nothing waited for any more
    /// (the host restarted): its operation. Absent when there was none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unconfirmed: Option<String>,
}

fn outcome_text(o: crate::txn::RecoverOutcome) -> &'static str {
    match o {
        crate::txn::RecoverOutcome::Completed => "completed",
        crate::txn::RecoverOutcome::RolledBack => "rolled back",
    }
}

/// Runs a parsed command line; returns the exit code.
pub fn run(cli: Cli) -> Result<i32> {
    let g = &cli.global;
    let opts = Options {
        root: g.root.clone(),
        dry_run: g.common.dry_run,
        quiet: g.common.quiet,
        lock_timeout: Duration::from_secs(g.lock_timeout),
        allow_downgrade: g.allow_downgrade,
        allow_expired: g.allow_expired,
        keep: 2,
        keep_snapshots: matches!(&cli.command, Command::Deploy(o) | Command::DeployFromImage(o) if o.keep),
        backup_first: matches!(&cli.command, Command::Deploy(o) | Command::DeployFromImage(o) if o.backup),
        stall_timeout: Duration::from_secs(g.stall_timeout),
    };
    crate::progress::init(g.progress, g.common.quiet);
    let out = Output::new(&g.common);
    let root = g.root.clone();
    let hint = move |s: String| with_root(&s, &root);
    match cli.command {
        Command::VerifyConfined { uid, gid, command } => {
            // Returns only when the command could not be confined (or /bin/sh not executed).
            let e = crate::sandbox::exec_confined(uid, gid, &command);
            eprintln!("{} {e}", crate::sandbox::FAILED);
            return Ok(crate::sandbox::FAILED_EXIT);
        }
        Command::Completions { shell } => {
            cli_support::docs::completions(Cli::command(), shell)?;
        }
        Command::Man { dir } => {
            let written = cli_support::docs::man_pages(Cli::command(), &dir)?;
            out.emit(&written, |w| w.iter().map(|p| format!("wrote {}\n", p.display())).collect())?;
        }
        Command::Init => {
            let r = ops::init(&opts)?;
            out.emit(&r, |r| render_init(r, opts.dry_run))?;
        }
        Command::Identity => {
            let host = crate::host::Host::open(&opts.root)?;
            let id = crate::identity::load(&host)?;
            let doc = IdentityDoc {
                recipient: id.recipient().to_string(),
                identity: opts.root.join(crate::identity::IDENTITY),
            };
            out.emit(&doc, |d| format!("{}\n", d.recipient))?;
        }
        Command::Trust(TrustCommand::Add { file, scope, replace }) => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::trust_add(&ctx, &file, &scope, replace)?;
            if !r.dry_run {
                crate::history::record_event(&ctx, &format!("trust add {}", r.key_id), &[])?;
            }
            out.emit(&r, |r| {
                format!(
                    "{}trusted key {} ({}) for {}\n",
                    if r.dry_run { "would have " } else { "" },
                    r.key_id,
                    r.file.display(),
                    if r.scopes.is_empty() { "any stage".to_owned() } else { r.scopes.join(", ") }
                )
            })?;
        }
        Command::Trust(TrustCommand::List) => {
            let ctx = Ctx::reading(&opts)?;
            let doc = TrustListDoc { keys: ops::trust_list(&ctx)? };
            out.emit(&doc, |d| render_trust_list(d, &opts.root))?;
        }
        Command::Trust(TrustCommand::Revoke { key_id }) => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::trust_revoke(&ctx, &key_id)?;
            if !r.dry_run {
                crate::history::record_event(&ctx, &format!("trust revoke {key_id}"), &[])?;
            }
            out.emit(&r, |r| format!("{}revoked {key_id}\n", if r.dry_run { "would have " } else { "" }))?;
        }
        Command::Feature(FeatureCommand::Enable { name }) | Command::Feature(FeatureCommand::Disable { name })
            if name.is_empty() =>
        {
            return Err(crate::error::Usage("a feature name is not empty".into()).into());
        }
        Command::Feature(FeatureCommand::Enable { name }) => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::set_feature(&ctx, &name, true)?;
            if !r.dry_run {
                crate::history::record_event(&ctx, &format!("feature enable {name}"), &[])?;
            }
            out.emit(&r, render_feature)?;
        }
        Command::Feature(FeatureCommand::Disable { name }) => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::set_feature(&ctx, &name, false)?;
            if !r.dry_run {
                crate::history::record_event(&ctx, &format!("feature disable {name}"), &[])?;
            }
            out.emit(&r, render_feature)?;
        }
        Command::Feature(FeatureCommand::List) => {
            let ctx = Ctx::reading(&opts)?;
            let trust = crate::receive::Trust::load(&ctx.host)?;
            let doc = FeaturesDoc { features: trust.policy.features().map(str::to_owned).collect() };
            out.emit(&doc, |d| {
                if d.features.is_empty() {
                    return hint("no features enabled (`op-dbus-stage feature enable NAME`)\n".into());
                }
                d.features.iter().map(|f| format!("{f}\n")).collect()
            })?;
        }
        Command::Deploy(o) | Command::DeployFromImage(o) => {
            let batch = if o.each { ops::Batch::Each } else { ops::Batch::Whole };
            deploy(&opts, out, &o.source, Some((batch, o.with_deps)), o.confirm_timeout)?
        }
        Command::Receive(o) => deploy(&opts, out, &o, None, 0)?,
        Command::DeployPlugin(o) => plugin(&opts, out, &o, false)?,
        Command::UpdatePlugin(o) => {
            if o.force {
                return Err(crate::error::Usage(
                    "--force is for deploy-plugin; update-plugin only ever moves forward".into(),
                )
                .into());
            }
            plugin(&opts, out, &o, true)?
        }
        Command::Update(o) => update(&opts, out, &o)?,
        Command::Have { digests } => {
            let ctx = Ctx::reading(&opts)?;
            let doc = HaveDoc { have: ops::have(&ctx, &digests)? };
            out.emit(&doc, |d| d.have.iter().map(|x| format!("{x}\n")).collect())?;
        }
        Command::List => {
            let ctx = Ctx::reading(&opts)?;
            let doc = ListDoc { stages: ops::list(&ctx)? };
            out.emit(&doc, |d| render_list(d, &opts.root))?;
        }
        Command::Status => {
            let ctx = Ctx::reading(&opts)?;
            let st = ops::status(&ctx)?;
            out.emit(&st, |st| render_status(st, &opts.root))?;
        }
        Command::Verify { stage } => {
            let ctx = Ctx::reading(&opts)?;
            let stage = stage.map(|s| crate::names::deployed(&ctx, &s)).transpose()?;
            let bar = cli_support::progress::spinner("verifying links, staged files and checks", opts.quiet);
            let r = ops::verify(&ctx, stage.as_ref());
            bar.finish_and_clear();
            let r = r?;
            out.emit(&r, render_verify)?;
            if !r.not_for_this_host.is_empty() {
                if !opts.quiet && !g.common.json {
                    eprintln!(
                        "op-dbus-stage: error: this host is not a recipient of the secret(s) {}",
                        r.not_for_this_host.join(", ")
                    );
                }
                return Ok(error::TRUST);
            }
            if !r.ok {
                return Ok(error::VERIFY_FAILED);
            }
        }
        Command::Rollback(o) => {
            let ctx = Ctx::changing(&opts)?;
            let r = match (o.stage, o.all, o.snapshot) {
                (_, _, Some(snap)) => {
                    confirm_restore(&ctx, &snap, o.yes)?;
                    ops::restore(&ctx, &snap)?
                }
                (stages, false, None) => {
                    let named = stages.iter().map(|s| crate::names::deployed(&ctx, s)).collect::<Result<Vec<_>>>()?;
                    ops::rollback(&ctx, &named)?
                }
                (_, true, None) => ops::rollback(&ctx, &[])?,
            };
            out.emit(&r, render_report)?;
        }
        Command::Snapshots { action: None } => {
            let ctx = Ctx::reading(&opts)?;
            let doc = SnapshotsDoc { snapshots: crate::snapshot::list(&ctx.staging)? };
            out.emit(&doc, render_snapshots)?;
        }
        Command::Snapshots { action: Some(SnapshotsCommand::Prune) } => {
            let ctx = Ctx::changing(&opts)?;
            let r = crate::retention::prune(&ctx, opts.dry_run)?;
            if !opts.dry_run && !r.is_empty() {
                crate::history::record_event(&ctx, "snapshots prune", &r.snapshots)?;
            }
            let doc = PruneDoc { dry_run: opts.dry_run, pruned: r };
            out.emit(&doc, render_prune)?;
        }
        Command::Snapshots { action: Some(SnapshotsCommand::Keep { names }) } => {
            let ctx = Ctx::changing(&opts)?;
            mark_snapshots(&ctx, &names, true)?;
            out.emit(&MarkDoc { dry_run: opts.dry_run, keep: true, snapshots: names }, render_mark)?;
        }
        Command::Snapshots { action: Some(SnapshotsCommand::Release { names }) } => {
            let ctx = Ctx::changing(&opts)?;
            mark_snapshots(&ctx, &names, false)?;
            out.emit(&MarkDoc { dry_run: opts.dry_run, keep: false, snapshots: names }, render_mark)?;
        }
        Command::History { verify: false } => {
            let ctx = Ctx::reading(&opts)?;
            let entries = match crate::history::dir_of(&ctx, false)? {
                Some(dir) => crate::history::read(&dir)?,
                None => Vec::new(),
            };
            let doc = HistoryDoc { entries };
            out.emit(&doc, render_history)?;
        }
        Command::History { verify: true } => {
            let ctx = Ctx::reading(&opts)?;
            let dir = crate::history::dir_of(&ctx, false)?;
            let v = crate::history::verify(&dir.unwrap_or_else(|| ctx.host.root.join(crate::history::DIR)))?;
            out.emit(&v, |v| match (&v.line, &v.problem) {
                (Some(line), Some(p)) => format!(
                    "history.log is NOT intact: entry {line} (line {line}): {p}; the {} entries before it check out\n",
                    v.entries
                ),
                _ => format!("history.log is intact: {} entries, the hash chain checks out\n", v.entries),
            })?;
            if !v.ok {
                return Ok(error::VERIFY_FAILED);
            }
        }
        Command::Backup(b) => return backup_command(&opts, out, b),
        Command::Restore { snapshot, yes } => {
            let ctx = Ctx::changing(&opts)?;
            confirm_restore(&ctx, &snapshot, yes)?;
            let r = ops::restore(&ctx, &snapshot)?;
            out.emit(&r, render_report)?;
        }
        Command::Remove { stage } => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::remove(&ctx, &crate::names::deployed(&ctx, &stage)?)?;
            out.emit(&r, render_report)?;
        }
        Command::Repair { stages } => {
            let ctx = Ctx::changing(&opts)?;
            let named = stages.iter().map(|s| crate::names::deployed(&ctx, s)).collect::<Result<Vec<_>>>()?;
            let r = ops::repair(&ctx, &named)?;
            out.emit(&r, render_report)?;
        }
        Command::FixSymlinks { stage } => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::fix_symlinks(&ctx, &crate::names::deployed(&ctx, &stage)?)?;
            out.emit(&r, render_report)?;
        }
        Command::Gc { keep } => {
            let ctx = Ctx::changing(&opts)?;
            let r = ops::gc(&ctx, keep)?;
            out.emit(&r, render_report)?;
        }
        Command::Recover => {
            let ctx = Ctx::changing(&opts)?;
            // With --dry-run nothing is recovered: `recovered` is what recovery would do.
            let doc = RecoverDoc { recovered: ctx.recovered, unconfirmed: ctx.unconfirmed.clone() };
            let would = if opts.dry_run { "would have " } else { "" };
            out.emit(&doc, |d| {
                let mut s = match d.recovered {
                    Some(o) => format!("{would}recovered the interrupted transaction: {}\n", outcome_text(o)),
                    None if d.unconfirmed.is_none() => "nothing to recover\n".into(),
                    None => String::new(),
                };
                if let Some(op) = &d.unconfirmed {
                    s += &format!("{would}rolled back `{op}`: it was never confirmed\n");
                }
                s
            })?;
        }
        Command::Confirm { token } => {
            let ctx = Ctx::changing_confirming(&opts)?;
            let r = crate::confirm::confirm(&ctx, &token)?;
            out.emit(&r, |r| {
                format!(
                    "{}confirmed `{}`: it stays\n",
                    if r.dry_run { "would have " } else { "" },
                    r.confirmed.operation
                )
            })?;
        }
        Command::ConfirmWait { token } => crate::confirm::wait(&opts, &token)?,
    }
    Ok(error::OK)
}

fn render_init(r: &ops::InitReport, dry_run: bool) -> String {
    format!(
        "{}staging {}\nstore {}\ntrusted keys {}\npolicy {}\nidentity {}{}\nbackend {}\n",
        if dry_run { "would create\n" } else { "" },
        r.staging.display(),
        r.store.display(),
        r.trusted_keys.display(),
        r.policy.display(),
        r.identity.display(),
        r.recipient.as_ref().map(|x| format!(" ({x})")).unwrap_or_default(),
        r.backend
    )
}

fn render_trust_list(d: &TrustListDoc, root: &Path) -> String {
    if d.keys.is_empty() {
        return with_root("no trusted keys: add one with `op-dbus-stage trust add KEY.pub`\n", root);
    }
    let rows: Vec<Vec<String>> = d
        .keys
        .iter()
        .map(|k| {
            vec![
                k.key_id.clone(),
                if k.scopes.is_empty() { "any".into() } else { k.scopes.join(",") },
                if k.prefixes.is_empty() { "any allowed".into() } else { k.prefixes.join(",") },
                if k.revoked { "revoked".into() } else { "trusted".into() },
                k.file.display().to_string(),
            ]
        })
        .collect();
    cli_support::table(&["KEY ID", "SCOPES", "PREFIXES", "STATUS", "FILE"], &rows, &[])
}

fn render_list(d: &ListDoc, root: &Path) -> String {
    if d.stages.is_empty() {
        return "nothing deployed\n".into();
    }
    let rows: Vec<Vec<String>> = d
        .stages
        .iter()
        .map(|l| vec![l.name.clone(), l.version.clone(), l.status.to_owned(), l.digest.clone()])
        .collect();
    let mut s = cli_support::table(&["NAME", "VERSION", "STATUS", "DIGEST"], &rows, &[]);
    for l in d.stages.iter().filter(|l| l.problem.is_some()) {
        s += &with_root(&format!("{}: {}\n", l.name, l.problem.as_deref().unwrap_or_default()), root);
    }
    s
}

fn render_status(st: &ops::Status, root: &Path) -> String {
    let mut s = format!("root {} (staging backend: {})\n", st.root.display(), st.backend);
    if st.stages.is_empty() {
        s += "nothing deployed\n";
    } else {
        let rows: Vec<Vec<String>> = st
            .stages
            .iter()
            .map(|x| {
                vec![
                    x.name.clone(),
                    x.version.clone(),
                    x.generation.to_string(),
                    x.signers.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                    x.deployed_at.clone(),
                    if x.previous.is_empty() { "-".into() } else { x.previous.join(", ") },
                ]
            })
            .collect();
        s += &cli_support::table(&["NAME", "VERSION", "GENERATION", "SIGNED BY", "DEPLOYED AT", "KEPT"], &rows, &[2]);
    }
    if let Some(t) = &st.unfinished_transaction {
        s += &with_root(&format!("unfinished transaction: {t} (run `op-dbus-stage recover`)\n"), root);
    }
    for b in &st.broken_links {
        s += &format!("broken: {b}\n");
    }
    if let Some(a) = &st.awaiting_confirmation {
        let c = &a.confirmation;
        s += &format!(
            "awaiting confirmation: `{}` until {} (`op-dbus-stage confirm {}` keeps it); ",
            c.operation, c.deadline, c.token
        );
        s += &if a.waiter_running {
            format!("without it the host goes back to {}\n", c.snapshot)
        } else {
            with_root(&format!("its waiter is gone: `op-dbus-stage recover` goes back to {}\n", c.snapshot), root)
        };
    }
    for x in st.stages.iter().filter(|x| x.problem.is_some()) {
        s += &with_root(&format!("{}: {}\n", x.name, x.problem.as_deref().unwrap_or_default()), root);
    }
    s
}

fn render_verify(r: &ops::VerifyReport) -> String {
    let mut s = String::new();
    for st in &r.stages {
        s += &format!("{}\n", st.name);
        if let Some(g) = &st.generation {
            s += &format!("  generation: {g}\n");
        }
        for l in &st.links {
            s += &format!("  link: {l}\n");
        }
        for f in &st.files {
            s += &format!("  file: {f}\n");
        }
        for x in &st.secrets {
            s += &format!("  secret: {x}\n");
        }
        for c in &st.checks {
            s += &format!("  verify `{}`: {}\n", c.command, if c.passed { "ok" } else { "FAILED" });
        }
    }
    s += if r.ok { "ok\n" } else { "verify FAILED\n" };
    s
}

fn render_snapshots(d: &SnapshotsDoc) -> String {
    if d.snapshots.is_empty() {
        return "no snapshots\n".into();
    }
    let rows: Vec<Vec<String>> = d
        .snapshots
        .iter()
        .map(|x| {
            vec![
                x.name.clone(),
                x.created.clone().unwrap_or_else(|| "-".into()),
                cli_support::human_bytes(x.bytes),
                cli_support::human_bytes(x.exclusive_bytes),
                if x.keep { "yes".into() } else { "-".into() },
                if x.stages.is_empty() { "(none)".into() } else { x.stages.join(" ") },
            ]
        })
        .collect();
    cli_support::table(&["NAME", "CREATED", "SIZE", "EXCLUSIVE", "KEEP", "STAGES"], &rows, &[2, 3])
}

/// `snapshots prune --json`.
#[derive(Debug, Serialize)]
pub struct PruneDoc {
    pub dry_run: bool,
    #[serde(flatten)]
    pub pruned: crate::retention::Pruned,
}

/// `snapshots keep|release --json`.
#[derive(Debug, Serialize)]
pub struct MarkDoc {
    pub dry_run: bool,
    /// Whether the snapshots are now marked to keep.
    pub keep: bool,
    pub snapshots: Vec<String>,
}

/// `history --json`.
#[derive(Debug, Serialize)]
pub struct HistoryDoc {
    pub entries: Vec<crate::history::Entry>,
}

fn mark_snapshots(ctx: &Ctx, names: &[String], keep: bool) -> Result<()> {
    for n in names {
        crate::snapshot::read(&ctx.staging, n)?;
    }
    if ctx.opts.dry_run {
        return Ok(());
    }
    for n in names {
        crate::retention::mark(&ctx.staging, n, keep)?;
    }
    Ok(())
}

fn render_mark(d: &MarkDoc) -> String {
    let verb = match (d.dry_run, d.keep) {
        (true, true) => "would keep",
        (true, false) => "would release",
        (false, true) => "keeping",
        (false, false) => "released",
    };
    d.snapshots.iter().map(|n| format!("{verb} {n}\n")).collect()
}

fn render_prune(d: &PruneDoc) -> String {
    let p = &d.pruned;
    let would = if d.dry_run { "would " } else { "" };
    if p.is_empty() {
        return "nothing to prune\n".into();
    }
    let mut s = String::new();
    for n in &p.snapshots {
        s += &format!("{would}prune snapshot {n}\n");
    }
    for g in &p.generations {
        s +=
            &format!("{would}remove {} generation {} ({})\n", g.stage, g.generation, cli_support::human_bytes(g.bytes));
    }
    for i in &p.images {
        s += &format!("{would}remove store image {i}\n");
    }
    if p.blobs > 0 {
        s += &format!("{would}remove {} store blob(s) ({})\n", p.blobs, cli_support::human_bytes(p.blob_bytes));
    }
    s
}

fn render_history(d: &HistoryDoc) -> String {
    if d.entries.is_empty() {
        return "no changes recorded\n".into();
    }
    let rows: Vec<Vec<String>> = d
        .entries
        .iter()
        .map(|e| {
            let changes: Vec<String> = e
                .changes
                .iter()
                .map(|c| {
                    let signers: Vec<String> =
                        c.to.iter().flat_map(|g| g.signers.iter().map(ToString::to_string)).collect();
                    let by = if signers.is_empty() { String::new() } else { format!(" signed {}", signers.join(",")) };
                    match (&c.from, &c.to) {
                        (None, Some(t)) => format!("{}: new {}{by}", c.stage, t.version),
                        (Some(f), Some(t)) => format!("{}: {} -> {}{by}", c.stage, f.version, t.version),
                        (Some(f), None) => format!("{}: {} removed", c.stage, f.version),
                        (None, None) => c.stage.to_string(),
                    }
                })
                .collect();
            vec![
                e.seq.to_string(),
                e.time.clone(),
                e.sudo_user.clone().unwrap_or_else(|| format!("uid {}", e.uid)),
                e.operation.clone(),
                e.outcome.clone(),
                if changes.is_empty() { "-".into() } else { changes.join("; ") },
                if e.snapshots.is_empty() { "-".into() } else { e.snapshots.join(" ") },
            ]
        })
        .collect();
    cli_support::table(&["#", "TIME", "BY", "OPERATION", "OUTCOME", "CHANGES", "SNAPSHOTS"], &rows, &[0])
}

fn render_feature(r: &ops::FeatureChanged) -> String {
    format!(
        "{}{} {}; enabled: {}\n",
        if r.dry_run { "would have " } else { "" },
        if r.enabled { "enabled" } else { "disabled" },
        r.feature,
        if r.features.is_empty() { "none".to_owned() } else { r.features.join(", ") }
    )
}

/// A restore that removes stages asks first on a terminal (unless --yes or --dry-run).
fn confirm_restore(ctx: &Ctx, snapshot: &str, yes: bool) -> Result<()> {
    if yes || ctx.opts.dry_run || !cli_support::prompt::interactive() {
        return Ok(());
    }
    let state = ctx.state()?;
    let snap = crate::snapshot::read(&ctx.staging, snapshot)?;
    let gone: Vec<String> =
        state.stages.keys().filter(|n| !snap.stages.contains_key(*n)).map(|n| n.to_string()).collect();
    if gone.is_empty() {
        return Ok(());
    }
    let question = format!(
        "restoring {snapshot} will remove stage(s) {} (their links and copies; their generations are kept). Go ahead?",
        gone.join(", ")
    );
    if cli_support::prompt::confirm(&question).context("reading the answer")? {
        return Ok(());
    }
    Err(error::Cancelled(format!("nothing changed: {snapshot} was not restored (pass --yes to skip the question)"))
        .into())
}

/// `backup ...`; returns the exit code.
fn backup_command(opts: &Options, out: Output, b: BackupCommand) -> Result<i32> {
    use crate::commands::backup as cmd;
    match b {
        BackupCommand::Create(o) => {
            let ctx = Ctx::changing(opts)?;
            let stages = o.stages.iter().map(|s| crate::names::deployed(&ctx, s)).collect::<Result<Vec<_>>>()?;
            let c = cmd::CreateOpts {
                include_secrets: o.include_secrets,
                recipients: o.recipient,
                recipients_files: o.recipients_file,
            };
            let r = cmd::create(&ctx, &stages, &c)?;
            out.emit(&r, render_backup_created)?;
        }
        BackupCommand::List => {
            let ctx = Ctx::reading(opts)?;
            out.emit(&cmd::list(&ctx.host)?, render_backup_list)?;
        }
        BackupCommand::Info { name } => {
            let ctx = Ctx::reading(opts)?;
            let (_, s) = crate::backup::find(&ctx.host, &name)?;
            out.emit(&s, render_backup_info)?;
        }
        BackupCommand::Verify { name, identity } => {
            let ctx = Ctx::reading(opts)?;
            let r = cmd::verify(&ctx.host, &name, identity.as_deref())?;
            out.emit(&r, |r| {
                let mut s = String::new();
                for p in &r.problems {
                    s += &format!("{p}\n");
                }
                if !r.entries_checked {
                    s += "the archive is encrypted and no identity was given (--identity FILE): only the archive file \
                          was checked\n";
                }
                s + &if r.ok {
                    format!("backup {} is intact ({} entries)\n", r.name, r.entries)
                } else {
                    format!("backup {} is NOT intact\n", r.name)
                }
            })?;
            if !r.ok {
                return Ok(error::VERIFY_FAILED);
            }
        }
        BackupCommand::Restore { name, force, identity } => {
            let ctx = Ctx::changing(opts)?;
            let r = cmd::restore(&ctx, &name, force, identity.as_deref())?;
            out.emit(&r, render_report)?;
        }
        BackupCommand::Prune => {
            let ctx = Ctx::changing(opts)?;
            let r = cmd::prune(&ctx)?;
            out.emit(&r, |r| {
                let would = if r.dry_run { "would " } else { "" };
                if r.pruned.is_empty() {
                    return format!("nothing to prune ([backups] keep = {})\n", r.keep);
                }
                r.pruned.iter().map(|n| format!("{would}remove backup {n}\n")).collect()
            })?;
        }
    }
    Ok(error::OK)
}

fn render_backup_created(r: &crate::commands::backup::Created) -> String {
    let mut s = format!(
        "{} {} ({} entries, {}{}{})\n",
        if r.dry_run { "would write backup" } else { "wrote backup" },
        r.name,
        r.entries,
        cli_support::human_bytes(r.bytes),
        if r.encrypted { ", encrypted" } else { "" },
        if r.secrets { ", with secrets" } else { "" },
    );
    if let Some(a) = &r.archive {
        s += &format!("  {}\n", a.display());
    }
    for n in &r.notes {
        s += &format!("  note: {n}\n");
    }
    s
}

fn render_backup_list(d: &crate::commands::backup::Listed) -> String {
    if d.backups.is_empty() {
        return "no backups\n".into();
    }
    let rows: Vec<Vec<String>> = d
        .backups
        .iter()
        .map(|b| {
            vec![
                b.name.clone(),
                b.created.clone(),
                cli_support::human_bytes(b.archive_bytes),
                if b.encrypted { "yes".into() } else { "-".into() },
                b.stages.iter().map(|s| format!("{} {}", s.name, s.version)).collect::<Vec<_>>().join(", "),
            ]
        })
        .collect();
    cli_support::table(&["NAME", "CREATED", "SIZE", "ENCRYPTED", "STAGES"], &rows, &[2])
}

fn render_backup_info(s: &crate::backup::Summary) -> String {
    let m = &s.manifest;
    let out = format!(
        "backup {}\ncreated {}\nhost {}\nstages {}\narchive {} ({}, sha256 {})\nencrypted {}\nsecrets {}\n",
        m.name,
        m.created,
        m.host,
        m.stages.iter().map(|s| format!("{} {}", s.name, s.version)).collect::<Vec<_>>().join(", "),
        s.archive,
        cli_support::human_bytes(s.archive_bytes),
        s.archive_sha256,
        if s.encrypted { format!("yes, to {}", s.recipients.join(", ")) } else { "no".into() },
        if m.secrets { "yes" } else { "no" },
    );
    let rows: Vec<Vec<String>> = m
        .items
        .iter()
        .map(|i| {
            vec![
                i.path.to_string(),
                i.kind.noun().to_owned(),
                i.stage.to_string(),
                format!("{}:{} {}", i.uid, i.gid, i.mode),
                i.size.map(cli_support::human_bytes).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out + &cli_support::table(&["PATH", "TYPE", "STAGE", "OWNER MODE", "SIZE"], &rows, &[4])
}

/// `deploy` (with how to apply several images, whether to add their dependencies, and how
/// long to wait for a confirmation: 0 none) and `receive` (`batch` none).
fn deploy(
    opts: &Options,
    out: Output,
    o: &SourceOpts,
    batch: Option<(ops::Batch, bool)>,
    confirm_timeout: u64,
) -> Result<()> {
    let activate = batch.is_some();
    if o.source.iter().filter(|s| *s == "-").count() > 1 {
        return Err(error::Usage("stdin (`-`) can be read once: name it as one SOURCE only".into()).into());
    }
    if o.registry.password_stdin && o.source.len() > 1 {
        return Err(error::Usage(
            "--password-stdin reads one password, for one SOURCE: deploy several with the registries' credentials \
             in the auth file"
                .into(),
        )
        .into());
    }
    let sources = o.source.iter().map(|s| Source::parse_with(s, &o.registry)).collect::<Result<Vec<_>>>()?;
    let ctx = Ctx::changing(opts)?;
    if activate {
        crate::confirm::refuse_if_pending(&ctx)?;
    }
    crate::progress::start(&format!("{} {}", if activate { "deploying" } else { "receiving" }, o.source.join(" ")));
    let (how, with_deps) = batch.unwrap_or((ops::Batch::Whole, false));
    let r = ops::deploy(&ctx, &sources, how, with_deps, activate);
    crate::progress::finish();
    let mut r = r?;
    if confirm_timeout > 0
        && !opts.dry_run
        && let Some(snapshot) = crate::confirm::pre_snapshot(&r.deployed)
    {
        let operation = r.deployed.iter().map(|d| d.operation.as_str()).collect::<Vec<_>>().join("; ");
        r.confirmation = Some(crate::confirm::arm(&ctx, &operation, snapshot, confirm_timeout)?);
    }
    out.emit(&r, |r| {
        let mut s = render_deploy(r);
        if let Some(c) = &r.confirmation {
            s += &format!(
                "awaiting confirmation until {}: `op-dbus-stage confirm {}` keeps it, else the host goes back to {}\n",
                c.deadline, c.token, c.snapshot
            );
        }
        s
    })
}

/// `update`: one channel, pulled and deployed (see `commands::update`).
#[cfg(feature = "registry")]
fn update(opts: &Options, out: Output, o: &UpdateOpts) -> Result<()> {
    let ctx = Ctx::changing(opts)?;
    crate::progress::start(&format!("updating from {}:{}", o.from, o.channel));
    let r = crate::commands::update::update(&ctx, &o.from, &o.channel, o.all, &o.registry);
    crate::progress::finish();
    out.emit(&r?, |r| {
        let mut s = crate::commands::update::render(r);
        if let Some(d) = &r.deploy {
            s += &render_deploy(d);
        }
        s
    })
}

fn plugin(opts: &Options, out: Output, o: &PluginOpts, update: bool) -> Result<()> {
    let source = o.source.as_deref().map(|s| Source::parse_with(s, &o.registry)).transpose()?;
    let ctx = Ctx::changing(opts)?;
    let r = crate::commands::plugin::deploy_plugin(&ctx, &o.plugin, source.as_ref(), o.force, update)?;
    out.emit(&r, |r| {
        let mut s = match r.outcome {
            "already-deployed" => format!(
                "the plugin {} is already deployed by {} (`op-dbus-stage update-plugin {}` updates it)\n",
                r.plugin, r.reference, r.plugin
            ),
            "up-to-date" => format!("the plugin {} is up to date ({})\n", r.plugin, r.reference),
            o => format!("the plugin {}: {o} {}\n", r.plugin, r.reference),
        };
        if let Some(d) = &r.deploy {
            s += &render_deploy(d);
        }
        s
    })
}

#[cfg(not(feature = "registry"))]
fn update(_: &Options, _: Output, o: &UpdateOpts) -> Result<()> {
    Err(error::Usage(format!(
        "update --from {}: pulling from a registry needs an op-dbus-stage built with the `registry` feature (this \
         one is not): deploy .oci.tar exports instead",
        o.from
    ))
    .into())
}

/// The text of `deploy` and `receive`.
fn render_deploy(r: &ops::DeployReport) -> String {
    let mut s = r.backup.as_ref().map(render_backup_created).unwrap_or_default();
    for v in &r.received {
        s += &format!(
            "verified {} {} signed by {}\n",
            v.reference,
            v.digest,
            v.signers.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
        );
    }
    for d in &r.deployed {
        s += &render_report(d);
    }
    for k in &r.skipped {
        s += &format!("{k}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let c = Cli::try_parse_from(["op-dbus-stage", "deploy", "x.oci.tar", "--root", "/tmp/r", "--json"]).unwrap();
        assert!(c.global.common.json);
        assert!(
            Cli::try_parse_from(["op-dbus-stage", "rollback"]).is_err(),
            "rollback needs a stage, --all or --snapshot"
        );
        Cli::try_parse_from(["op-dbus-stage", "rollback", "--all"]).unwrap();
        Cli::try_parse_from(["op-dbus-stage", "--dry-run", "rollback", "--snapshot", "pre-x"]).unwrap();
        Cli::try_parse_from(["op-dbus-stage", "deploy-from-image", "dir"]).unwrap();
        assert!(Cli::try_parse_from(["op-dbus-stage", "trust", "revoke", "nothex"]).is_err());
    }

    #[test]
    fn the_verify_helper_takes_any_command_after_the_separator() {
        let args: Vec<String> = crate::sandbox::command("--root / -c 'x'", 65534, 7)
            .get_args()
            .map(|a| a.to_string_lossy().into())
            .collect();
        let c = Cli::try_parse_from(std::iter::once("op-dbus-stage".to_owned()).chain(args)).unwrap();
        match c.command {
            Command::VerifyConfined { uid, gid, command } => {
                assert_eq!((uid, gid, command.to_str()), (65534, 7, Some("--root / -c 'x'")));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.global.root, PathBuf::from("/"), "the command's words are not the helper's flags");
    }
}

#[cfg(test)]
mod help {
    cli_support::help_tests!(super::Cli, registry_flags_on: ["op-dbus-stage deploy", "op-dbus-stage deploy-from-image", "op-dbus-stage deploy-plugin", "op-dbus-stage receive", "op-dbus-stage update", "op-dbus-stage update-plugin"]);
}
