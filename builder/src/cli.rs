//! The command line of `op-dbus-image` (docs/commands.md): clap types and the one dispatch.
// Doc comments on the clap types below are `--help` text, written for a terminal:
// `HOST[:PORT]` there is command-line syntax, not a rustdoc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use formats::layout::Layout;
use formats::{Reference, StageName, Version};
use keys::simple_signing::Expires;
use keys::{PrivateKey, PublicKey};

use crate::build::{Format, Outcome, Settings};
use crate::error;

/// Builds, signs, stores and exports op-dbus stage images.
#[derive(Debug, Parser)]
#[command(name = "op-dbus-image", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags accepted before or after the subcommand.
#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// The image store (an OCI layout directory).
    #[arg(long, global = true, env = "OP_DBUS_STORE", default_value = "/var/lib/op-dbus/deployment/images")]
    pub store: PathBuf,
    /// The ed25519 signing key (PKCS#8 PEM, mode 0600).
    #[arg(long, global = true, env = "OP_DBUS_SIGNING_KEY")]
    pub key: Option<PathBuf>,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print the plan and change nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr; no progress bars.
    #[arg(short, long, global = true)]
    pub quiet: bool,
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
    /// Push an image and its signatures to an OCI registry (HOST[:PORT]/REPO[:TAG]).
    Push(crate::registry_cmd::PushOpts),
    /// Pull an image and its signatures from an OCI registry into the store.
    Pull(crate::registry_cmd::PullOpts),
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new private key to FILE (mode 0600) and its public key to FILE.pub.
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the key id of a public key (or of a private key's public half).
    Show { file: PathBuf },
    /// Print a public key in another format.
    Export {
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
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// Build a delta layer on top of this image (NAME:VERSION) of the store.
    #[arg(long)]
    pub parent: Option<Reference>,
    /// Signature expiry (RFC 3339, e.g. 2027-01-31T00:00:00Z).
    #[arg(long)]
    pub expires: Option<Expires>,
}

#[derive(Debug, Args)]
pub struct CreateOpts {
    /// The stage name.
    pub name: StageName,
    /// SRC or SRC:/TARGET; repeat or list several.
    #[arg(long, required = true, num_args = 1..)]
    pub files: Vec<String>,
    /// The stage version.
    #[arg(long = "version", default_value = "0.1.0")]
    pub stage_version: Version,
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// Signature expiry (RFC 3339).
    #[arg(long)]
    pub expires: Option<Expires>,
}

#[derive(Debug, Args)]
pub struct SignOpts {
    pub reference: Reference,
    /// Signature expiry (RFC 3339).
    #[arg(long)]
    pub expires: Option<Expires>,
}

#[derive(Debug, Args)]
pub struct InspectOpts {
    pub reference: Reference,
}

#[derive(Debug, Args)]
pub struct ExportOpts {
    /// Images (NAME:VERSION) to export.
    #[arg(required = true)]
    pub images: Vec<Reference>,
    #[arg(long)]
    pub out: PathBuf,
    /// Leave out payload layers this image (NAME:VERSION) has: a thin export for hosts that have it.
    #[arg(long)]
    pub since: Option<Reference>,
    /// Also export the stages these images depend on (their embedded `dependencies`), each
    /// the highest version in the store that matches, recursively.
    #[arg(long)]
    pub with_deps: bool,
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
    init_tracing(&cli.global);
    match run(cli) {
        Ok(()) => error::OK,
        Err(e) => {
            eprintln!("op-dbus-image: error: {e:#}");
            crate::registry_cmd::exit_code(&e).unwrap_or_else(|| error::exit_code(&e))
        }
    }
}

fn init_tracing(g: &GlobalOpts) {
    let level = match (g.quiet, g.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Prints `value` as JSON, or `text` for people.
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

fn load_key(g: &GlobalOpts) -> Result<Option<PrivateKey>> {
    g.key
        .as_deref()
        .map(|p| PrivateKey::read(p).with_context(|| "loading the signing key (--key or OP_DBUS_SIGNING_KEY)"))
        .transpose()
}

fn require_key(g: &GlobalOpts) -> Result<PrivateKey> {
    load_key(g)?.context("no signing key: pass --key FILE or set OP_DBUS_SIGNING_KEY (make one with `op-dbus-image key generate --out FILE`)")
}

fn open_store(g: &GlobalOpts, create: bool) -> Result<Layout> {
    let r = if create { Layout::open_or_create(&g.store) } else { Layout::open(&g.store) };
    r.with_context(|| format!("opening the image store {}", g.store.display()))
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Key(k) => key_command(g, k),
        Command::Build(o) => {
            let key = load_key(g)?;
            let layout = if g.dry_run { None } else { Some(open_store(g, true)?) };
            let settings = Settings { layout: layout.as_ref(), format: o.format, parent: o.parent, quiet: g.quiet };
            let outcome = crate::build::build(&o.stage_dir, &settings)
                .with_context(|| format!("building {}", o.stage_dir.display()))?;
            finish_build(g, layout.as_ref(), outcome, key.as_ref(), o.expires.as_ref())
        }
        Command::Create(o) => {
            let key = load_key(g)?;
            let layout = if g.dry_run { None } else { Some(open_store(g, true)?) };
            let settings = Settings { layout: layout.as_ref(), format: o.format, parent: None, quiet: g.quiet };
            let outcome = crate::build::create(o.name.clone(), o.stage_version, &o.files, &settings)
                .with_context(|| format!("creating {}", o.name))?;
            finish_build(g, layout.as_ref(), outcome, key.as_ref(), o.expires.as_ref())
        }
        Command::Sign(o) => {
            let key = require_key(g)?;
            let layout = open_store(g, false)?;
            if g.dry_run {
                let image = crate::inspect::StoredImage::load(&layout, &o.reference)?;
                let plan = serde_json::json!({"reference": o.reference.to_string(), "digest": image.digest, "key_id": key.key_id().to_string()});
                return emit(g.json, &plan, |_| {
                    format!("would sign {} ({}) with key {}\n", o.reference, image.digest, key.key_id())
                });
            }
            let s = crate::sign::sign(&layout, &o.reference, &key, o.expires.as_ref())?;
            emit(g.json, &s, |s| {
                format!("signed {} ({}) with key {}; {} signature(s)\n", s.reference, s.digest, s.key_id, s.signatures)
            })
        }
        Command::Inspect(o) => {
            let layout = open_store(g, false)?;
            let i = crate::inspect::inspect(&layout, &o.reference)?;
            emit(g.json, &i, render_inspection)
        }
        Command::List => {
            let layout = open_store(g, false)?;
            let images = crate::inspect::list(&layout)?;
            let doc = serde_json::json!({ "images": images });
            emit(g.json, &doc, |_| {
                let mut s = String::new();
                for i in &images {
                    s +=
                        &format!("{:<32} {:<12} {} {:>10} {} sig\n", i.name, i.version, i.digest, i.size, i.signatures);
                }
                if images.is_empty() {
                    s += &format!("no images in {}\n", layout.root().display());
                }
                s
            })
        }
        Command::Export(o) => {
            let layout = open_store(g, false)?;
            let images = if o.with_deps { crate::deps::with_dependencies(&layout, &o.images)? } else { o.images };
            let plan = crate::export::plan(&layout, &images, o.since.as_ref())?;
            if g.dry_run {
                let d = crate::export::dry_run(&plan, &o.out);
                return emit(g.json, &d, |d| {
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
            let e = crate::export::export(&layout, &images, &plan, &o.out, key.as_ref(), g.quiet)?;
            if !e.unsigned.is_empty() && !g.quiet {
                eprintln!("warning: exported unsigned image(s) {}; installers will refuse them", e.unsigned.join(", "));
            }
            emit(g.json, &e, |e| {
                let mut s = format!("wrote {} ({} bytes, {} blobs", e.path.display(), e.bytes, e.blobs);
                if e.omitted_layers > 0 {
                    s += &format!(", {} layer(s) left out", e.omitted_layers);
                }
                s += ")\n";
                if let Some(m) = &e.minisig {
                    s += &format!("wrote {}\n", m.display());
                }
                s
            })
        }
        Command::Push(o) => {
            let layout = open_store(g, false)?;
            let p = crate::registry_cmd::push(&layout, &o, g.dry_run)?;
            if p.signature_tag.is_none() && !g.quiet {
                eprintln!(
                    "warning: {} is unsigned; installers will refuse it: sign it with `op-dbus-image sign {}` and push again",
                    p.reference, p.reference
                );
            }
            emit(g.json, &p, |p| {
                if p.dry_run {
                    return format!("would push {} ({}) to {}\n", p.reference, p.digest, p.destination);
                }
                let mut s = format!(
                    "pushed {} ({}) to {}: {} blob(s) uploaded ({} bytes), {} already there\n",
                    p.reference,
                    p.digest,
                    p.destination,
                    p.stats.blobs_uploaded,
                    p.stats.bytes_uploaded,
                    p.stats.blobs_present
                );
                if let Some(t) = &p.signature_tag {
                    s += &format!("  signatures tagged {t}\n");
                }
                s
            })
        }
        Command::Pull(o) => {
            let p = crate::registry_cmd::pull(&g.store, &o, g.dry_run)?;
            if !p.signed && !g.quiet {
                eprintln!("warning: {} has no signatures in the registry; installers will refuse it", p.source);
            }
            emit(g.json, &p, |p| {
                let mut s = format!(
                    "{} {} as {} ({}): {} blob(s) fetched ({} bytes), {} already in the store\n",
                    if p.dry_run { "would pull" } else { "pulled" },
                    p.source,
                    p.reference,
                    p.digest,
                    p.stats.blobs_fetched,
                    p.stats.bytes_fetched,
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
    match outcome {
        Outcome::Planned(p) => emit(g.json, &p, |p| {
            let mut s =
                format!("would build {} from {} entries ({} bytes)\n", p.reference, p.entries.len(), p.content_bytes);
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
                    let s = crate::sign::sign(layout, &reference, key, expires)?;
                    b.signed_by.push(s.key_id);
                }
                (None, _) if !g.quiet => eprintln!(
                    "warning: {} is unsigned (no --key); installers refuse unsigned images: sign it with `op-dbus-image sign {} --key KEY`",
                    b.reference, b.reference
                ),
                _ => {}
            }
            emit(g.json, &b, |b| {
                let mut s = format!("built {} {}\n", b.reference, b.digest);
                s += &format!(
                    "  {} entries, {} bytes of content, payload {} bytes\n",
                    b.entries, b.content_bytes, b.payload_bytes
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

fn key_command(g: &GlobalOpts, k: KeyCommand) -> Result<()> {
    match k {
        KeyCommand::Generate { out } => {
            let pub_path = keys::private_key::pub_path(&out);
            if g.dry_run {
                let plan = serde_json::json!({"private": out, "public": pub_path});
                return emit(g.json, &plan, |_| format!("would write {} and {}\n", out.display(), pub_path.display()));
            }
            let key = PrivateKey::generate()?;
            key.write_new(&out)?;
            let doc = serde_json::json!({"key_id": key.key_id().to_string(), "private": out, "public": pub_path});
            emit(g.json, &doc, |_| {
                format!(
                    "wrote {} (private, mode 0600) and {}\nkey id {}\n",
                    out.display(),
                    pub_path.display(),
                    key.key_id()
                )
            })
        }
        KeyCommand::Show { file } => {
            let key = read_any_public(&file)?;
            let doc = serde_json::json!({"key_id": key.key_id().to_string(), "file": file});
            emit(g.json, &doc, |_| format!("{}\n", key.key_id()))
        }
        KeyCommand::Export { file, minisign: _ } => {
            let key = read_any_public(&file)?;
            let text = key.to_minisign();
            let doc = serde_json::json!({"key_id": key.key_id().to_string(), "minisign": text});
            emit(g.json, &doc, |_| text.clone())
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
        s += &format!("  file         {} -> {} ({:?})\n", f.path, f.target, f.kind);
    }
    for v in &m.services {
        s += &format!("  service      {v}\n");
    }
    for v in &m.verify {
        s += &format!("  verify       {} (exit {}, {:?})\n", v.command, v.expect_exit, v.timeout);
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
        assert!(a.global.json && b.global.json);
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
