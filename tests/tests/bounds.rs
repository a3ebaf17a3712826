//! Resource bounds (issue 9, point 6): every layer, every image and every unauthenticated
//! byte has a bound, and the state a stage adds is bounded by what its signed manifest
//! declares. Each case is signed by a trusted key (or comes before any signature), must be
//! refused with exit 7 quickly, naming the bound, and leave the host as it was and usable.

mod hostile_util;
mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use formats::Digest;
use formats::oci::{self, Descriptor, ImageIndex};
use serde_json::json;

use hostile_util::*;
use util::{bin, ok};

fn trusted_host() -> (Host, keys::PrivateKey) {
    let host = Host::new();
    let key = host.key("signing.key");
    host.trust("signing.key");
    (host, key)
}

/// Deploys `src` (killed after two minutes); it must exit with one of `codes` within
/// `within`, say `needle`, change nothing, and leave `list` and `recover` working.
#[track_caller]
fn refused(host: &Host, src: &Path, codes: &[i32], needle: &str, within: Duration) {
    let before = host.snapshot();
    let start = Instant::now();
    let out = Command::new("timeout")
        .arg("120")
        .arg(bin("op-dbus-stage"))
        .arg("--root")
        .arg(host.root())
        .arg("deploy")
        .arg(src)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let elapsed = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().unwrap_or(-1);
    assert!(codes.contains(&code), "exit {code} (expected {codes:?}) after {elapsed:?}: {err}");
    assert!(err.contains(needle), "the error does not name the bound ({needle:?}): {err}");
    assert!(elapsed <= within, "took {elapsed:?} (at most {within:?}): {err}");
    let after = host.snapshot();
    assert!(before == after, "the host changed: {}", diff(&before, &after));
    ok(host.stage().arg("recover"));
    ok(host.stage().arg("list"));
}

/// A tar entry for `name` claiming `mib` MiB, then `mib` MiB of zeros as zstd frames.
fn zero_file(name: &str, mib: usize) -> Vec<u8> {
    let mut out = zst(&headers(&Raw { size: (mib as u64) << 20, ..file(name, b"") }));
    out.extend_from_slice(&zero_frames(mib));
    out
}

#[test]
fn bounds_lower_layer_bytes_are_bounded_by_the_signed_manifest() {
    let (host, key) = trusted_host();
    // 32 files of 32 MiB of zeros (each under the per-file cap of 1024 x the blob's size)
    // in a 100 KiB lower layer; the image declares 3 bytes.
    let mut lower = Vec::new();
    for i in 0..32 {
        lower.extend_from_slice(&zero_file(&format!("old{i}"), 32));
    }
    lower.extend_from_slice(&zst(&[0; 1024]));
    let archive = host.export(&Forge::new(&key, &base_config(), vec![lower, zst(&tar_bytes(&base_raw()))]));
    refused(&host, &archive, &[7], "more content bytes than the signed manifest allows", Duration::from_secs(20));
}

#[test]
fn bounds_entries_of_lower_layers_and_whiteouts_are_counted() {
    let (host, key) = trusted_host();
    // 200,000 empty files in a lower layer; the image declares 3 entries.
    let entries: Vec<Raw> = (0..200_000).map(|i| file(format!("e/{i}"), b"")).collect();
    let mut all = vec![dir("e/")];
    all.extend(entries);
    let lower = zst(&tar_bytes(&all));
    let archive = host.export(&Forge::new(&key, &base_config(), vec![lower, zst(&tar_bytes(&base_raw()))]));
    refused(&host, &archive, &[7], "more entries than the signed manifest allows", Duration::from_secs(20));
}

#[test]
fn bounds_state_a_stage_adds_is_bounded_and_state_json_stays_readable() {
    let (host, key) = trusted_host();
    // 700 linked files with 1.6 KB paths and targets: 2.5 MB of state for one generation.
    let deep: String = (0..8).map(|i| format!("{}{i}/", "p".repeat(199))).collect();
    let mut raw = vec![];
    let mut entries = vec![];
    let mut files = vec![];
    let mut so_far = String::new();
    for c in deep.trim_end_matches('/').split('/') {
        so_far.push_str(c);
        raw.push(dir(format!("{so_far}/")));
        entries.push(e_dir(&so_far, "0755"));
        so_far.push('/');
    }
    for i in 0..700 {
        let p = format!("{deep}f{i:04}");
        raw.push(file(&p, CONTENT));
        entries.push(e_file(&p, "0644", CONTENT));
        files.push(json!({"path": p, "target": format!("/opt/{deep}f{i:04}")}));
    }
    let layer = zst(&tar_bytes(&raw));
    let archive = host.export(&Forge::new(&key, &config(NAME, json!(files), entries), vec![layer]));
    refused(&host, &archive, &[7], "state", Duration::from_secs(60));
}

#[test]
fn bounds_archive_with_thousands_of_tags_is_refused_quickly() {
    let (host, key) = trusted_host();
    let f = Forge::tar(&key, &base_raw());
    let archive = host.export_raw(&f, |fo, e| {
        let mut index = ImageIndex::default();
        index.set(&fo.tag, fo.image.clone());
        index.set(&fo.sig_tag, fo.sig.clone().unwrap());
        for i in 0..8000 {
            let d = Descriptor::of(oci::MANIFEST_MEDIA_TYPE, format!("missing {i}").as_bytes());
            index.set(&format!("app{i}:1.0.{i}"), d);
        }
        e[1] = file("index.json", &index.to_bytes());
        // Thousands of small unsigned blobs, each arrival a reason to look at every tag.
        for i in 0..3000 {
            let b = format!("blob {i}");
            e.insert(4, file(format!("blobs/sha256/{}", Digest::of(b.as_bytes()).hex()), b.as_bytes()));
        }
    });
    refused(&host, &archive, &[7], "tags", Duration::from_secs(10));
}

#[test]
fn bounds_unsigned_blobs_of_an_image_whose_signatures_never_come() {
    let (host, key) = trusted_host();
    let f = Forge::tar(&key, &base_raw());
    let archive = host.export_raw(&f, |fo, e| {
        let mut index = ImageIndex::default();
        index.set(&fo.tag, fo.image.clone());
        index.set(&fo.sig_tag, fo.sig.clone().unwrap());
        // A second image whose manifest, config and signatures never arrive.
        index.set("ghost:1.0.0", Descriptor::of(oci::MANIFEST_MEDIA_TYPE, b"never"));
        e[1] = file("index.json", &index.to_bytes());
        // 6 unsigned blobs of 60 MiB, each under the per-blob cap of a config.
        for i in 0..6u8 {
            let mut b = vec![0u8; 60 << 20];
            b[0] = i;
            e.push(file(format!("blobs/sha256/{}", Digest::of(&b).hex()), &b));
        }
    });
    refused(&host, &archive, &[7], "unauthenticated", Duration::from_secs(20));
}

/// A layout directory holding the forged image, with `blob` replaced by a sparse file of
/// `gib` GiB (its digest unchanged: it is never read to the end if all is well).
fn layout_with_huge_blob(
    host: &Host,
    f: &Forge<'_>,
    pick: impl Fn(&hostile_util::Forged) -> Digest,
    gib: u64,
) -> PathBuf {
    let dir = host.fresh("layout");
    let forged = f.write(&dir);
    let d = pick(&forged);
    let p = forged.layout.blob_path(&d);
    fs::remove_file(&p).unwrap();
    let file = fs::File::create(&p).unwrap();
    file.set_len(gib << 30).unwrap();
    dir
}

#[test]
fn bounds_layout_source_copies_no_blob_beyond_its_cap_before_authentication() {
    let (host, key) = trusted_host();
    // An unsigned "manifest" of 8 GiB.
    let f = Forge::tar(&key, &base_raw());
    let dir = layout_with_huge_blob(&host, &f, |fo| fo.image.digest, 8);
    refused(&host, &dir, &[7], "larger than", Duration::from_secs(10));
    // A payload layer of 8 GiB whose signature manifest is missing: never copied.
    let dir = host.fresh("layout");
    let forged = f.write(&dir);
    fs::remove_file(forged.layout.blob_path(&forged.sig.clone().unwrap().digest)).unwrap();
    let m = formats::oci::ImageManifest::from_bytes(&forged.blob(&forged.image.digest)).unwrap();
    let layer = forged.layout.blob_path(&m.layers[0].digest);
    fs::remove_file(&layer).unwrap();
    fs::File::create(&layer).unwrap().set_len(8 << 30).unwrap();
    refused(&host, &dir, &[7], "missing", Duration::from_secs(10));
}
