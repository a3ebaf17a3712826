//! The command line of `op-dbus-image` (docs/commands.md): clap types and the one dispatch.
// Doc comments on the clap types below are `--help` text, written for a terminal:
// `HOST[:PORT]` there is command-line syntax, not a rustdoc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use cli_support::docs::Shell;
use cli_support::{GlobalArgs, Output};
use serde::Serialize;

use formats::layout::Layout;
use formats::path::TargetPath;
use formats::{Reference, StageName, Version};
use keys::simple_signing::Expires;
use keys::{PrivateKey, PublicKey};

use crate::build::{Format, Outcome, Settings};
use crate::error;

/// Builds, signs, stores and exports op-dbus stage images.
///
/// Exit codes: 0 ok; 1 other error; 2 usage, or something named that is not there;
/// 3 signature or trust failure; 4 refused (a version that exists); 7 malformed input.
#[derive(Debug, Parser)]
#[command(name = "op-dbus-image", version, about, long_about = None, max_term_width = 100)]
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
    /// The image store (an OCI layout directory) [default: /var/lib/op-dbus/deployment/images
    /// for root, $XDG_DATA_HOME/op-dbus/images (~/.local/share/op-dbus/images) for others].
    #[arg(long, global = true, env = "OP_DBUS_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// The ed25519 signing key: the private key file (PKCS#8 PEM, mode 0600), not KEY.pub.
    #[arg(long, global = true, env = "OP_DBUS_SIGNING_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
}

impl GlobalOpts {
    /// The store: --store, $OP_DBUS_STORE, or the default for this user.
    pub fn store(&self) -> PathBuf {
        self.store.clone().unwrap_or_else(default_store)
    }
}

/// The store without --store: the system's for root, the user's data folder for others.
pub fn default_store() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let euid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    if euid == 0 {
        return PathBuf::from("/var/lib/op-dbus/deployment/images");
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from(".local/share"));
    data.join("op-dbus/images")
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate, show and export signing keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Build (and, with a key, sign) the stage folder STAGE_DIR.
    Build(BuildOpts),
    /// Build an ad-hoc stage from listed files.
    Create(CreateOpts),
    /// Add a signature to an image of the store.
    Sign(SignOpts),
    /// Show an image: its layers, signatures and embedded stage manifest.
    Inspect(InspectOpts),
    /// List the images of the store.
    List,
    /// Write images and their signatures into one .oci.tar (and FILE.minisig with a key).
    Export(ExportOpts),
    /// Deploy images to hosts over ssh: only what each host lacks is sent, hosts in parallel.
    Deploy(DeployOpts),
    /// Push an image and its signatures to an OCI registry (HOST[:PORT]/REPO[:TAG]).
    Push(crate::registry_cmd::PushOpts),
    /// Pull an image and its signatures from an OCI registry into the store.
    Pull(crate::registry_cmd::PullOpts),
    /// Publish which versions a registry channel offers (for `op-dbus-stage update`).
    #[command(subcommand)]
    Channel(crate::channel::ChannelCommand),
    /// Encrypt, remove and list a stage folder's secrets (`type: secret` files).
    #[command(subcommand)]
    Secret(SecretCommand),
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
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Encrypt a secret to the stage's `recipients:` into the file of its `files:` entry PATH.
    ///
    /// The plaintext is read from standard input (or --file), never from an argument, and
    /// is not written anywhere: only the age ciphertext goes into the stage folder, replacing
    /// what was there. PATH must be the `path:` of a `type: secret` entry of manifest.yaml
    /// (by convention secrets/NAME.age).
    Add {
        /// A folder holding manifest.yaml.
        stage_dir: PathBuf,
        /// The `path:` of the `type: secret` entry.
        path: String,
        /// Read the plaintext from FILE instead of standard input.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// The fleet inventory, for `recipients:` entries of the form @TAG (the `recipient`
        /// of every host with that tag).
        #[arg(long, value_name = "FILE")]
        inventory: Option<PathBuf>,
    },
    /// Delete the encrypted file of the secret PATH (remove its `files:` entry from
    /// manifest.yaml too, or the next build fails).
    Rm {
        /// A folder holding manifest.yaml.
        stage_dir: PathBuf,
        /// The `path:` of the `type: secret` entry.
        path: String,
    },
    /// The secrets of a stage folder: target, mode, owner, and whether each is encrypted to
    /// every recipient the stage lists.
    List {
        /// A folder holding manifest.yaml.
        stage_dir: PathBuf,
        /// The fleet inventory, for `recipients:` entries of the form @TAG (the `recipient`
        /// of every host with that tag).
        #[arg(long, value_name = "FILE")]
        inventory: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new private key to FILE (mode 0600) and its public key to FILE.pub.
    Generate {
        /// The private key file to create (FILE.pub is written beside it).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the key id of a public key (or of a private key's public half).
    Show {
        /// A public key (KEY.pub) or a private key file.
        file: PathBuf,
    },
    /// Print a public key in another format.
    Export {
        /// A public key (KEY.pub) or a private key file.
        file: PathBuf,
        /// The minisign public key form, for `minisign -V -p`.
        #[arg(long, required = true)]
        minisign: bool,
    },
}

#[derive(Debug, Args)]
pub struct BuildOpts {
    /// A folder holding manifest.yaml and the stage's files.
    pub stage_dir: PathBuf,
    /// The payload format: tar+zstd, a btrfs send stream, or btrfs when the stage folder is
    /// on btrfs and tar otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// Build a delta layer on top of this image (NAME:VERSION) of the store. tar: a changed
    /// file is carried as a patch against the parent's version when that is smaller
    /// (a tar-patch+zstd layer); btrfs: an incremental send stream.
    #[arg(long)]
    pub parent: Option<Reference>,
    /// Signature expiry (RFC 3339, e.g. 2027-01-31T00:00:00Z).
    #[arg(long, value_name = "TIME", conflicts_with = "no_sign")]
    pub expires: Option<Expires>,
    /// Do not sign, even with --key or OP_DBUS_SIGNING_KEY set: build unsigned here, then
    /// `op-dbus-image sign NAME:VERSION` where no build step runs.
    #[arg(long)]
    pub no_sign: bool,
    /// Replace NAME:VERSION if the store has it (versions are otherwise immutable).
    #[arg(long)]
    pub force: bool,
    /// The fleet inventory, for `recipients:` entries of the form @TAG (the `recipient` of
    /// every host with that tag).
    #[arg(long, value_name = "FILE")]
    pub inventory: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CreateOpts {
    /// The stage name.
    pub name: StageName,
    /// SRC or SRC:/TARGET; repeat or list several. A SRC without a target is staged at its
    /// relative path (an absolute one, or one with `..`, by its file name) and linked nowhere,
    /// unless --target-prefix is given. Two sources staged at one path are refused (exit 7).
    #[arg(long, required = true, num_args = 1.., value_name = "SRC[:/TARGET]")]
    pub files: Vec<String>,
    /// Link every SRC listed without a target at DIR/ its staged path.
    #[arg(long, value_name = "DIR")]
    pub target_prefix: Option<TargetPath>,
    /// The stage version.
    #[arg(long = "version", default_value = "0.1.0")]
    pub stage_version: Version,
    /// The payload format (as for build).
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// Signature expiry (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub expires: Option<Expires>,
    /// Replace NAME:VERSION if the store has it (versions are otherwise immutable).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct SignOpts {
    /// The image of the store to sign (NAME:VERSION).
    pub reference: Reference,
    /// Signature expiry (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub expires: Option<Expires>,
}

#[derive(Debug, Args)]
pub struct InspectOpts {
    /// The image of the store to show (NAME:VERSION).
    pub reference: Reference,
}

#[derive(Debug, Args)]
pub struct ExportOpts {
    /// Images (NAME:VERSION) to export.
    #[arg(required = true)]
    pub images: Vec<Reference>,
    /// The archive: a new file or a regular file to replace (never a symlink, FIFO or
    /// device), or `-` for stdout (the report then goes to stderr).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Where the detached signature goes (with a key): default OUT.minisig; with `--out -`
    /// none is written unless this is given.
    #[arg(long, value_name = "FILE")]
    pub minisig: Option<PathBuf>,
    /// Leave out payload layers this image (NAME:VERSION) has: a thin export for hosts that have it.
    #[arg(long)]
    pub since: Option<Reference>,
    /// Also export the stages these images depend on (their embedded `dependencies`), each
    /// the highest version in the store that matches, recursively.
    #[arg(long)]
    pub with_deps: bool,
}

/// `deploy`: images to hosts over the system's OpenSSH client.
#[derive(Debug, Args)]
pub struct DeployOpts {
    /// Images (NAME:VERSION) to deploy, as one transaction on each host.
    #[arg(required = true)]
    pub images: Vec<Reference>,
    /// The hosts: inventory names, @TAG for every inventory host with that tag, or ssh
    /// destinations as they are (repeat, or separate with commas).
    #[arg(long, required = true, value_name = "HOST|@TAG")]
    pub on: Vec<String>,
    /// The inventory (TOML: [defaults] and [hosts.NAME] with address, tags, user, port, root,
    /// installer, ssh_options).
    #[arg(long, env = "OP_DBUS_INVENTORY", value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// Also deploy the stages these images depend on (the highest version in the store that
    /// matches, recursively).
    #[arg(long)]
    pub with_deps: bool,
    /// Hosts deployed at once.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub limit: usize,
    /// Deploy to the first N hosts first; when one of them fails, stop there.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub canary: usize,
    /// Start no more hosts once N have failed.
    #[arg(long, value_name = "N")]
    pub max_failures: Option<usize>,
    /// Connection attempts after the first, with backoff (1 s, 2 s, 4 s, ...).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub retries: u32,
    /// ssh's ConnectTimeout, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub connect_timeout: u64,
    /// Abandon a transfer (and retry) when nothing moved for this long, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub stall_timeout: u64,
    /// Abandon a host when its deploy (transfer, verification, activation) takes longer, in seconds.
    #[arg(long, default_value_t = 1800, value_name = "SECONDS")]
    pub activation_timeout: u64,
    /// Send every layer, even those the host has.
    #[arg(long)]
    pub full: bool,
    /// How long each host waits, after activating, for the confirmation this tool sends over
    /// a new ssh connection; without it the host rolls itself back. 0: no confirmation (for
    /// installers without `confirm`).
    #[arg(long, default_value_t = 30, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub confirm_timeout: u64,
    /// An ssh config file (ssh -F).
    #[arg(long, value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
    /// An ssh option for every host (ssh -o OPTION=VALUE; repeat).
    #[arg(long = "ssh-option", value_name = "OPTION=VALUE")]
    pub ssh_options: Vec<String>,
}

/// `deploy --dry-run`.
#[derive(Debug, Serialize)]
pub struct DeployPlan {
    pub images: Vec<String>,
    pub hosts: Vec<DeployPlanHost>,
    pub canary: usize,
}

/// One host of [`DeployPlan`].
#[derive(Debug, Serialize)]
pub struct DeployPlanHost {
    pub host: String,
    pub address: String,
    pub root: String,
}

/// Parses the arguments, runs the command and returns the exit code.
pub fn main() -> i32 {
    let cli: Cli = match cli_support::parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    cli_support::init_logging(&cli.global.common);
    let json = cli.global.common.json;
    let store = cli.global.store();
    match run(cli) {
        Ok(()) => error::OK,
        // `deploy`'s report, already printed (the JSON document under --json), says which
        // hosts failed and why: only the summary goes to stderr.
        Err(e) if e.is::<crate::fleet::FleetFailed>() => {
            eprintln!("op-dbus-image: error: {e}");
            error::classify(&e).code()
        }
        Err(e) => {
            let hint = format!("the filesystem is full: free some space (the store is {})", store.display());
            cli_support::report_error("op-dbus-image", json, &e, error::classify(&e), &hint, &|m| m)
        }
    }
}

fn load_key(g: &GlobalOpts) -> Result<Option<PrivateKey>> {
    let Some(path) = g.key.as_deref() else { return Ok(None) };
    match PrivateKey::read(path) {
        Ok(k) => Ok(Some(k)),
        // A public key where the private one belongs: say so, not "chmod".
        Err(_) if PublicKey::read(path).is_ok() => {
            let private = path.to_string_lossy();
            let private = private.strip_suffix(".pub").unwrap_or("the private key file");
            Err(cli_support::exit::Usage(format!(
                "{} is a public key; --key (or OP_DBUS_SIGNING_KEY) takes the private signing key \
                 ({private}, mode 0600)",
                path.display()
            ))
            .into())
        }
        Err(e) => Err(anyhow::Error::new(e).context("loading the signing key (--key or OP_DBUS_SIGNING_KEY)")),
    }
}

fn require_key(g: &GlobalOpts) -> Result<PrivateKey> {
    load_key(g)?.context("no signing key: pass --key FILE or set OP_DBUS_SIGNING_KEY (make one with `op-dbus-image key generate --out FILE`)")
}

fn open_store(g: &GlobalOpts, create: bool) -> Result<Layout> {
    let store = g.store();
    let r = if create { Layout::open_or_create(&store) } else { Layout::open(&store) };
    r.with_context(|| format!("opening the image store {}", store.display()))
}

/// `key generate --json`.
#[derive(Debug, Serialize)]
pub struct KeyGenerated {
    /// Null under --dry-run.
    pub key_id: Option<keys::KeyId>,
    pub private: PathBuf,
    pub public: PathBuf,
    pub dry_run: bool,
}

/// `key show --json`.
#[derive(Debug, Serialize)]
pub struct KeyShown {
    pub key_id: keys::KeyId,
    pub file: PathBuf,
}

/// `key export --minisign --json`.
#[derive(Debug, Serialize)]
pub struct KeyExported {
    pub key_id: keys::KeyId,
    /// The minisign public key file's text.
    pub minisign: String,
}

/// `sign --dry-run --json`.
#[derive(Debug, Serialize)]
pub struct SignPlan {
    pub reference: Reference,
    pub digest: formats::Digest,
    pub key_id: keys::KeyId,
    pub dry_run: bool,
}

/// `list --json`.
#[derive(Debug, Serialize)]
pub struct ListDoc {
    pub images: Vec<crate::inspect::Listed>,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    let out = Output::new(&g.common);
    match cli.command {
        Command::Key(k) => key_command(g, k),
        Command::Secret(s) => secret_command(g, s),
        Command::Build(o) => {
            // Read before any build step runs; the steps never see it (see `hide`).
            let key = if o.no_sign { None } else { load_key(g)? };
            let layout = if g.common.dry_run { None } else { Some(open_store(g, true)?) };
            let inventory = o.inventory.as_deref().map(crate::fleet::Inventory::read).transpose()?;
            let settings = Settings {
                layout: layout.as_ref(),
                format: o.format,
                parent: o.parent,
                quiet: g.common.quiet,
                hide_key: g.key.clone(),
                force: o.force,
                inventory: inventory.as_ref(),
            };
            let outcome = crate::build::build(&o.stage_dir, &settings)
                .with_context(|| format!("building {}", o.stage_dir.display()))?;
            finish_build(g, layout.as_ref(), outcome, key.as_ref(), o.expires.as_ref())
        }
        Command::Create(o) => {
            let key = load_key(g)?;
            let layout = if g.common.dry_run { None } else { Some(open_store(g, true)?) };
            let settings = Settings {
                layout: layout.as_ref(),
                format: o.format,
                parent: None,
                quiet: g.common.quiet,
                hide_key: None,
                force: o.force,
                inventory: None,
            };
            let outcome =
                crate::build::create(o.name.clone(), o.stage_version, &o.files, o.target_prefix.as_ref(), &settings)
                    .with_context(|| format!("creating {}", o.name))?;
            finish_build(g, layout.as_ref(), outcome, key.as_ref(), o.expires.as_ref())
        }
        Command::Sign(o) => {
            let key = require_key(g)?;
            let layout = open_store(g, false)?;
            // Planned first; a dry run reports the plan, the real run applies it.
            let planned = crate::sign::plan(&layout, &o.reference, &key, o.expires.as_ref())?;
            if g.common.dry_run {
                let plan =
                    SignPlan { reference: o.reference, digest: planned.digest, key_id: key.key_id(), dry_run: true };
                return out
                    .emit(&plan, |p| format!("would sign {} ({}) with key {}\n", p.reference, p.digest, p.key_id));
            }
            let s = crate::sign::apply(&layout, &planned)?;
            out.emit(&s, |s| {
                format!("signed {} ({}) with key {}; {} signature(s)\n", s.reference, s.digest, s.key_id, s.signatures)
            })
        }
        Command::Inspect(o) => {
            let layout = open_store(g, false)?;
            let i = crate::inspect::inspect(&layout, &o.reference)?;
            out.emit(&i, render_inspection)
        }
        Command::List => {
            let layout = open_store(g, false)?;
            let doc = ListDoc { images: crate::inspect::list(&layout)? };
            out.emit(&doc, |d| {
                if d.images.is_empty() {
                    return format!("no images in {}\n", layout.root().display());
                }
                let rows: Vec<Vec<String>> = d
                    .images
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            i.version.clone(),
                            cli_support::human_bytes(i.size),
                            i.signatures.to_string(),
                            i.digest.to_string(),
                        ]
                    })
                    .collect();
                cli_support::table(&["NAME", "VERSION", "SIZE", "SIGNATURES", "DIGEST"], &rows, &[2, 3])
            })
        }
        Command::Completions { shell } => cli_support::docs::completions(Cli::command(), shell),
        Command::Man { dir } => {
            let written = cli_support::docs::man_pages(Cli::command(), &dir)?;
            out.emit(&written, |w| w.iter().map(|p| format!("wrote {}\n", p.display())).collect())
        }
        Command::Deploy(o) => {
            let layout = open_store(g, false)?;
            let images = if o.with_deps { crate::deps::with_dependencies(&layout, &o.images)? } else { o.images };
            for r in &images {
                crate::inspect::StoredImage::load(&layout, r)?;
            }
            let inventory = match &o.inventory {
                Some(p) => crate::fleet::Inventory::read(p)?,
                None => crate::fleet::Inventory::default(),
            };
            let targets = inventory.select(&o.on)?;
            if targets.is_empty() {
                return Err(cli_support::exit::Usage("--on names no host".into()).into());
            }
            for opt in &o.ssh_options {
                if opt.starts_with('-') {
                    return Err(cli_support::exit::Usage(format!("--ssh-option {opt:?}: give OPTION=VALUE")).into());
                }
            }
            if g.common.dry_run {
                let doc = DeployPlan {
                    images: images.iter().map(ToString::to_string).collect(),
                    hosts: targets
                        .iter()
                        .map(|t| DeployPlanHost {
                            host: t.name.clone(),
                            address: t.address.clone(),
                            root: t.root.clone(),
                        })
                        .collect(),
                    canary: o.canary.min(targets.len()),
                };
                return out.emit(&doc, |d| {
                    let mut s = format!("would deploy {} to {} host(s)", d.images.join(" "), d.hosts.len());
                    if d.canary > 0 {
                        s += &format!(", the first {} as canaries", d.canary);
                    }
                    s += ":\n";
                    for h in &d.hosts {
                        s += &format!("  {} ({}, --root {})\n", h.host, h.address, h.root);
                    }
                    s
                });
            }
            let settings = crate::fleet::Options {
                ssh: PathBuf::from("ssh"),
                ssh_config: o.ssh_config,
                ssh_options: o.ssh_options,
                limit: o.limit.max(1),
                retries: o.retries,
                connect_timeout: std::time::Duration::from_secs(o.connect_timeout.max(1)),
                stall_timeout: std::time::Duration::from_secs(o.stall_timeout.max(1)),
                activation_timeout: std::time::Duration::from_secs(o.activation_timeout.max(1)),
                canary: o.canary,
                max_failures: o.max_failures,
                full: o.full,
                quiet: g.common.quiet,
                confirm_timeout: std::time::Duration::from_secs(o.confirm_timeout),
            };
            let report = crate::fleet::deploy(&layout, &images, &targets, &settings)?;
            out.emit(&report, crate::fleet::FleetReport::render)?;
            report.outcome()
        }
        Command::Export(o) => {
            let layout = open_store(g, false)?;
            let images = if o.with_deps { crate::deps::with_dependencies(&layout, &o.images)? } else { o.images };
            let plan = crate::export::plan(&layout, &images, o.since.as_ref())?;
            if g.common.dry_run {
                let d = crate::export::dry_run(&plan, &o.out);
                return out.emit(&d, |d| {
                    format!(
                        "would write {} with {} tag(s), {} blob(s), {} layer(s) left out\n",
                        d.path.display(),
                        d.index.len(),
                        d.blobs.len(),
                        d.omitted_layers.len()
                    )
                });
            }
            let key = load_key(g)?;
            let e = crate::export::export(
                &layout,
                &images,
                &plan,
                &o.out,
                o.minisig.as_deref(),
                key.as_ref(),
                g.common.quiet,
            )?;
            if !e.unsigned.is_empty() && !g.common.quiet {
                eprintln!("warning: exported unsigned image(s) {}; installers will refuse them", e.unsigned.join(", "));
            }
            let to_stdout = crate::export::is_stdout(&o.out);
            let text = |e: &crate::export::Exported| {
                let mut s =
                    format!("wrote {} ({}, {} blobs", e.path.display(), cli_support::human_bytes(e.bytes), e.blobs);
                if e.omitted_layers > 0 {
                    s += &format!(", {} layer(s) left out", e.omitted_layers);
                }
                s += ")\n";
                if let Some(m) = &e.minisig {
                    s += &format!("wrote {}\n", m.display());
                }
                s
            };
            if to_stdout { out.emit_to_stderr(&e, text) } else { out.emit(&e, text) }
        }
        Command::Push(o) => {
            let layout = open_store(g, false)?;
            let key = load_key(g)?;
            let bar =
                crate::progress::spinner(&format!("pushing {} to {}", o.reference, o.destination), g.common.quiet);
            let p = crate::registry_cmd::push(&layout, &o, key.as_ref(), g.common.dry_run);
            bar.finish_and_clear();
            let p = p?;
            if p.signature_tag.is_none() && !g.common.quiet {
                eprintln!(
                    "warning: {} is unsigned; installers will refuse it: sign it with `op-dbus-image sign {}` and push again",
                    p.reference, p.reference
                );
            }
            out.emit(&p, |p| {
                if p.dry_run {
                    return format!("would push {} ({}) to {}\n", p.reference, p.digest, p.destination);
                }
                let mut s = format!(
                    "pushed {} ({}) to {}: {} blob(s) uploaded ({}), {} already there\n",
                    p.reference,
                    p.digest,
                    p.destination,
                    p.stats.blobs_uploaded,
                    cli_support::human_bytes(p.stats.bytes_uploaded),
                    p.stats.blobs_present
                );
                if let Some(t) = &p.signature_tag {
                    s += &format!("  signatures tagged {t}\n");
                }
                s
            })
        }
        Command::Channel(crate::channel::ChannelCommand::Set(o)) => {
            let layout = open_store(g, false)?;
            let key = require_key(g)?;
            let set = crate::channel::set(&layout, &o, &key, g.common.dry_run)?;
            out.emit(&set, crate::channel::render)
        }
        Command::Pull(o) => {
            let bar = crate::progress::spinner(&format!("pulling {}", o.source), g.common.quiet);
            let p = crate::registry_cmd::pull(&g.store(), &o, g.common.dry_run);
            bar.finish_and_clear();
            let p = p?;
            if !p.signed && !g.common.quiet {
                eprintln!("warning: {} has no signatures in the registry; installers will refuse it", p.source);
            }
            out.emit(&p, |p| {
                let mut s = format!(
                    "{} {} as {} ({}): {} blob(s) fetched ({}), {} already in the store\n",
                    if p.dry_run { "would pull" } else { "pulled" },
                    p.source,
                    p.reference,
                    p.digest,
                    p.stats.blobs_fetched,
                    cli_support::human_bytes(p.stats.bytes_fetched),
                    p.stats.blobs_present
                );
                if let Some(r) = &p.replaced {
                    s += &format!("  replaced the image {} tagged {} before\n", r, p.reference);
                }
                s
            })
        }
    }
}

fn finish_build(
    g: &GlobalOpts,
    layout: Option<&Layout>,
    outcome: Outcome,
    key: Option<&PrivateKey>,
    expires: Option<&Expires>,
) -> Result<()> {
    let out = Output::new(&g.common);
    match outcome {
        Outcome::Planned(p) => out.emit(&p, |p| {
            let mut s = format!(
                "would build {} from {} entries ({})\n",
                p.reference,
                p.entries.len(),
                cli_support::human_bytes(p.content_bytes)
            );
            for step in &p.build_steps {
                s += &format!("  build step: {step}\n");
            }
            if let Some(parent) = &p.parent {
                s += &format!("  as a delta on {parent}\n");
            }
            s
        }),
        Outcome::Built(mut b) => {
            let reference: Reference = b.reference.parse()?;
            match (key, layout) {
                (Some(key), Some(layout)) => {
                    let built = crate::inspect::Tagged { reference, digest: b.digest };
                    let s = crate::sign::sign_built(layout, &built, key, expires)?;
                    b.signed_by.push(s.key_id);
                }
                (None, _) if !g.common.quiet => eprintln!(
                    "warning: {} is unsigned (no --key, or --no-sign); installers refuse unsigned images: sign it with `op-dbus-image sign {} --key KEY`",
                    b.reference, b.reference
                ),
                _ => {}
            }
            out.emit(&b, |b| {
                let mut s = format!("built {} {}\n", b.reference, b.digest);
                s += &format!(
                    "  {} entries, {} of content, payload {}\n",
                    b.entries,
                    cli_support::human_bytes(b.content_bytes),
                    cli_support::human_bytes(b.payload_bytes)
                );
                if let Some(p) = &b.parent {
                    s += &format!("  delta on {p}\n");
                }
                for k in &b.signed_by {
                    s += &format!("  signed by {k}\n");
                }
                s
            })
        }
    }
}

fn secret_command(g: &GlobalOpts, s: SecretCommand) -> Result<()> {
    let output = Output::new(&g.common);
    let rel = |p: &str| -> Result<formats::path::RelPath> {
        p.parse()
            .map_err(|e| cli_support::exit::Usage(format!("{p:?} is not a path inside a stage folder: {e}")).into())
    };
    let verb = |dry: bool, did: &str, would: &str| if dry { would.to_owned() } else { did.to_owned() };
    match s {
        SecretCommand::Add { stage_dir, path, file, inventory } => {
            let path = rel(&path)?;
            let inventory = inventory.as_deref().map(crate::fleet::Inventory::read).transpose()?;
            let plaintext = crate::secrets::read_plaintext(file.as_deref())?;
            let r = crate::secrets::add(&stage_dir, &path, &plaintext, inventory.as_ref(), g.common.dry_run)?;
            output.emit(&r, |r| {
                format!(
                    "{} {} for {} recipient(s)\n",
                    verb(r.dry_run, "encrypted to", "would encrypt to"),
                    r.file.display(),
                    r.recipients.len()
                )
            })
        }
        SecretCommand::Rm { stage_dir, path } => {
            let r = crate::secrets::rm(&stage_dir, &rel(&path)?, g.common.dry_run)?;
            output.emit(&r, |r| format!("{} {}\n", verb(r.dry_run, "removed", "would remove"), r.file.display()))
        }
        SecretCommand::List { stage_dir, inventory } => {
            let inventory = inventory.as_deref().map(crate::fleet::Inventory::read).transpose()?;
            let doc = crate::secrets::list(&stage_dir, inventory.as_ref())?;
            output.emit(&doc, |d| {
                if d.secrets.is_empty() {
                    return "no secrets (no `type: secret` files in manifest.yaml)\n".into();
                }
                let rows: Vec<Vec<String>> = d
                    .secrets
                    .iter()
                    .map(|x| {
                        vec![
                            x.path.clone(),
                            x.target.clone(),
                            x.mode.clone(),
                            x.owner.clone().unwrap_or_else(|| "root".into()),
                            x.encrypted_to.map_or("-".into(), |n| n.to_string()),
                            x.problem.clone().unwrap_or_else(|| "ok".into()),
                        ]
                    })
                    .collect();
                cli_support::table(&["PATH", "TARGET", "MODE", "OWNER", "RECIPIENTS", "STATUS"], &rows, &[])
            })
        }
    }
}

fn key_command(g: &GlobalOpts, k: KeyCommand) -> Result<()> {
    let output = Output::new(&g.common);
    match k {
        KeyCommand::Generate { out } => {
            let public = keys::private_key::pub_path(&out);
            if g.common.dry_run {
                let plan = KeyGenerated { key_id: None, private: out, public, dry_run: true };
                return output
                    .emit(&plan, |p| format!("would write {} and {}\n", p.private.display(), p.public.display()));
            }
            let key = PrivateKey::generate()?;
            key.write_new(&out)?;
            let doc = KeyGenerated { key_id: Some(key.key_id()), private: out, public, dry_run: false };
            output.emit(&doc, |d| {
                format!(
                    "wrote {} (private, mode 0600) and {}\nkey id {}\n",
                    d.private.display(),
                    d.public.display(),
                    key.key_id()
                )
            })
        }
        KeyCommand::Show { file } => {
            let key = read_any_public(&file)?;
            let doc = KeyShown { key_id: key.key_id(), file };
            output.emit(&doc, |d| format!("{}\n", d.key_id))
        }
        KeyCommand::Export { file, minisign: _ } => {
            let key = read_any_public(&file)?;
            let doc = KeyExported { key_id: key.key_id(), minisign: key.to_minisign() };
            output.emit(&doc, |d| d.minisign.clone())
        }
    }
}

/// A public key file, or the public half of a private key file.
fn read_any_public(file: &Path) -> Result<PublicKey> {
    match PublicKey::read(file) {
        Ok(k) => Ok(k),
        Err(keys::KeyError::PrivateKeyGiven { .. }) => Ok(PrivateKey::read(file)?.public()),
        Err(e) => Err(e.into()),
    }
}

fn render_inspection(i: &crate::inspect::Inspection) -> String {
    let m = &i.manifest;
    let mut s = format!("{} {}\n", i.reference, i.digest);
    if let Some(c) = &i.created {
        s += &format!("  created      {c}\n");
    }
    if let Some(d) = &m.description {
        s += &format!("  description  {d}\n");
    }
    if let Some(c) = &m.component {
        s += &format!("  component    {c}\n");
    }
    if !m.plugins.is_empty() {
        s += &format!("  plugins      {}\n", m.plugins.join(", "));
    }
    if let Some(f) = &m.requires_feature {
        s += &format!("  feature      {f}\n");
    }
    for d in &m.dependencies {
        s += &format!("  depends on   {d}\n");
    }
    for h in &m.host_requirements {
        s += &format!("  host needs   {h} (not checked)\n");
    }
    for c in &m.cleanup {
        s += &format!("  cleanup note {c}\n");
    }
    for l in &i.layers {
        s += &format!("  layer        {} {} bytes {}\n", l.digest, l.size, l.media_type);
        if let Some(p) = l.annotation(formats::oci::ANNOTATION_PARENT) {
            s += &format!("               delta on {p}\n");
        }
    }
    if i.signatures.is_empty() {
        s += "  signatures   none (unsigned: installers will refuse it)\n";
    }
    for sig in &i.signatures {
        s += &format!("  signed by    {}", sig.key_id.as_deref().unwrap_or("unknown key"));
        if let Some(e) = &sig.expires {
            s += &format!(" until {e}");
        }
        s += "\n";
    }
    for f in &m.files {
        let kind = f.kind.as_str();
        let owner = match (&f.owner, &f.group) {
            (None, None) => String::new(),
            (o, g) => format!(
                ", owner {}:{}",
                o.as_ref().map_or("root".to_owned(), ToString::to_string),
                g.as_ref().map_or("-".to_owned(), ToString::to_string)
            ),
        };
        s += &format!("  file         {} -> {} ({kind}{owner})\n", f.path, f.target);
    }
    for u in &m.users {
        s += &format!("  user         {}\n", u.name);
    }
    for v in &m.services {
        s += &format!("  service      {v}\n");
    }
    for v in &m.verify {
        s += &format!(
            "  verify       {} (exit {}, timeout {} s)\n",
            v.command,
            v.expect_exit,
            v.timeout.duration().as_secs()
        );
    }
    s += &format!("  entries      {}\n", m.entries.len());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_flags_before_or_after() {
        let a = Cli::try_parse_from(["op-dbus-image", "--json", "--store", "/s", "list"]).unwrap();
        let b = Cli::try_parse_from(["op-dbus-image", "list", "--json", "--store", "/s"]).unwrap();
        assert!(a.global.common.json && b.global.common.json);
        assert_eq!(a.global.store, b.global.store);
    }

    #[test]
    fn parses_commands() {
        let c = Cli::try_parse_from([
            "op-dbus-image",
            "create",
            "X_STAGE",
            "--files",
            "a:/usr/local/bin/a",
            "b",
            "--version",
            "1.2.3",
        ])
        .unwrap();
        let Command::Create(o) = c.command else { panic!() };
        assert_eq!(o.files.len(), 2);
        assert_eq!(o.stage_version.to_string(), "1.2.3");
        assert!(Cli::try_parse_from(["op-dbus-image", "build", "d", "--parent", "nocolon"]).is_err());
        assert!(Cli::try_parse_from(["op-dbus-image", "export", "a:1.0.0"]).is_err(), "--out is required");
        assert!(Cli::try_parse_from(["op-dbus-image", "key", "export", "k.pub"]).is_err(), "--minisign is required");
        Cli::try_parse_from(["op-dbus-image", "export", "a:1.0.0", "b:2.0.0", "--out", "f", "--since", "a:0.9.0"])
            .unwrap();
        Cli::try_parse_from(["op-dbus-image", "export", "a:1.0.0", "--with-deps", "--out", "f"]).unwrap();
        let c = Cli::try_parse_from(["op-dbus-image", "push", "a:1.0.0", "127.0.0.1:5000/a", "--insecure"]).unwrap();
        let Command::Push(p) = c.command else { panic!() };
        assert!(p.registry.insecure);
        assert!(
            Cli::try_parse_from(["op-dbus-image", "pull", "h.io/a:1", "--username", "u"]).is_err(),
            "--username needs --password-stdin"
        );
        Cli::try_parse_from(["op-dbus-image", "pull", "h.io/a:1", "--username", "u", "--password-stdin"]).unwrap();
    }
}

#[cfg(test)]
mod help {
    cli_support::help_tests!(super::Cli, registry_flags_on: ["op-dbus-image channel set", "op-dbus-image pull", "op-dbus-image push"]);
}
