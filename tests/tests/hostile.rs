//! The hostile corpus: images that are properly signed by a key the installer trusts and
//! still must be refused, because only the installer's own checks stand in the way
//! (docs/README.md, guarantees 1, 2 and 5).
//!
//! Every case deploys a forged `.oci.tar` with the real `op-dbus-stage` into a scratch root
//! and asserts: the expected exit code (7 malformed, 4 policy, 3 signature), the root
//! byte-identical to before, an empty canary directory beside the root that hostile paths
//! aim at, an untouched file outside the root that hard links aim at, and nothing else
//! created beside the root. Each table reports every case (run with `--nocapture` to see
//! the list) and fails naming the cases that did not hold.
//!
//! Also here: bit flips in every part of a real export (tampering), and the trust policy
//! (scopes, revocation, thresholds, expiry) through the binaries.

mod hostile_util;
mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use formats::Digest;
use formats::oci::{self, Descriptor, ImageManifest};
use serde_json::{Value, json};

use hostile_util::*;
use util::{image, json as parse_json, keygen, ok};

/// A host trusting one key, and that key.
fn trusted_host() -> (Host, keys::PrivateKey) {
    let host = Host::new();
    let key = host.key("signing.key");
    host.trust("signing.key");
    (host, key)
}

/// `base_raw()` with `extra` appended.
fn base_plus(extra: Vec<Raw>) -> Vec<Raw> {
    let mut e = base_raw();
    e.extend(extra);
    e
}

/// `base_raw()` with entry `i` replaced.
fn base_with(i: usize, r: Raw) -> Vec<Raw> {
    let mut e = base_raw();
    e[i] = r;
    e
}

// ---------------------------------------------------------------------------------------
// The forger itself: a forged image that is not hostile deploys.

#[test]
fn forged_well_formed_image_deploys() {
    let (host, key) = trusted_host();
    let archive = host.export(&Forge::tar(&key, &base_raw()));
    let run = host.deploy(&archive, &[]);
    assert_eq!(run.code(), 0, "the forger makes images the installer refuses: {}", run.stderr());
    let staged = host.root().join("var/lib/op-dbus/staging/app");
    assert_eq!(fs::read(staged.join("d/f")).unwrap(), CONTENT);
    assert_eq!(fs::read_link(staged.join("l")).unwrap(), Path::new("d/f"));
    assert_eq!(
        fs::read_link(host.root().join("usr/local/bin/hostile-f")).unwrap(),
        Path::new("/var/lib/op-dbus/staging/app/d/f")
    );
    // The same through raw archive entries (the path malformed-archive cases take).
    let host = Host::new();
    let key = host.key("k");
    host.trust("k");
    let archive = host.export_raw(&Forge::tar(&key, &base_raw()), |_, _| {});
    let run = host.deploy(&archive, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    // Two layers, a file replaced and one whited out in the second: still fine.
    let host = Host::new();
    let key = host.key("k");
    host.trust("k");
    let lower = zst(&tar_bytes(&[dir("d/"), file("d/f", b"old content"), file("d/gone", b"x")]));
    let upper = zst(&tar_bytes(&[file("d/f", CONTENT), file("d/.wh.gone", b""), symlink("l", "d/f")]));
    let archive = host.export(&Forge::new(&key, &base_config(), vec![lower, upper]));
    let run = host.deploy(&archive, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
}

#[test]
fn a_tar_payloads_owners_are_never_used() {
    use std::os::unix::fs::MetadataExt;
    let (host, key) = trusted_host();
    let owned = |r: Raw| Raw { owner: (1000, 1001), ..r };
    let entries = vec![owned(dir("d/")), owned(file("d/f", CONTENT)), owned(symlink("l", "d/f"))];
    let archive = host.export(&Forge::tar(&key, &entries));
    let run = host.deploy(&archive, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let staged = host.root().join("var/lib/op-dbus/staging/app");
    for p in ["d", "d/f", "l"] {
        let m = fs::symlink_metadata(staged.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{p} has the owner its tar header claims");
    }
    // What the signed manifest declares is what counts.
    let host = Host::new();
    let key = host.key("k");
    host.trust("k");
    let files =
        serde_json::json!([{"path": "d/f", "target": "/usr/local/bin/hostile-f", "owner": 4242, "group": 4343}]);
    let archive = host.export(&Forge::new(&key, &config(NAME, files, base_entries()), vec![zst(&tar_bytes(&entries))]));
    let run = host.deploy(&archive, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let staged = host.root().join("var/lib/op-dbus/staging/app");
    assert_eq!(fs::metadata(staged.join("d/f")).unwrap().uid(), 4242);
    assert_eq!(fs::metadata(staged.join("d/f")).unwrap().gid(), 4343);
    assert_eq!(fs::metadata(staged.join("d")).unwrap().uid(), 0);
}

// ---------------------------------------------------------------------------------------
// Payload entries: paths

#[test]
fn hostile_payload_paths() {
    let (host, key) = trusted_host();
    let up = Host::up;
    let abs = host.abs_canary("pwned");
    let tar = |entries: Vec<Raw>| host.export(&Forge::tar(&key, &entries));
    let mut cases = vec![
        case("path ../canary/pwned", tar(base_plus(vec![file("../canary/pwned", CONTENT)])), MALFORMED),
        case("path ../ x7 canary/pwned", tar(base_plus(vec![file(up("canary/pwned"), CONTENT)])), MALFORMED),
        case(
            "path ../ x8 canary/pwned",
            tar(base_plus(vec![file(format!("../{}", up("canary/pwned")), CONTENT)])),
            MALFORMED,
        ),
        case(
            "path d/../../x7/canary/pwned",
            tar(base_plus(vec![file(format!("d/../{}", up("canary/pwned")), CONTENT)])),
            MALFORMED,
        ),
        case("path .. as a directory", tar(base_plus(vec![dir(format!("{}/", up("canary/sub")))])), MALFORMED),
        case("path .. first entry", tar([vec![file(up("canary/pwned"), CONTENT)], base_raw()].concat()), MALFORMED),
        case("path .. replacing the signed file", tar(base_with(1, file("d/../d/f", CONTENT))), MALFORMED),
        case("path absolute canary", tar(base_plus(vec![file(&abs, CONTENT)])), MALFORMED),
        case("path absolute directory", tar(base_plus(vec![dir(format!("{}/", host.abs_canary("sub")))])), MALFORMED),
        case("path absolute first entry", tar([vec![file(&abs, CONTENT)], base_raw()].concat()), MALFORMED),
        case("path /d/f (absolute spelling of a signed path)", tar(base_with(1, file("/d/f", CONTENT))), MALFORMED),
        case("path ./d/f", tar(base_with(1, file("./d/f", CONTENT))), MALFORMED),
        case("path d//f", tar(base_with(1, file("d//f", CONTENT))), MALFORMED),
        case("path backslashes", tar(base_plus(vec![file("d\\..\\..\\..\\canary\\pwned", CONTENT)])), MALFORMED),
        case(
            "path pax ..",
            tar(base_plus(vec![pax(&[("path", &up("canary/pwned"))]), file("d/harmless", CONTENT)])),
            MALFORMED,
        ),
        case("path pax absolute", tar(base_plus(vec![pax(&[("path", &abs)]), file("d/harmless", CONTENT)])), MALFORMED),
        case(
            "path pax .. over the signed file",
            tar(vec![dir("d/"), pax(&[("path", &up("canary/pwned"))]), file("d/f", CONTENT), symlink("l", "d/f")]),
            MALFORMED,
        ),
        case(
            "path GNU long name ..",
            tar(base_plus(vec![file(format!("{}{}", "../".repeat(40), "canary/pwned"), CONTENT)])),
            MALFORMED,
        ),
        case(
            "path GNU long name with NUL",
            tar(base_plus(vec![file(format!("d/{}\0/../../x", "a".repeat(120)), CONTENT)])),
            MALFORMED,
        ),
        case("path not UTF-8", tar(base_plus(vec![file(b"d/\xff\xfe", CONTENT)])), MALFORMED),
        case("path too deep", tar(base_plus(vec![file("a/".repeat(80) + "f", CONTENT)])), MALFORMED),
    ];
    // A whiteout of `..`, of an absolute path, and a whiteout in the first layer.
    let two = |upper: Vec<Raw>| {
        let lower = zst(&tar_bytes(&base_raw()));
        host.export(&Forge::new(&key, &base_config(), vec![lower, zst(&tar_bytes(&upper))]))
    };
    cases.push(case("whiteout of ..", two(vec![file(".wh...", b"")]), MALFORMED));
    cases.push(case("whiteout of d/..", two(vec![file("d/.wh...", b"")]), MALFORMED));
    cases.push(case("whiteout through ..", two(vec![file(up("canary/.wh.x"), b"")]), MALFORMED));
    cases.push(case("whiteout absolute", two(vec![file(host.abs_canary(".wh.x"), b"")]), MALFORMED));
    cases.push(case("whiteout in the first layer", tar(base_plus(vec![file("d/.wh.f", b"")])), MALFORMED));
    cases.push(case("whiteout opaque", two(vec![file("d/.wh..wh..opq", b"")]), MALFORMED));
    run_cases(&host, cases);
}

/// The signer (a trusted but compromised key) puts the escaping paths in the signed
/// manifest too, so that nothing but the path checks can refuse them.
#[test]
fn hostile_paths_also_in_the_signed_manifest() {
    let (host, key) = trusted_host();
    let mut cases = Vec::new();
    // `..`, `../..`, ... `../../../../../../..` as directories, then canary/ and the file.
    let mut chain: Vec<Value> = Vec::new();
    let mut p = String::from("..");
    for _ in 0..7 {
        chain.push(e_dir(&p, "0755"));
        p.push_str("/..");
    }
    let top = Host::up("canary");
    let top = top.trim_end_matches('/');
    chain.push(e_dir(top, "0755"));
    let pwned = format!("{top}/pwned");
    let mut entries = base_entries();
    entries.push(e_file(&pwned, "0644", CONTENT));
    entries.extend(chain.clone());
    let cfg = config(NAME, base_files(), entries.clone());
    // In the order the paths sort in, and the file alone (its parents already exist outside).
    let layer = zst(&tar_bytes(&[file(&pwned, CONTENT), dir("d/"), file("d/f", CONTENT), symlink("l", "d/f")]));
    cases.push(case(
        "signed .. chain, payload writes it",
        host.export(&Forge::new(&key, &cfg, vec![layer])),
        MALFORMED,
    ));
    let mut sorted = entries.clone();
    sorted.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    let cfg = config(NAME, base_files(), sorted);
    let layer = zst(&tar_bytes(&[file(&pwned, CONTENT), dir("d/"), file("d/f", CONTENT), symlink("l", "d/f")]));
    cases.push(case(
        "signed .. chain sorted, payload writes it",
        host.export(&Forge::new(&key, &cfg, vec![layer])),
        MALFORMED,
    ));
    // One `..` level: the file lands in the unpack area's parent.
    let mut e = vec![e_dir("..", "0755"), e_file("../pwned", "0644", CONTENT)];
    e.extend(base_entries());
    let cfg = config(NAME, base_files(), e);
    let layer = zst(&tar_bytes(&[file("../pwned", CONTENT), dir("d/"), file("d/f", CONTENT), symlink("l", "d/f")]));
    cases.push(case(
        "signed ../pwned, payload writes it",
        host.export(&Forge::new(&key, &cfg, vec![layer])),
        MALFORMED,
    ));
    // `d/../../pwned`: parents that exist inside, then out.
    let mut e = base_entries();
    e.push(e_file("d/../../pwned", "0644", CONTENT));
    let cfg = config(NAME, base_files(), e);
    let layer =
        zst(&tar_bytes(&[dir("d/"), file("d/../../pwned", CONTENT), file("d/f", CONTENT), symlink("l", "d/f")]));
    cases.push(case(
        "signed d/../../pwned, payload writes it",
        host.export(&Forge::new(&key, &cfg, vec![layer])),
        MALFORMED,
    ));
    // A `files:` entry naming a path with `..` (what gets linked to a target).
    let files = json!([{"path": "d/../d/f", "target": "/usr/local/bin/hostile-f"}]);
    let cfg = config(NAME, files, base_entries());
    cases.push(case(
        "files[].path d/../d/f",
        host.export(&Forge::new(&key, &cfg, vec![zst(&tar_bytes(&base_raw()))])),
        MALFORMED,
    ));
    let files = json!([{"path": Host::up("outside/secret"), "target": "/usr/local/bin/hostile-f"}]);
    let cfg = config(NAME, files, base_entries());
    cases.push(case(
        "files[].path ../x7/outside/secret",
        host.export(&Forge::new(&key, &cfg, vec![zst(&tar_bytes(&base_raw()))])),
        MALFORMED,
    ));
    let files = json!([{"path": "/d/f", "target": "/usr/local/bin/hostile-f"}]);
    let cfg = config(NAME, files, base_entries());
    cases.push(case(
        "files[].path /d/f",
        host.export(&Forge::new(&key, &cfg, vec![zst(&tar_bytes(&base_raw()))])),
        MALFORMED,
    ));
    // A whiteout of `..` whose target the manifest cannot mention: the second layer removes
    // the unpack directory's parent's contents if `..` passes.
    let lower = zst(&tar_bytes(&base_raw()));
    let upper = zst(&tar_bytes(&[file(".wh...", b"")]));
    cases.push(case(
        "whiteout of .. (signed base)",
        host.export(&Forge::new(&key, &base_config(), vec![lower, upper])),
        MALFORMED,
    ));
    run_cases(&host, cases);
}

// ---------------------------------------------------------------------------------------
// Links

#[test]
fn hostile_links() {
    let (host, key) = trusted_host();
    let up = Host::up;
    let tar = |entries: Vec<Raw>| host.export(&Forge::tar(&key, &entries));
    let abs = host.abs_canary("");
    let abs = abs.trim_end_matches('/').to_owned();
    let secret_abs = host.outside().join("secret").display().to_string();
    let mut cases = vec![
        case(
            "symlink ../x7/canary then a write through it",
            tar(base_plus(vec![symlink("esc", up("canary")), file("esc/pwned", CONTENT)])),
            MALFORMED,
        ),
        case(
            "symlink absolute canary then a write through it",
            tar(base_plus(vec![symlink("esc", &abs), file("esc/pwned", CONTENT)])),
            MALFORMED,
        ),
        case(
            "symlink .. then a write through it",
            tar(base_plus(vec![symlink("esc", ".."), file("esc/pwned", CONTENT)])),
            MALFORMED,
        ),
        case(
            "symlink d/../.. then a write through it",
            tar(base_plus(vec![symlink("esc", "d/../.."), file("esc/pwned", CONTENT)])),
            MALFORMED,
        ),
        case(
            "symlink / then a write through it",
            tar(base_plus(vec![symlink("esc", "/"), file(format!("esc{}/pwned", abs), CONTENT)])),
            MALFORMED,
        ),
        case("symlink at a signed file's path, absolute", tar(base_with(2, symlink("l", &secret_abs))), MALFORMED),
        case(
            "symlink at a signed file's path, relative out",
            tar(base_with(2, symlink("l", up("outside/secret")))),
            MALFORMED,
        ),
        case(
            "symlink replacing the signed file d/f",
            tar(base_with(1, symlink("d/f", up("outside/secret")))),
            MALFORMED,
        ),
        case(
            "symlink GNU long link out",
            tar(base_plus(vec![symlink("esc", format!("{}canary", "../".repeat(40))), file("esc/pwned", CONTENT)])),
            MALFORMED,
        ),
        case(
            "symlink pax linkpath out",
            tar(base_plus(vec![pax(&[("linkpath", &abs)]), symlink("esc", "d"), file("esc/pwned", CONTENT)])),
            MALFORMED,
        ),
        case(
            "symlink pax linkpath on the signed link",
            tar(vec![dir("d/"), file("d/f", CONTENT), pax(&[("linkpath", &secret_abs)]), symlink("l", "d/f")]),
            MALFORMED,
        ),
        // A confined link to a directory, then a file below it: writes through the link.
        case(
            "symlink d2 -> d then d2/pwned",
            tar(base_plus(vec![symlink("d2", "d"), file("d2/pwned", CONTENT)])),
            MALFORMED,
        ),
        // The same with the link signed: only the file below it is not.
        case(
            "signed symlink d2 -> d then d2/pwned",
            {
                let mut e = base_entries();
                e.insert(1, e_link("d2", "d"));
                let cfg = config(NAME, base_files(), e);
                host.export(&Forge::new(
                    &key,
                    &cfg,
                    vec![zst(&tar_bytes(&base_plus(vec![symlink("d2", "d"), file("d2/pwned", CONTENT)])))],
                ))
            },
            MALFORMED,
        ),
        // The link first, then a directory entry of the same name.
        case("symlink then a directory of its name", tar(base_plus(vec![symlink("esc", "d"), dir("esc/")])), MALFORMED),
    ];
    // In a lower layer the manifest does not constrain paths: only the unpacker's checks.
    let two = |lower: Vec<Raw>, upper: Vec<Raw>| {
        host.export(&Forge::new(&key, &base_config(), vec![zst(&tar_bytes(&lower)), zst(&tar_bytes(&upper))]))
    };
    cases.push(case(
        "lower layer: symlink d2 -> d, then d2/x",
        two(vec![dir("d/"), symlink("d2", "d"), file("d2/x", CONTENT)], base_raw()),
        MALFORMED,
    ));
    cases.push(case(
        "lower layer: symlink out, upper writes through it",
        two(vec![dir("d/"), symlink("esc", &abs)], [base_raw(), vec![file("esc/pwned", CONTENT)]].concat()),
        MALFORMED,
    ));
    cases.push(case(
        "lower layer: confined link d2 -> d, upper writes d2/f",
        two(vec![dir("d/"), symlink("d2", "d")], vec![file("d2/f", CONTENT)]),
        MALFORMED,
    ));
    cases.push(case(
        "lower layer: link at d, upper writes d/f through it",
        two(vec![dir("e/"), symlink("d", "e")], vec![file("d/f", CONTENT), symlink("l", "d/f")]),
        MALFORMED,
    ));
    // Escaping link texts in the signed manifest itself.
    for (what, text) in [("relative", up("canary")), ("absolute", abs.clone()), ("..", "..".into())] {
        let mut e = base_entries();
        e.push(e_link("m", &text));
        let cfg = config(NAME, base_files(), e);
        let layer = zst(&tar_bytes(&base_plus(vec![symlink("m", &text)])));
        cases.push(case(
            format!("signed symlink {what} out"),
            host.export(&Forge::new(&key, &cfg, vec![layer])),
            MALFORMED,
        ));
    }
    // Hard links.
    let secret_up = up("outside/secret");
    cases.extend([
        case("hard link relative out", tar(base_plus(vec![hardlink("h", &secret_up)])), MALFORMED),
        case("hard link absolute out", tar(base_plus(vec![hardlink("h", &secret_abs)])), MALFORMED),
        case("hard link in the tree", tar(base_plus(vec![hardlink("d/h", "d/f")])), MALFORMED),
        case("hard link at the signed file's path", tar(base_with(1, hardlink("d/f", &secret_abs))), MALFORMED),
        case(
            "hard link then a write into it",
            tar(base_plus(vec![hardlink("h", &secret_abs), file("h", b"pwned")])),
            MALFORMED,
        ),
        case("hard link in a lower layer", two(vec![hardlink("h", &secret_abs)], base_raw()), MALFORMED),
    ]);
    run_cases(&host, cases);
    assert_eq!(
        fs::metadata(host.outside().join("secret")).map(|m| std::os::unix::fs::MetadataExt::nlink(&m)).unwrap(),
        1
    );
}

// ---------------------------------------------------------------------------------------
// Entry types, modes, duplicates, content

#[test]
fn hostile_entry_types_modes_duplicates_and_content() {
    let (host, key) = trusted_host();
    let tar = |entries: Vec<Raw>| host.export(&Forge::tar(&key, &entries));
    let signed = |cfg: Value, entries: Vec<Raw>| host.export(&Forge::new(&key, &cfg, vec![zst(&tar_bytes(&entries))]));
    use tar::EntryType as T;
    let mut cases = vec![
        case("char device /dev/null", tar(base_plus(vec![device("c", T::Char, 1, 3)])), MALFORMED),
        case("char device at the signed path", tar(base_with(1, device("d/f", T::Char, 1, 3))), MALFORMED),
        case("block device", tar(base_plus(vec![device("b", T::Block, 8, 0)])), MALFORMED),
        case("fifo", tar(base_plus(vec![raw("p", T::Fifo, 0o644, b"")])), MALFORMED),
        case("fifo at the signed path", tar(base_with(1, raw("d/f", T::Fifo, 0o644, b""))), MALFORMED),
        case("GNU sparse file", tar(base_plus(vec![raw("s", T::GNUSparse, 0o644, b"")])), MALFORMED),
        case("contiguous file", tar(base_with(1, raw("d/f", T::Continuous, 0o644, CONTENT))), MALFORMED),
        case("unknown type 'Z'", tar(base_plus(vec![raw("z", T::new(b'Z'), 0o644, b"")])), MALFORMED),
        case("volume label", tar(base_plus(vec![raw("v", T::new(b'V'), 0o644, b"")])), MALFORMED),
        case(
            "pax sparse record",
            tar(base_plus(vec![pax(&[("GNU.sparse.major", "1")]), file("d/s", CONTENT)])),
            MALFORMED,
        ),
        // setuid/setgid/sticky bits the manifest does not declare.
        case("setuid file, manifest says 0644", tar(base_with(1, file_mode("d/f", 0o4644, CONTENT))), MALFORMED),
        case("setgid file, manifest says 0644", tar(base_with(1, file_mode("d/f", 0o2644, CONTENT))), MALFORMED),
    ];
    let with_entry = |i: usize, e: Value| {
        let mut v = base_entries();
        v[i] = e;
        config(NAME, base_files(), v)
    };
    cases.push(case(
        "setuid file in entries, not declared in files",
        signed(with_entry(1, e_file("d/f", "4755", CONTENT)), base_with(1, file_mode("d/f", 0o4755, CONTENT))),
        MALFORMED,
    ));
    cases.push(case(
        "setgid directory in entries, not declared",
        signed(with_entry(0, e_dir("d", "2755")), base_with(0, raw("d/", T::Directory, 0o2755, b""))),
        MALFORMED,
    ));
    cases.push(case(
        "sticky directory in entries, not declared",
        signed(with_entry(0, e_dir("d", "1777")), base_with(0, raw("d/", T::Directory, 0o1777, b""))),
        MALFORMED,
    ));
    let files = json!([{"path": "d/f", "target": "/usr/local/bin/hostile-f", "mode": "4755"}]);
    let mut e = base_entries();
    e[1] = e_file("d/f", "4755", CONTENT);
    e.insert(2, e_file("d/g", "4755", CONTENT));
    let payload =
        vec![dir("d/"), file_mode("d/f", 0o4755, CONTENT), file_mode("d/g", 0o4755, CONTENT), symlink("l", "d/f")];
    cases.push(case("setuid declared for another path only", signed(config(NAME, files, e), payload), MALFORMED));
    cases.push(case("mode bits beyond 07777", tar(base_with(1, file_mode("d/f", 0o10644, CONTENT))), MALFORMED));
    // Duplicates.
    cases.extend([
        case("duplicate file", tar(base_plus(vec![file("d/f", CONTENT)])), MALFORMED),
        case("duplicate file, other content second", tar(base_plus(vec![file("d/f", b"xyz")])), MALFORMED),
        case("duplicate directory", tar(base_plus(vec![dir("d/")])), MALFORMED),
        case("duplicate directory without slash", tar(base_plus(vec![raw("d", T::Directory, 0o755, b"")])), MALFORMED),
        case("duplicate symlink", tar(base_plus(vec![symlink("l", "d/f")])), MALFORMED),
        case("duplicate: file then directory", tar(base_plus(vec![dir("d/f/")])), MALFORMED),
    ]);
    // Content that is not what was signed.
    cases.extend([
        case("content differs from the signed hash", tar(base_with(1, file("d/f", b"abd"))), MALFORMED),
        case("content shorter than signed", tar(base_with(1, file("d/f", b"ab"))), MALFORMED),
        case("content longer than signed", tar(base_with(1, file("d/f", b"abcd"))), MALFORMED),
        case("file not in the signed manifest", tar(base_plus(vec![file("d/extra", CONTENT)])), MALFORMED),
        case("directory not in the signed manifest", tar(base_plus(vec![dir("e/")])), MALFORMED),
        case("symlink not in the signed manifest", tar(base_plus(vec![symlink("m", "d/f")])), MALFORMED),
        case("signed file missing", tar(vec![dir("d/"), symlink("l", "d/f")]), MALFORMED),
        case("signed symlink with other text", tar(base_with(2, symlink("l", "d"))), MALFORMED),
        case("file where a symlink is signed", tar(base_with(2, file("l", CONTENT))), MALFORMED),
        case("directory where a file is signed", tar(base_with(1, dir("d/f/"))), MALFORMED),
        case("mode differs from the signed mode", tar(base_with(1, file_mode("d/f", 0o600, CONTENT))), MALFORMED),
        case("directory entry carrying data", tar(base_with(0, raw("d/", T::Directory, 0o755, b"data"))), MALFORMED),
        case("empty payload", tar(vec![]), MALFORMED),
        case(
            "a lower layer's extra file left in place",
            {
                let lower = zst(&tar_bytes(&base_plus(vec![file("d/extra", CONTENT)])));
                let upper = zst(&tar_bytes(&[file("d/f", CONTENT)]));
                host.export(&Forge::new(&key, &base_config(), vec![lower, upper]))
            },
            MALFORMED,
        ),
        case(
            "lower layer right, upper layer replaces d/f with other bytes",
            {
                let lower = zst(&tar_bytes(&base_raw()));
                let upper = zst(&tar_bytes(&[file("d/f", b"abd")]));
                host.export(&Forge::new(&key, &base_config(), vec![lower, upper]))
            },
            MALFORMED,
        ),
    ]);
    run_cases(&host, cases);
}

// ---------------------------------------------------------------------------------------
// Sizes: a 1 GiB file where 3 bytes are signed, zip bombs, huge extension headers

/// A layer whose tar claims `size` bytes for `d/f` and holds `mib` MiB of zeros for it.
fn bomb_layer(size: u64, mib: usize) -> Vec<u8> {
    let mut head = tar_entries(&[dir("d/")]);
    head.extend_from_slice(&headers(&Raw { size, ..file("d/f", b"") }));
    let mut out = zst(&head);
    out.extend_from_slice(&zero_frames(mib));
    let tail_pad = (512 - (mib as u64 * (1 << 20)) % 512) % 512;
    let mut tail = vec![0u8; tail_pad as usize];
    tail.extend_from_slice(&tar_entries(&[symlink("l", "d/f")]));
    tail.extend_from_slice(&[0; 1024]);
    out.extend_from_slice(&zst(&tail));
    out
}

#[test]
fn hostile_sizes_are_refused_fast_in_little_memory() {
    let (host, key) = trusted_host();
    let fast = |mut c: Case| {
        c.within = Duration::from_secs(5);
        c.max_rss_mib = 128;
        c
    };
    let gib = 1u64 << 30;
    let one = |layer: Vec<u8>| host.export(&Forge::new(&key, &base_config(), vec![layer]));
    let cases = vec![
        // The header claims 1 GiB, the stream carries 4 KiB and ends.
        fast(case(
            "1 GiB header, 4 KiB of data",
            one(zst(&tar_entries(&[dir("d/"), Raw { size: gib, ..file("d/f", &[0; 4096]) }]))),
            MALFORMED,
        )),
        // The header claims 1 GiB and the stream holds 1 GiB of zeros (a 20 KiB zip bomb).
        fast(case("1 GiB zip bomb as d/f", one(bomb_layer(gib, 1024)), MALFORMED)),
        // 3 bytes declared, 1 GiB of zeros after the end of the archive.
        fast(case(
            "1 GiB of zeros after the end of the archive",
            one([zst(&tar_bytes(&base_raw())), zero_frames(1024)].concat()),
            MALFORMED,
        )),
        // 1 GiB of zeros where the next header should be: an all-zero block ends a tar,
        // so this is the same as trailing zeros, and must not be read to the end either.
        fast(case(
            "1 GiB of zeros in the place of headers",
            one([zst(&tar_entries(&base_raw())), zero_frames(1024)].concat()),
            MALFORMED,
        )),
        fast(case(
            "GNU long name of 1 GiB",
            one(zst(&tar_bytes(&base_plus(vec![Raw {
                size: gib,
                ..raw("././@LongLink", tar::EntryType::GNULongName, 0o644, &[b'a'; 4096])
            }])))),
            MALFORMED,
        )),
        fast(case(
            "pax header of 1 GiB",
            one(zst(&tar_bytes(&base_plus(vec![Raw {
                size: gib,
                ..raw("PaxHeader/x", tar::EntryType::XHeader, 0o644, &[b'a'; 4096])
            }])))),
            MALFORMED,
        )),
        fast(case(
            "pax global header of 1 GiB",
            one(zst(&tar_bytes(&base_plus(vec![Raw {
                size: gib,
                ..raw("PaxHeader/g", tar::EntryType::XGlobalHeader, 0o644, &[b'a'; 4096])
            }])))),
            MALFORMED,
        )),
        fast(case(
            "pax size of 1 GiB over a 3-byte header",
            one(zst(&tar_bytes(&[
                dir("d/"),
                pax(&[("size", &gib.to_string())]),
                file("d/f", CONTENT),
                symlink("l", "d/f"),
            ]))),
            MALFORMED,
        )),
        // A lower layer may hold larger old files, but not 1 GiB in a 20 KiB blob.
        fast(case(
            "1 GiB zip bomb in a lower layer",
            {
                host.export(&Forge::new(
                    &key,
                    &base_config(),
                    vec![bomb_layer(gib, 1024), zst(&tar_bytes(&base_raw()))],
                ))
            },
            MALFORMED,
        )),
        fast(case(
            "64 GiB header in a lower layer",
            {
                let lower = zst(&tar_entries(&[Raw { size: 64 * gib, ..file("old", &[0; 4096]) }]));
                host.export(&Forge::new(&key, &base_config(), vec![lower, zst(&tar_bytes(&base_raw()))]))
            },
            MALFORMED,
        )),
        fast(case(
            "size field of 8 EiB (base-256)",
            {
                let mut t = tar_entries(&[dir("d/"), file("d/f", CONTENT)]);
                // Base-256 size: 0x80 then 0x7f ff .. ff in the 12-byte size field of the second header.
                let h = 512;
                t[h + 124] = 0x80;
                for b in &mut t[h + 125..h + 136] {
                    *b = 0xff;
                }
                t[h + 125] = 0x7f;
                let mut hdr: [u8; 512] = t[h..h + 512].try_into().unwrap();
                hdr[148..156].copy_from_slice(b"        ");
                let sum: u32 = hdr.iter().map(|&b| u32::from(b)).sum();
                t[h + 148..h + 156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
                one(zst(&t))
            },
            MALFORMED,
        )),
    ];
    run_cases(&host, cases);
}

// ---------------------------------------------------------------------------------------
// Layers and descriptors

#[test]
fn hostile_layers_and_descriptors() {
    let (host, key) = trusted_host();
    let good = zst(&tar_bytes(&base_raw()));
    let good_desc = Descriptor::new(oci::TAR_ZSTD_MEDIA_TYPE, Digest::of(&good), good.len() as u64);
    let one = |layer: Vec<u8>| host.export(&Forge::new(&key, &base_config(), vec![layer]));
    let descs = |descs: Vec<Descriptor>| {
        let mut f = Forge::new(&key, &base_config(), vec![good.clone()]);
        f.layer_descs = Some(descs);
        host.export_raw(&f, |_, _| {})
    };
    let mut cases = vec![
        case("layer is a plain tar, not zstd", one(tar_bytes(&base_raw())), MALFORMED),
        case(
            "layer is gzip",
            one({
                let mut g = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
                g.extend_from_slice(&[0x55; 64]);
                g
            }),
            MALFORMED,
        ),
        case("layer is zstd of garbage", one(zst(&[0x55; 4096])), MALFORMED),
        case("layer is empty", one(Vec::new()), MALFORMED),
        case("layer is a truncated zstd stream", one(good[..good.len() / 2].to_vec()), MALFORMED),
        case(
            "layer has trailing garbage after its zstd frame",
            one([good.clone(), vec![0x55; 100]].concat()),
            MALFORMED,
        ),
        case("layer tar cut short", one(zst(&tar_entries(&base_raw())[..600])), MALFORMED),
        case(
            "layer tar with a bad header checksum",
            one({
                let mut t = tar_bytes(&base_raw());
                t[148] ^= 1;
                zst(&t)
            }),
            MALFORMED,
        ),
        case(
            "layer descriptor size + 1",
            descs(vec![Descriptor { size: good_desc.size + 1, ..good_desc.clone() }]),
            MALFORMED,
        ),
        case(
            "layer descriptor size - 1",
            descs(vec![Descriptor { size: good_desc.size - 1, ..good_desc.clone() }]),
            MALFORMED,
        ),
        case("layer descriptor size 0", descs(vec![Descriptor { size: 0, ..good_desc.clone() }]), MALFORMED),
        case(
            "layer descriptor size u64::MAX",
            descs(vec![Descriptor { size: u64::MAX, ..good_desc.clone() }]),
            MALFORMED,
        ),
        case(
            "layer descriptor names a missing blob",
            descs(vec![Descriptor::new(oci::TAR_ZSTD_MEDIA_TYPE, Digest::of(b"nowhere"), 7)]),
            MALFORMED,
        ),
        case(
            "layer of unknown media type",
            descs(vec![Descriptor { media_type: "application/x-evil".into(), ..good_desc.clone() }]),
            MALFORMED,
        ),
        case("no layers", descs(vec![]), MALFORMED),
        case("257 layers", descs(vec![good_desc.clone(); 257]), MALFORMED),
    ];
    // The layer blob in the archive is not the one the (signed) descriptor names.
    let evil = zst(&tar_bytes(&base_plus(vec![file(Host::up("canary/pwned"), CONTENT)])));
    cases.push(case(
        "layer blob content differs from its name and descriptor",
        host.export_raw(&Forge::new(&key, &base_config(), vec![good.clone()]), |_, entries| {
            let name = format!("blobs/sha256/{}", Digest::of(&good).hex());
            let e = entries.iter_mut().find(|e| e.name == name.as_bytes()).unwrap();
            *e = file(name, &evil);
        }),
        MALFORMED,
    ));
    cases.push(case(
        "layer blob replaced by another valid compression",
        host.export_raw(&Forge::new(&key, &base_config(), vec![good.clone()]), |_, entries| {
            let name = format!("blobs/sha256/{}", Digest::of(&good).hex());
            let e = entries.iter_mut().find(|e| e.name == name.as_bytes()).unwrap();
            *e = file(name, &zstd::encode_all(&tar_bytes(&base_raw())[..], 19).unwrap());
        }),
        MALFORMED,
    ));
    cases.push(case(
        "layer blob left out of the archive",
        host.export_raw(&Forge::new(&key, &base_config(), vec![good.clone()]), |_, entries| {
            let name = format!("blobs/sha256/{}", Digest::of(&good).hex());
            entries.retain(|e| e.name != name.as_bytes());
        }),
        MALFORMED,
    ));
    // The config descriptor.
    let mut f = Forge::new(&key, &base_config(), vec![good.clone()]);
    f.config_size = Some(f.config.len() as u64 + 1);
    cases.push(case("config descriptor size + 1", host.export_raw(&f, |_, _| {}), MALFORMED));
    let mut f = Forge::new(&key, &base_config(), vec![good.clone()]);
    f.config_media_type = "application/json".into();
    cases.push(case("config of another media type", host.export_raw(&f, |_, _| {}), MALFORMED));
    cases.push(case(
        "config blob left out of the archive",
        host.export_raw(&Forge::new(&key, &base_config(), vec![good.clone()]), |_, entries| {
            let cfg = to_bytes(&base_config());
            let name = format!("blobs/sha256/{}", Digest::of(&cfg).hex());
            entries.retain(|e| e.name != name.as_bytes());
        }),
        MALFORMED,
    ));
    // The manifest itself.
    let manifest_with = |edit: &dyn Fn(&mut Value)| {
        let mut f = Forge::new(&key, &base_config(), vec![good.clone()]);
        let cfg = to_bytes(&base_config());
        let m = ImageManifest::stage(
            Descriptor::of(formats::manifest::CONFIG_MEDIA_TYPE, &cfg),
            vec![good_desc.clone()],
            Default::default(),
        );
        let mut v: Value = serde_json::from_slice(&m.to_bytes()).unwrap();
        edit(&mut v);
        f.manifest = Some(to_bytes(&v));
        host.export_raw(&f, |_, _| {})
    };
    cases.push(case("manifest schemaVersion 1", manifest_with(&|v| v["schemaVersion"] = json!(1)), MALFORMED));
    cases.push(case(
        "manifest of another artifactType",
        manifest_with(&|v| v["artifactType"] = json!("application/x-evil")),
        MALFORMED,
    ));
    cases.push(case(
        "manifest of another mediaType",
        manifest_with(&|v| v["mediaType"] = json!(oci::INDEX_MEDIA_TYPE)),
        MALFORMED,
    ));
    cases.push(case(
        "manifest with a layer digest of bad hex",
        manifest_with(&|v| v["layers"][0]["digest"] = json!("sha256:../../../canary")),
        MALFORMED,
    ));
    cases.push(case(
        "manifest with a sha512 layer digest",
        manifest_with(&|v| v["layers"][0]["digest"] = json!(format!("sha512:{}", "0".repeat(128)))),
        MALFORMED,
    ));
    cases.push(case(
        "manifest not JSON",
        {
            let mut f = Forge::new(&key, &base_config(), vec![good.clone()]);
            f.manifest = Some(b"{\"schemaVersion\":2,".to_vec());
            host.export_raw(&f, |_, _| {})
        },
        MALFORMED,
    ));
    run_cases(&host, cases);
}

// ---------------------------------------------------------------------------------------
// Targets and the embedded stage manifest

#[test]
fn hostile_targets() {
    let (host, key) = trusted_host();
    let with_target = |t: Value| {
        let files = json!([{"path": "d/f", "target": t}]);
        host.export(&Forge::new(&key, &config(NAME, files, base_entries()), vec![zst(&tar_bytes(&base_raw()))]))
    };
    let mut cases = Vec::new();
    for t in [
        "/etc/shadow",
        "/etc/passwd",
        "/usr/bin/sudo",
        "/root/.ssh/authorized_keys",
        "/usr/localx/evil",
        "/usr/local",
        "/opt",
        "/etc/op-dbus/trusted-keys/evil.pub",
        "/etc/op-dbus/trusted-keys",
        "/etc/op-dbus/stage.toml",
        "/var/lib/op-dbus/staging/app",
        "/var/lib/op-dbus/staging/state.json",
        "/var/lib/op-dbus/deployment/images/index.json",
        "/var/lib/op-dbus/deployment",
        "/var/lib/op-dbus/history/history.log",
    ] {
        cases.push(case(format!("target {t}"), with_target(json!(t)), POLICY));
    }
    for t in [
        "/usr/local/../../etc/shadow",
        "/usr/local/bin/../../../etc/shadow",
        "/usr/local/..",
        "/usr/local//bin/x",
        "/usr/local/./bin/x",
        "/usr/local/bin/x/",
        "usr/local/bin/x",
        "../usr/local/bin/x",
        "/",
        "",
        "//etc/shadow",
        "/usr/local/bin/x\u{0}/../../../etc/shadow",
        "/usr/local/bin\\..\\..\\..\\etc\\shadow",
    ] {
        cases.push(case(format!("target {t:?} (not normalised)"), with_target(json!(t)), MALFORMED));
    }
    cases.push(case("target a number", with_target(json!(7)), MALFORMED));
    // Two entries for one target, one target inside another.
    let two = |a: &str, b: &str| {
        let mut e = base_entries();
        e.push(e_file("d/g", "0644", CONTENT));
        let files = json!([{"path": "d/f", "target": a}, {"path": "d/g", "target": b}]);
        let layer = zst(&tar_bytes(&base_plus(vec![file("d/g", CONTENT)])));
        host.export(&Forge::new(&key, &config(NAME, files, e), vec![layer]))
    };
    cases.push(case("two files, one target", two("/usr/local/bin/x", "/usr/local/bin/x"), MALFORMED));
    cases.push(case("a target inside another", two("/usr/local/lib/x", "/usr/local/lib/x/y"), MALFORMED));
    run_cases(&host, cases);
}

#[test]
fn hostile_embedded_manifests() {
    let (host, key) = trusted_host();
    let layer = zst(&tar_bytes(&base_raw()));
    let signed = |cfg: Value| host.export(&Forge::new(&key, &cfg, vec![layer.clone()]));
    let signed_bytes = |bytes: Vec<u8>| {
        let mut f = Forge::new(&key, &base_config(), vec![layer.clone()]);
        f.config = bytes;
        host.export(&f)
    };
    let entries = |e: Vec<Value>| config(NAME, base_files(), e);
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut c = base_config();
        f(&mut c);
        c
    };
    let cases = vec![
        case(
            "entries[].path ../x",
            signed(entries([base_entries(), vec![e_file("../x", "0644", CONTENT)]].concat())),
            MALFORMED,
        ),
        case(
            "entries[].path d/../x",
            signed(entries([base_entries(), vec![e_file("d/../x", "0644", CONTENT)]].concat())),
            MALFORMED,
        ),
        case(
            "entries[].path absolute",
            signed(entries([vec![e_file(&host.abs_canary("pwned"), "0644", CONTENT)], base_entries()].concat())),
            MALFORMED,
        ),
        case(
            "entries[].path d/./f",
            signed(entries(vec![e_dir("d", "0755"), e_file("d/./f", "0644", CONTENT), e_link("l", "d/f")])),
            MALFORMED,
        ),
        case(
            "entries unsorted",
            signed(entries(vec![e_file("d/f", "0644", CONTENT), e_dir("d", "0755"), e_link("l", "d/f")])),
            MALFORMED,
        ),
        case(
            "entries unsorted (link first)",
            signed(entries(vec![e_link("l", "d/f"), e_dir("d", "0755"), e_file("d/f", "0644", CONTENT)])),
            MALFORMED,
        ),
        case("entries duplicated", signed(entries([base_entries(), vec![e_link("l", "d/f")]].concat())), MALFORMED),
        case(
            "entries duplicated, other kind",
            signed(entries(vec![
                e_dir("d", "0755"),
                e_file("d/f", "0644", CONTENT),
                e_file("d/f", "0644", CONTENT),
                e_link("l", "d/f"),
            ])),
            MALFORMED,
        ),
        case(
            "entry whose parent is not staged",
            signed(entries(vec![
                e_dir("d", "0755"),
                e_file("d/f", "0644", CONTENT),
                e_file("e/x", "0644", CONTENT),
                e_link("l", "d/f"),
            ])),
            MALFORMED,
        ),
        case(
            "entry whose parent is a symlink",
            signed(entries(vec![
                e_dir("d", "0755"),
                e_file("d/f", "0644", CONTENT),
                e_link("l", "d"),
                e_file("l/x", "0644", CONTENT),
            ])),
            MALFORMED,
        ),
        case(
            "file entry without sha256",
            signed(edit(&|c| {
                c["entries"][1].as_object_mut().unwrap().remove("sha256");
            })),
            MALFORMED,
        ),
        case(
            "file entry without size",
            signed(edit(&|c| {
                c["entries"][1].as_object_mut().unwrap().remove("size");
            })),
            MALFORMED,
        ),
        case("dir entry with a size", signed(edit(&|c| c["entries"][0]["size"] = json!(1))), MALFORMED),
        case(
            "symlink entry without link",
            signed(edit(&|c| {
                c["entries"][2].as_object_mut().unwrap().remove("link");
            })),
            MALFORMED,
        ),
        case("entry of unknown type", signed(edit(&|c| c["entries"][1]["type"] = json!("chardev"))), MALFORMED),
        case("mode 9999", signed(edit(&|c| c["entries"][1]["mode"] = json!("9999"))), MALFORMED),
        case("mode 077777", signed(edit(&|c| c["entries"][1]["mode"] = json!("077777"))), MALFORMED),
        case("negative size", signed(edit(&|c| c["entries"][1]["size"] = json!(-3))), MALFORMED),
        case("sha256 not a digest", signed(edit(&|c| c["entries"][1]["sha256"] = json!("sha256:../../x"))), MALFORMED),
        case("files[] path not staged", signed(edit(&|c| c["files"][0]["path"] = json!("d/nothere"))), MALFORMED),
        case("unknown field", signed(edit(&|c| c["evil"] = json!(1))), MALFORMED),
        case("unknown field in an entry", signed(edit(&|c| c["entries"][1]["uid"] = json!(0))), MALFORMED),
        case("schema_version 2", signed(edit(&|c| c["schema_version"] = json!(2))), MALFORMED),
        case("name differs from the tag", signed(edit(&|c| c["name"] = json!("other"))), MALFORMED),
        case("version differs from the tag", signed(edit(&|c| c["version"] = json!("9.9.9"))), MALFORMED),
        case("name with a slash", signed(edit(&|c| c["name"] = json!("../app"))), MALFORMED),
        case(
            "a top-level manifest.json entry",
            signed(entries([base_entries(), vec![e_file("manifest.json", "0644", CONTENT)]].concat())),
            MALFORMED,
        ),
        case(
            "service name with a path",
            signed(edit(&|c| c["services"] = json!(["../../etc/evil.service"]))),
            MALFORMED,
        ),
        case(
            "verify expect_exit 1000",
            signed(edit(&|c| c["verify"] = json!([{"command": "true", "expect_exit": 1000, "timeout": "5s"}]))),
            MALFORMED,
        ),
        case(
            "dependency requirement not semver",
            signed(edit(&|c| c["dependencies"] = json!([{"stage": "base", "req": ">>>1"}]))),
            MALFORMED,
        ),
        case("config not JSON", signed_bytes(b"{\"schema_version\":1,".to_vec()), MALFORMED),
        case("config JSON null", signed_bytes(b"null".to_vec()), MALFORMED),
        case(
            "config nested 100000 deep",
            signed_bytes(format!("{{\"plugins\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes()),
            MALFORMED,
        ),
        case(
            "config with a duplicate key",
            signed_bytes({
                let s = String::from_utf8(to_bytes(&base_config())).unwrap();
                s.replacen("\"name\":\"app\"", "\"name\":\"app\",\"name\":\"other\"", 1).into_bytes()
            }),
            MALFORMED,
        ),
    ];
    run_cases(&host, cases);
}

// ---------------------------------------------------------------------------------------
// The archive: entry names, types, order, bounded reads

#[test]
fn hostile_archives() {
    let (host, key) = trusted_host();
    let f = Forge::tar(&key, &base_raw());
    let mangled = |m: &dyn Fn(&Forged, &mut Vec<Raw>)| host.export_raw(&f, |fo, e| m(fo, e));
    let abs = host.abs_canary("pwned");
    let secret_abs = host.outside().join("secret").display().to_string();
    let push = |r: Raw| mangled(&move |_, e| e.push(r.clone()));
    let insert = |r: Raw| mangled(&move |_, e| e.insert(1, r.clone()));
    let cases = vec![
        case("archive entry ../x", push(file("../x", b"x")), MALFORMED),
        case("archive entry ../x7/canary/pwned first", insert(file(Host::up("canary/pwned"), b"x")), MALFORMED),
        case("archive entry blobs/sha256/../../x", push(file("blobs/sha256/../../x", b"x")), MALFORMED),
        case(
            "archive entry blobs/sha256/../../../canary/pwned",
            insert(file("blobs/sha256/../../../canary/pwned", b"x")),
            MALFORMED,
        ),
        case("archive entry absolute", insert(file(&abs, b"x")), MALFORMED),
        case("archive entry ./../x", insert(file("./../x", b"x")), MALFORMED),
        case("archive entry etc/passwd", push(file("etc/passwd", b"x")), MALFORMED),
        case("archive entry blobs/sha512/00", push(file("blobs/sha512/00", b"x")), MALFORMED),
        case(
            "archive blob name in upper case",
            mangled(&|_, e| {
                let i = e.len() - 1;
                let upper = String::from_utf8(e[i].name.clone())
                    .unwrap()
                    .to_uppercase()
                    .replace("BLOBS/SHA256", "blobs/sha256");
                e[i].name = upper.into_bytes();
            }),
            MALFORMED,
        ),
        case(
            "archive symlink entry to the secret",
            insert(symlink(format!("blobs/sha256/{}", Digest::of(b"x").hex()), &secret_abs)),
            MALFORMED,
        ),
        case("archive symlink as index.json", mangled(&|_, e| e[1] = symlink("index.json", "/etc/passwd")), MALFORMED),
        case(
            "archive hard link entry",
            insert(hardlink(format!("blobs/sha256/{}", Digest::of(SECRET).hex()), &secret_abs)),
            MALFORMED,
        ),
        case(
            "archive char device entry",
            insert(device(format!("blobs/sha256/{}", Digest::of(b"").hex()), tar::EntryType::Char, 1, 3)),
            MALFORMED,
        ),
        case(
            "archive fifo as oci-layout",
            mangled(&|_, e| e[0] = raw("oci-layout", tar::EntryType::Fifo, 0o644, b"")),
            MALFORMED,
        ),
        case("archive blobs/ as a file", mangled(&|_, e| e[2] = file("blobs", b"x")), MALFORMED),
        case(
            "archive blob entry as a directory",
            mangled(&|_, e| {
                let i = e.len() - 1;
                let name = format!("{}/", String::from_utf8_lossy(&e[i].name));
                e[i] = dir(name);
            }),
            MALFORMED,
        ),
        case(
            "archive duplicate blob entry",
            mangled(&|_, e| {
                let last = e.last().unwrap().clone();
                e.push(last);
            }),
            MALFORMED,
        ),
        case(
            "archive duplicate blob entry, other content",
            mangled(&|_, e| {
                let mut last = e.last().unwrap().clone();
                last.data = zst(&tar_bytes(&base_plus(vec![file(Host::up("canary/pwned"), CONTENT)])));
                last.size = last.data.len() as u64;
                e.push(last);
            }),
            MALFORMED,
        ),
        case(
            "archive duplicate index.json, second tags nothing",
            mangled(&|_, e| {
                e.insert(2, file("index.json", &formats::oci::ImageIndex::default().to_bytes()));
            }),
            MALFORMED,
        ),
        case(
            "archive without oci-layout",
            mangled(&|_, e| {
                e.remove(0);
            }),
            MALFORMED,
        ),
        case(
            "archive without index.json",
            mangled(&|_, e| {
                e.remove(1);
            }),
            MALFORMED,
        ),
        case(
            "archive index.json not JSON",
            mangled(&|_, e| e[1] = file("index.json", b"{\"schemaVersion\":2,")),
            MALFORMED,
        ),
        case(
            "archive index.json tags nothing",
            mangled(&|_, e| e[1] = file("index.json", &formats::oci::ImageIndex::default().to_bytes())),
            MALFORMED,
        ),
        case(
            "archive index.json schemaVersion 1",
            mangled(&|_, e| {
                let mut v: Value = serde_json::from_slice(&e[1].data).unwrap();
                v["schemaVersion"] = json!(1);
                e[1] = file("index.json", &to_bytes(&v));
            }),
            MALFORMED,
        ),
        case(
            "archive index.json tag ../../x:1.0.0",
            mangled(&|fo, e| {
                let mut index = formats::oci::ImageIndex::default();
                index.set("../../x:1.0.0", fo.image.clone());
                index.set(&fo.sig_tag, fo.sig.clone().unwrap());
                e[1] = file("index.json", &index.to_bytes());
            }),
            MALFORMED,
        ),
        case(
            "archive index.json tag with a NUL",
            mangled(&|fo, e| {
                let mut index = formats::oci::ImageIndex::default();
                index.set("app\0:1.0.0", fo.image.clone());
                e[1] = file("index.json", &index.to_bytes());
            }),
            MALFORMED,
        ),
        case(
            "archive image manifest missing",
            mangled(&|fo, e| {
                let name = format!("blobs/sha256/{}", fo.image.digest.hex());
                e.retain(|x| x.name != name.as_bytes());
            }),
            MALFORMED,
        ),
        case("archive that is empty", write_work(&host, "empty.oci.tar", b""), MALFORMED),
        case("archive of zeros", write_work(&host, "zeros.oci.tar", &[0; 10_240]), MALFORMED),
    ];
    run_cases(&host, cases);
}

/// Archives whose tar structure itself is broken (cut short, bad header checksum, not a
/// tar at all) are malformed input: exit 7, like every other corrupt archive.
#[test]
fn hostile_archive_structure_is_malformed_input() {
    let (host, key) = trusted_host();
    let f = Forge::tar(&key, &base_raw());
    let cases = vec![
        case(
            "archive cut in the middle of a blob",
            {
                let p = host.export(&f);
                let bytes = fs::read(&p).unwrap();
                write_work(&host, "cut.oci.tar", &bytes[..bytes.len() - 1024 - 700])
            },
            MALFORMED,
        ),
        case(
            "archive cut in a header",
            {
                let p = host.export(&f);
                let bytes = fs::read(&p).unwrap();
                write_work(&host, "cut.oci.tar", &bytes[..1024 + 100])
            },
            MALFORMED,
        ),
        case("archive that is not a tar", write_work(&host, "junk.oci.tar", &[0x55; 10_000]), MALFORMED),
        case(
            "archive with a bad header checksum",
            {
                let p = host.export(&f);
                let mut bytes = fs::read(&p).unwrap();
                bytes[148] ^= 1;
                write_work(&host, "cksum.oci.tar", &bytes)
            },
            MALFORMED,
        ),
        case(
            "archive zstd-compressed",
            {
                let p = host.export(&f);
                write_work(&host, "zst.oci.tar", &zst(&fs::read(&p).unwrap()))
            },
            MALFORMED,
        ),
    ];
    run_cases(&host, cases);
}

#[test]
fn hostile_huge_index_and_manifest_are_refused_fast() {
    let (host, key) = trusted_host();
    let f = Forge::tar(&key, &base_raw());
    let fast = |mut c: Case| {
        c.within = Duration::from_secs(10);
        c.max_rss_mib = 128;
        c
    };
    let hundred_mb = 100 << 20;
    // index.json of 100 MB: valid JSON, padded with spaces.
    let big_index = host.export_raw(&f, |fo, e| {
        let mut index = formats::oci::ImageIndex::default();
        index.set(&fo.tag, fo.image.clone());
        index.set(&fo.sig_tag, fo.sig.clone().unwrap());
        let mut bytes = index.to_bytes();
        bytes.resize(hundred_mb, b' ');
        e[1] = file("index.json", &bytes);
    });
    // An image manifest of 100 MB, properly signed.
    let good = zst(&tar_bytes(&base_raw()));
    let cfg = to_bytes(&base_config());
    let m = ImageManifest::stage(
        Descriptor::of(formats::manifest::CONFIG_MEDIA_TYPE, &cfg),
        vec![Descriptor::of(oci::TAR_ZSTD_MEDIA_TYPE, &good)],
        Default::default(),
    );
    let mut bytes = m.to_bytes();
    bytes.resize(hundred_mb, b' ');
    let mut big = Forge::new(&key, &base_config(), vec![good.clone()]);
    big.manifest = Some(bytes);
    let big_manifest = host.export_raw(&big, |_, _| {});
    // A signature manifest of 100 MB.
    let big_sig = host.export_raw(&f, |fo, e| {
        let sd = fo.sig.clone().unwrap();
        let mut sm = fo.blob(&sd.digest);
        sm.resize(hundred_mb, b' ');
        let new = Descriptor::of(oci::MANIFEST_MEDIA_TYPE, &sm);
        let mut index = formats::oci::ImageIndex::default();
        index.set(&fo.tag, fo.image.clone());
        index.set(&fo.sig_tag, new.clone());
        e[1] = file("index.json", &index.to_bytes());
        let i = e.iter().position(|x| x.name == format!("blobs/sha256/{}", sd.digest.hex()).as_bytes()).unwrap();
        e[i] = file(format!("blobs/sha256/{}", new.digest.hex()), &sm);
    });
    // A config (embedded stage manifest) of 100 MB, properly signed.
    let mut cfg_bytes = to_bytes(&base_config());
    cfg_bytes.resize(hundred_mb, b' ');
    let mut big_cfg = Forge::new(&key, &base_config(), vec![good.clone()]);
    big_cfg.config = cfg_bytes;
    let big_config = host.export_raw(&big_cfg, |_, _| {});
    // index.json whose header claims 100 MB and whose data stops after 1 KiB.
    let lying_index = {
        let p = host.export(&f);
        let bytes = fs::read(&p).unwrap();
        let mut out = bytes[..512].to_vec(); // oci-layout header
        out.extend_from_slice(&bytes[512..1024]);
        let mut h = headers(&Raw { size: hundred_mb as u64, ..file("index.json", b"") });
        out.append(&mut h);
        out.extend_from_slice(&[b' '; 1024]);
        write_work(&host, "lying.oci.tar", &out)
    };
    let cases = vec![
        fast(case("index.json of 100 MB", big_index, MALFORMED)),
        fast(case("image manifest of 100 MB (signed)", big_manifest, MALFORMED)),
        fast(case("signature manifest of 100 MB", big_sig, TRUST_OR_MALFORMED)),
        {
            let mut c = case("config of 100 MB (signed)", big_config, MALFORMED);
            c.within = Duration::from_secs(10);
            c
        },
        fast(case("index.json header of 100 MB, 1 KiB of data", lying_index, MALFORMED)),
    ];
    run_cases(&host, cases);
}

// ---------------------------------------------------------------------------------------
// Signatures that name something else

#[test]
fn hostile_signatures() {
    let (host, key) = trusted_host();
    let stranger = host.key("stranger.key");
    let layer = zst(&tar_bytes(&base_raw()));
    let base = || Forge::new(&key, &base_config(), vec![layer.clone()]);
    let export = |f: Forge<'_>| host.export_raw(&f, |_, _| {});
    let other_manifest = Digest::of(b"another image manifest");
    let mut cases = Vec::new();
    let mut f = base();
    f.signed_digest = Some(other_manifest);
    cases.push(case("payload names another digest", export(f), TRUST));
    let mut f = base();
    f.signed_name = Some("other".into());
    cases.push(case("payload names another stage", export(f), TRUST));
    let mut f = base();
    f.signed_version = Some("9.9.9".into());
    cases.push(case("payload names another version", export(f), TRUST));
    let mut f = base();
    f.subject = Some(Descriptor::of(oci::MANIFEST_MEDIA_TYPE, b"another image manifest"));
    cases.push(case("signature manifest's subject is another image", export(f), TRUST));
    let mut f = base();
    f.unsigned = true;
    cases.push(case("no signature at all", export(f), TRUST));
    let mut f = base();
    f.keys = vec![&stranger];
    cases.push(case("signed by an untrusted key", export(f), TRUST));
    let mut f = base();
    f.sign_other_bytes = Some(b"something else".to_vec());
    cases.push(case("signature over other bytes", export(f), TRUST));
    let mut f = base();
    f.signature_b64 = Some("!!!not base64!!!".into());
    cases.push(case("signature not base64", export(f), TRUST_OR_MALFORMED));
    let mut f = base();
    f.signature_b64 = Some(String::new());
    cases.push(case("signature empty", export(f), TRUST_OR_MALFORMED));
    let mut f = base();
    f.signature_b64 = Some(base64_of(&[0u8; 64]));
    cases.push(case("signature all zeros", export(f), TRUST));
    // The key-id hint names the trusted key, the signature is the stranger's.
    cases.push(case(
        "key-id hint of the trusted key, signature of another",
        host.export_raw(&base(), |fo, e| {
            let sd = fo.sig.clone().unwrap();
            let mut sm = ImageManifest::from_bytes(&fo.blob(&sd.digest)).unwrap();
            let payload = fo.blob(&sm.layers[0].digest);
            sm.layers[0]
                .annotations
                .insert(oci::ANNOTATION_COSIGN_SIGNATURE.into(), base64_of(&stranger.sign(&payload)));
            replace_sig_manifest(fo, e, &sm);
        }),
        TRUST,
    ));
    // The signature manifest's layers are not simple-signing (no signatures left).
    cases.push(case(
        "signature layer of another media type",
        host.export_raw(&base(), |fo, e| {
            let sd = fo.sig.clone().unwrap();
            let mut sm = ImageManifest::from_bytes(&fo.blob(&sd.digest)).unwrap();
            sm.layers[0].media_type = "application/json".into();
            replace_sig_manifest(fo, e, &sm);
        }),
        TRUST,
    ));
    // A payload the trusted key signed that is not a valid simple-signing payload.
    cases.push(case(
        "signed payload with an unknown critical field",
        host.export_raw(&base(), |fo, e| {
            let sd = fo.sig.clone().unwrap();
            let mut sm = ImageManifest::from_bytes(&fo.blob(&sd.digest)).unwrap();
            let payload = String::from_utf8(fo.blob(&sm.layers[0].digest)).unwrap();
            let evil = payload.replacen("\"type\"", "\"evil\":1,\"type\"", 1).into_bytes();
            let mut l = Descriptor::of(oci::SIMPLE_SIGNING_MEDIA_TYPE, &evil);
            l.annotations = sm.layers[0].annotations.clone();
            l.annotations.insert(oci::ANNOTATION_COSIGN_SIGNATURE.into(), base64_of(&key.sign(&evil)));
            sm.layers[0] = l;
            e.insert(5, file(format!("blobs/sha256/{}", Digest::of(&evil).hex()), &evil));
            replace_sig_manifest(fo, e, &sm);
        }),
        TRUST_OR_MALFORMED,
    ));
    // The signature tag names another image's manifest; our image is not signed.
    cases.push(case(
        "signature tag of another name",
        host.export_raw(&base(), |fo, e| {
            let mut index = formats::oci::ImageIndex::default();
            index.set(&fo.tag, fo.image.clone());
            index.set(&format!("other:{}", fo.image.digest.signature_tag()), fo.sig.clone().unwrap());
            e[1] = file("index.json", &index.to_bytes());
        }),
        TRUST,
    ));
    // A valid signed image relabelled: the tag says 2.0.0 (the config says 1.0.0).
    cases.push(case(
        "image relabelled as another version",
        host.export_raw(&base(), |fo, e| {
            let mut index = formats::oci::ImageIndex::default();
            index.set("app:2.0.0", fo.image.clone());
            index.set(&fo.sig_tag, fo.sig.clone().unwrap());
            e[1] = file("index.json", &index.to_bytes());
        }),
        TRUST_OR_MALFORMED,
    ));
    run_cases(&host, cases);
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Replaces the forged image's signature manifest in archive entries `e` with `sm`.
fn replace_sig_manifest(fo: &Forged, e: &mut [Raw], sm: &ImageManifest) {
    let old = fo.sig.clone().unwrap();
    let bytes = sm.to_bytes();
    let new = Descriptor::of(oci::MANIFEST_MEDIA_TYPE, &bytes);
    let mut index = formats::oci::ImageIndex::default();
    index.set(&fo.tag, fo.image.clone());
    index.set(&fo.sig_tag, new.clone());
    e[1] = file("index.json", &index.to_bytes());
    let name = format!("blobs/sha256/{}", old.digest.hex());
    let i = e.iter().position(|x| x.name == name.as_bytes()).unwrap();
    e[i] = file(format!("blobs/sha256/{}", new.digest.hex()), &bytes);
}

// ---------------------------------------------------------------------------------------
// Targets are resolved inside the root, whatever the operator's symlinks say

#[test]
fn targets_resolve_inside_the_root_through_operator_symlinks() {
    let (host, key) = trusted_host();
    // The operator's /opt is an absolute symlink naming the canary's host path, and its
    // /usr/local climbs with `..` to the canary's name: inside the root both name
    // directories that exist there too, and that is where targets must land.
    let canary = host.canary();
    let canary_in_root = host.root().join(canary.strip_prefix("/").unwrap());
    fs::create_dir_all(&canary_in_root).unwrap();
    fs::create_dir_all(host.root().join("canary/bin")).unwrap();
    std::os::unix::fs::symlink(&canary, host.root().join("opt")).unwrap();
    fs::create_dir_all(host.root().join("usr")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../canary", host.root().join("usr/local")).unwrap();
    // Where those links lead is where the targets land, so the policy must allow it there
    // (the prefixes hold for the resolved path, not the text).
    fs::write(
        host.root().join("etc/op-dbus/stage.toml"),
        format!("allowed_prefixes = [\"/opt\", \"/usr/local\", \"{}\", \"/canary\"]\n", canary.display()),
    )
    .unwrap();
    let files = json!([
        {"path": "d/f", "target": "/opt/app-f"},
        {"path": "l", "target": "/usr/local/bin/l"},
    ]);
    let archive =
        host.export(&Forge::new(&key, &config(NAME, files, base_entries()), vec![zst(&tar_bytes(&base_raw()))]));
    let outside = || host.snapshot().into_iter().filter(|(k, _)| !k.starts_with("root/")).collect::<Vec<_>>();
    let before_outside = outside();
    let before_root = tree_of_root(&host);
    let run = host.deploy(&archive, &[]);
    assert_eq!(fs::read_dir(&canary).unwrap().count(), 0, "a target was placed through a symlink, outside the root");
    assert_eq!(before_outside, outside(), "something outside the root changed");
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(
        fs::read_link(canary_in_root.join("app-f")).unwrap(),
        Path::new("/var/lib/op-dbus/staging/app/d/f"),
        "the target is not where the root's own /opt leads"
    );
    assert!(host.root().join("canary/bin/l").is_symlink());
    // Removing puts the root back as it was.
    ok(host.stage().args(["remove", "app"]));
    let after: std::collections::BTreeMap<_, _> =
        tree_of_root(&host).into_iter().filter(|(k, _)| !k.starts_with("root/var/lib/op-dbus")).collect();
    let before: std::collections::BTreeMap<_, _> =
        before_root.into_iter().filter(|(k, _)| !k.starts_with("root/var/lib/op-dbus")).collect();
    assert_eq!(before, after, "{}", diff(&before, &after));
}

fn tree_of_root(host: &Host) -> std::collections::BTreeMap<String, String> {
    host.snapshot().into_iter().filter(|(k, _)| k.starts_with("root/")).collect()
}

// ---------------------------------------------------------------------------------------
// Tampering: one bit flipped anywhere in a real export

/// A real signed export of a small stage made with op-dbus-image, under the host's work/.
fn real_export(host: &Host, key_name: &str, extra_build: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    let key = keygen(&host.work(), key_name);
    let store = host.work().join("store");
    let src = host.work().join("src/app");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::create_dir_all(src.join("share/doc")).unwrap();
    fs::write(
        src.join("manifest.yaml"),
        "name: app\nversion: 1.0.0\nfiles:\n  - path: bin/app\n    target: /usr/local/bin/app\n    mode: 0755\n  - path: etc/app.conf\n    target: /etc/op-dbus/app.conf\n    type: copy-if-not-exists\n",
    )
    .unwrap();
    fs::write(src.join("bin/app"), "#!/bin/sh\necho app\n").unwrap();
    fs::set_permissions(src.join("bin/app"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    fs::write(src.join("etc/app.conf"), "answer = 42\n").unwrap();
    fs::write(src.join("share/doc/README"), "the app\n".repeat(50)).unwrap();
    ok(image(&store, Some(&key)).args(["-q", "build", "--format", "tar"]).args(extra_build).arg(&src));
    let out = host.work().join("app.oci.tar");
    ok(image(&store, Some(&key)).args(["-q", "export", "app:1.0.0", "--out"]).arg(&out));
    (out, key, store)
}

/// One tar entry of an archive: its name, header offset, data offset and size.
#[derive(Debug, Clone)]
struct TarPos {
    name: String,
    header: usize,
    data: usize,
    size: usize,
}

/// Reads the tar headers of `bytes` (ustar or GNU, no extensions) to locate every entry.
fn tar_positions(bytes: &[u8]) -> Vec<TarPos> {
    let cstr = |b: &[u8]| String::from_utf8_lossy(&b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]).into_owned();
    let mut out = Vec::new();
    let mut off = 0;
    while off + 512 <= bytes.len() {
        let h = &bytes[off..off + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let mut name = cstr(&h[..100]);
        if &h[257..262] == b"ustar" && h[345] != 0 {
            name = format!("{}/{name}", cstr(&h[345..500]));
        }
        let size_text = cstr(&h[124..136]);
        let size = usize::from_str_radix(size_text.trim(), 8).unwrap();
        out.push(TarPos { name, header: off, data: off + 512, size });
        off += 512 + size.div_ceil(512) * 512;
    }
    out
}

/// Whether two index.json texts parse to the same tags naming the same descriptors.
fn same_tags(a: &[u8], b: &[u8]) -> bool {
    match (formats::oci::ImageIndex::from_bytes(a), formats::oci::ImageIndex::from_bytes(b)) {
        (Ok(a), Ok(b)) => a.manifests == b.manifests,
        _ => false,
    }
}

/// Deploys copies of a real export with one bit flipped in the data of the entries
/// `which` selects: every byte of small unauthenticated entries (oci-layout, index.json),
/// the first, middle, last and every 97th byte of blobs (named by their digests); bits 0
/// and 5 of each. All must be refused with exit 3 or 7; then the untampered export deploys.
fn flip_entries(which: &dyn Fn(&str) -> bool) {
    let host = Host::new();
    let (export, _key, _store) = real_export(&host, "builder.key", &[]);
    ok(host.stage().args(["trust", "add"]).arg(host.work().join("builder.key.pub")));
    let bytes = fs::read(&export).unwrap();
    let positions = tar_positions(&bytes);
    let names: Vec<&str> = positions.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names[..2], ["oci-layout", "index.json"], "{names:?}");
    assert_eq!(positions.iter().filter(|p| p.name.starts_with("blobs/sha256/") && p.size > 0).count(), 6, "{names:?}");
    let mut cases = Vec::new();
    for p in positions.iter().filter(|p| p.size > 0 && which(&p.name)) {
        let offsets: Vec<usize> = if p.name.starts_with("blobs/") {
            let mut v: Vec<usize> = (0..p.size).step_by(97).collect();
            v.extend([p.size / 2, p.size - 1]);
            v.sort();
            v.dedup();
            v
        } else {
            (0..p.size).collect()
        };
        for o in offsets {
            for bit in [0u8, 5] {
                let mut copy = bytes.clone();
                copy[p.data + o] ^= 1 << bit;
                let short: String = p.name.trim_start_matches("blobs/sha256/").chars().take(12).collect();
                let data = &copy[p.data..p.data + p.size];
                let around = String::from_utf8_lossy(&data[o.saturating_sub(8)..(o + 8).min(p.size)]).into_owned();
                let path = write_work(&host, "flip.oci.tar", &copy);
                let mut c = case(format!("flip {short} byte {o} bit {bit} ({around:?})"), path, TRUST_OR_MALFORMED);
                // index.json is not signed, and OCI readers must ignore unknown properties:
                // a flip that leaves every tag naming the very same descriptor changes nothing.
                if p.name == "index.json" {
                    c.may_succeed = same_tags(&bytes[p.data..p.data + p.size], data);
                }
                cases.push(c);
            }
        }
    }
    eprintln!("{} tampered copies", cases.len());
    assert!(!cases.is_empty());
    run_cases(&host, cases);
    // The untampered export deploys: the refusals above were the flips' doing.
    let run = host.deploy(&export, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
}

#[test]
fn tampering_one_bit_in_any_blob_of_a_real_export() {
    flip_entries(&|name| name.starts_with("blobs/"));
}

#[test]
fn tampering_one_bit_in_index_json_of_a_real_export() {
    flip_entries(&|name| name == "index.json");
}

#[test]
fn tampering_one_bit_in_oci_layout_of_a_real_export() {
    flip_entries(&|name| name == "oci-layout");
}

/// Rewrites the signature manifest of an export with `edit` (digests and index fixed up,
/// as an attacker who controls the transport would).
fn rewrite_signatures(host: &Host, export: &Path, edit: &dyn Fn(&mut ImageManifest, &mut Vec<Raw>)) -> PathBuf {
    let bytes = fs::read(export).unwrap();
    let mut entries: Vec<Raw> = Vec::new();
    let mut ar = tar::Archive::new(&bytes[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path_bytes().into_owned();
        let kind = e.header().entry_type();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        entries.push(if kind.is_dir() { dir(name) } else { file(name, &data) });
    }
    let mut index: formats::oci::ImageIndex = serde_json::from_slice(&entries[1].data).unwrap();
    let sig = index
        .manifests
        .iter()
        .find(|d| d.annotation(oci::ANNOTATION_REF_NAME).is_some_and(|t| t.ends_with(".sig")))
        .unwrap()
        .clone();
    let sig_tag = sig.annotation(oci::ANNOTATION_REF_NAME).unwrap().to_owned();
    let name = format!("blobs/sha256/{}", sig.digest.hex());
    let i = entries.iter().position(|e| e.name == name.as_bytes()).unwrap();
    let mut sm = ImageManifest::from_bytes(&entries[i].data).unwrap();
    edit(&mut sm, &mut entries);
    let new = sm.to_bytes();
    let d = Descriptor::of(oci::MANIFEST_MEDIA_TYPE, &new);
    entries[i] = file(format!("blobs/sha256/{}", d.digest.hex()), &new);
    index.set(&sig_tag, d);
    entries[1] = file("index.json", &index.to_bytes());
    write_archive(&entries, &host.fresh("resigned.oci.tar"))
}

#[test]
fn tampering_with_the_signature_annotation() {
    let host = Host::new();
    let (export, _key, _store) = real_export(&host, "builder.key", &[]);
    ok(host.stage().args(["trust", "add"]).arg(host.work().join("builder.key.pub")));
    let b64 = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    };
    let mut cases = Vec::new();
    // The untouched signature, re-serialized: must deploy (checked at the end).
    let same = rewrite_signatures(&host, &export, &|_, _| {});
    for byte in [0usize, 1, 31, 32, 62, 63] {
        for bit in [0u8, 7] {
            let p = rewrite_signatures(&host, &export, &move |sm, _| {
                let a = sm.layers[0].annotations.get_mut(oci::ANNOTATION_COSIGN_SIGNATURE).unwrap();
                let mut sig = b64(a);
                sig[byte] ^= 1 << bit;
                *a = base64_of(&sig);
            });
            cases.push(case(format!("signature byte {byte} bit {bit}"), p, TRUST_OR_MALFORMED));
        }
    }
    // Bits of the base64 text itself (some give invalid base64, some other bytes).
    for pos in [0usize, 1, 10, 43, 84, 85, 86, 87] {
        for bit in [0u8, 1, 5] {
            let p = rewrite_signatures(&host, &export, &move |sm, _| {
                let a = sm.layers[0].annotations.get_mut(oci::ANNOTATION_COSIGN_SIGNATURE).unwrap();
                let mut text = a.clone().into_bytes();
                if pos < text.len() {
                    text[pos] ^= 1 << bit;
                }
                *a = String::from_utf8_lossy(&text).into_owned();
            });
            cases.push(case(format!("signature base64 char {pos} bit {bit}"), p, TRUST_OR_MALFORMED));
        }
    }
    // The signature truncated, doubled, or moved to another annotation key.
    let p = rewrite_signatures(&host, &export, &|sm, _| {
        let a = sm.layers[0].annotations.get_mut(oci::ANNOTATION_COSIGN_SIGNATURE).unwrap();
        a.truncate(a.len() - 4);
    });
    cases.push(case("signature truncated", p, TRUST_OR_MALFORMED));
    let p = rewrite_signatures(&host, &export, &|sm, _| {
        let a = sm.layers[0].annotations.get_mut(oci::ANNOTATION_COSIGN_SIGNATURE).unwrap();
        *a = format!("{a}{a}");
    });
    cases.push(case("signature doubled", p, TRUST_OR_MALFORMED));
    let p = rewrite_signatures(&host, &export, &|sm, _| {
        let v = sm.layers[0].annotations.remove(oci::ANNOTATION_COSIGN_SIGNATURE).unwrap();
        sm.layers[0].annotations.insert("dev.cosignproject.cosign/signaturf".into(), v);
    });
    cases.push(case("signature under another annotation key", p, TRUST_OR_MALFORMED));
    // A bit of the signed payload flipped, its digest fixed up in the signature manifest.
    for byte in [0usize, 20, 100, 150] {
        let p = rewrite_signatures(&host, &export, &move |sm, entries| {
            let name = format!("blobs/sha256/{}", sm.layers[0].digest.hex());
            let i = entries.iter().position(|e| e.name == name.as_bytes()).unwrap();
            let mut payload = entries[i].data.clone();
            let byte = byte.min(payload.len() - 1);
            payload[byte] ^= 1;
            let mut l = Descriptor::of(oci::SIMPLE_SIGNING_MEDIA_TYPE, &payload);
            l.annotations = sm.layers[0].annotations.clone();
            sm.layers[0] = l;
            entries.insert(i, file(format!("blobs/sha256/{}", Digest::of(&payload).hex()), &payload));
        });
        cases.push(case(format!("signed payload byte {byte} flipped"), p, TRUST_OR_MALFORMED));
    }
    run_cases(&host, cases);
    let run = host.deploy(&same, &[]);
    assert_eq!(run.code(), 0, "re-serializing the signature manifest alone broke it: {}", run.stderr());
}

#[test]
fn tampering_with_tar_headers_of_a_real_export() {
    let host = Host::new();
    let (export, _key, _store) = real_export(&host, "builder.key", &[]);
    ok(host.stage().args(["trust", "add"]).arg(host.work().join("builder.key.pub")));
    let bytes = fs::read(&export).unwrap();
    let mut cases = Vec::new();
    for p in tar_positions(&bytes) {
        // A bit of the name (header checksum left as is, and fixed up), and of the size field.
        let last = p.name.trim_end_matches('/').len() - 1;
        for (what, off, fix) in [("name", 0usize, false), ("name", 0, true), ("name", last, true), ("size", 130, true)]
        {
            let mut copy = bytes.clone();
            copy[p.header + off] ^= 1;
            if fix {
                let h = &mut copy[p.header..p.header + 512];
                h[148..156].copy_from_slice(b"        ");
                let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
                h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
            }
            let short: String = p.name.trim_start_matches("blobs/sha256/").chars().take(12).collect();
            let path = write_work(&host, "hdr.oci.tar", &copy);
            let fixed = if fix { "checksum fixed" } else { "checksum stale" };
            cases.push(case(format!("header of {short}: {what} byte {off}, {fixed}"), path, TRUST_OR_MALFORMED));
        }
    }
    run_cases(&host, cases);
}

// ---------------------------------------------------------------------------------------
// The trust policy, through the binaries

/// Deploys `archive` expecting a refusal with `code` that changes nothing; returns stderr.
fn refused(host: &Host, archive: &Path, code: i32, flags: &[&'static str]) -> String {
    let before = host.snapshot();
    let run = host.deploy(archive, flags);
    assert_eq!(run.code(), code, "{}", run.stderr());
    assert_eq!(before, host.snapshot(), "a refused deploy changed something: {}", diff(&before, &host.snapshot()));
    run.stderr()
}

fn accepted(host: &Host, archive: &Path, flags: &[&'static str]) {
    let run = host.deploy(archive, flags);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert!(host.root().join("usr/local/bin/app").is_symlink());
}

fn key_id(pub_key: &Path) -> String {
    let out = ok(Command::new(util::bin("op-dbus-image")).args(["key", "show"]).arg(pub_key));
    out.split_whitespace().find(|w| w.len() == 16 && w.bytes().all(|c| c.is_ascii_hexdigit())).unwrap().to_owned()
}

#[test]
fn trust_scoped_key_cannot_sign_other_stages() {
    let host = Host::new();
    let (export, key, _) = real_export(&host, "builder.key", &[]);
    let pub_key = PathBuf::from(format!("{}.pub", key.display()));
    ok(host.stage().args(["trust", "add"]).arg(&pub_key).args(["--scope", "other-*"]));
    let err = refused(&host, &export, 3, &[]);
    assert!(err.contains("may only sign") && err.contains("other-*"), "{err}");
    // Widened to the stage: accepted, so the refusal was the scope's.
    ok(host.stage().args(["trust", "add"]).arg(&pub_key).args(["--scope", "app"]));
    accepted(&host, &export, &[]);
}

#[test]
fn trust_revoked_key_is_refused() {
    let host = Host::new();
    let (export, key, _) = real_export(&host, "builder.key", &[]);
    let pub_key = PathBuf::from(format!("{}.pub", key.display()));
    ok(host.stage().args(["trust", "add"]).arg(&pub_key));
    let id = key_id(&pub_key);
    ok(host.stage().args(["trust", "revoke", &id]));
    let list = parse_json(&ok(host.stage().args(["--json", "trust", "list"])));
    assert!(
        list["keys"].as_array().unwrap().iter().any(|k| k["key_id"] == id.as_str() && k["revoked"] == true),
        "{list}"
    );
    let err = refused(&host, &export, 3, &[]);
    assert!(err.contains(&id) && err.contains("revoked"), "{err}");
    // Adding the key again does not lift the revocation.
    ok(host.stage().args(["trust", "add"]).arg(&pub_key));
    refused(&host, &export, 3, &[]);
}

#[test]
fn trust_threshold_of_two_needs_a_co_signature() {
    let host = Host::new();
    let (export, key1, store) = real_export(&host, "builder.key", &[]);
    let key2 = keygen(&host.work(), "second.key");
    for k in [&key1, &key2] {
        ok(host.stage().args(["trust", "add"]).arg(format!("{}.pub", k.display())));
    }
    let policy = host.root().join("etc/op-dbus/stage.toml");
    let mut text = fs::read_to_string(&policy).unwrap();
    text.push_str("\n[[threshold]]\nstages = \"*\"\nsignatures = 2\n");
    fs::write(&policy, text).unwrap();
    let err = refused(&host, &export, 3, &[]);
    assert!(err.contains("2"), "{err}");
    // The same key signing again does not make a second signature.
    ok(image(&store, Some(&key1)).args(["-q", "sign", "app:1.0.0"]));
    let again = host.work().join("again.oci.tar");
    ok(image(&store, Some(&key1)).args(["-q", "export", "app:1.0.0", "--out"]).arg(&again));
    refused(&host, &again, 3, &[]);
    // A forged second signature layer by the same key (not replaced, duplicated) neither.
    let dup = rewrite_signatures(&host, &again, &|sm, _| {
        let l = sm.layers[0].clone();
        sm.layers.push(l);
    });
    refused(&host, &dup, 3, &[]);
    // Co-signed by the second key: accepted.
    ok(image(&store, Some(&key2)).args(["-q", "sign", "app:1.0.0"]));
    let cosigned = host.work().join("cosigned.oci.tar");
    ok(image(&store, Some(&key2)).args(["-q", "export", "app:1.0.0", "--out"]).arg(&cosigned));
    accepted(&host, &cosigned, &[]);
}

#[test]
fn trust_threshold_counts_only_trusted_distinct_keys() {
    let host = Host::new();
    let k1 = host.key("k1");
    let k2 = host.key("k2");
    let stranger = host.key("stranger");
    host.trust("k1");
    host.trust("k2");
    let policy = host.root().join("etc/op-dbus/stage.toml");
    let mut text = fs::read_to_string(&policy).unwrap();
    text.push_str("\n[[threshold]]\nstages = \"app\"\nsignatures = 2\n");
    fs::write(&policy, text).unwrap();
    let forge = |keys: Vec<&keys::PrivateKey>| {
        let mut f = Forge::tar(&k1, &base_raw());
        f.keys = keys;
        host.export(&f)
    };
    let cases = vec![
        case("threshold 2: one trusted signature", forge(vec![&k1]), TRUST),
        case("threshold 2: the same trusted key twice", forge(vec![&k1, &k1]), TRUST),
        case("threshold 2: trusted + untrusted", forge(vec![&k1, &stranger]), TRUST),
        case("threshold 2: untrusted twice", forge(vec![&stranger, &stranger]), TRUST),
    ];
    run_cases(&host, cases);
    let run = host.deploy(&forge(vec![&k2, &k1]), &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
}

#[test]
fn trust_expired_signature_is_refused_unless_allowed() {
    let host = Host::new();
    let (export, key, _) = real_export(&host, "builder.key", &["--expires", "2000-01-01T00:00:00Z"]);
    ok(host.stage().args(["trust", "add"]).arg(format!("{}.pub", key.display())));
    let err = refused(&host, &export, 3, &[]);
    assert!(err.contains("expired") && err.contains("--allow-expired"), "{err}");
    accepted(&host, &export, &["--allow-expired"]);
}

// ---------------------------------------------------------------------------------------
// Streaming: an unauthenticated blob is not read to its end

/// Streams `prefix` then zeros into `op-dbus-stage deploy -` until the installer stops
/// reading or `limit` bytes are written; returns (bytes written, exit code, stderr).
fn stream_into_deploy(host: &Host, prefix: &[u8], limit: u64) -> (u64, i32, String) {
    use std::io::Write as _;
    let mut child = host
        .stage()
        .args(["deploy", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let prefix = prefix.to_vec();
    let writer = std::thread::spawn(move || {
        let mut written = 0u64;
        if stdin.write_all(&prefix).is_err() {
            return written;
        }
        written += prefix.len() as u64;
        let zeros = vec![0u8; 1 << 20];
        while written < limit {
            match stdin.write(&zeros) {
                Ok(n) => written += n as u64,
                Err(_) => break,
            }
        }
        written
    });
    let written = writer.join().unwrap();
    let out = child.wait_with_output().unwrap();
    (written, out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// docs/formats.md: the archive's entry order lets a streaming reader check signatures
/// "before any payload byte arrives". A blob that arrives before the image's signatures
/// are checked, and that no manifest names as one of its small blobs, must not be read
/// (and written to disk) to its end: here its header claims 64 GiB and the installer must
/// stop before the 128 MiB this test is willing to send (the largest small blob, a config, is
/// 64 MiB).
#[test]
fn unauthenticated_blobs_are_not_read_to_their_end() {
    let host = Host::new();
    let trusted = host.key("k");
    host.trust("k");
    let stranger = host.key("stranger");
    let limit = 128u64 << 20;
    let huge = 64u64 << 30;
    let mut failures = Vec::new();
    for (what, key, as_layer) in [
        ("unreferenced blob, untrusted signature", &stranger, false),
        ("unreferenced blob, trusted signature", &trusted, false),
        ("the layer before the signatures, untrusted signature", &stranger, true),
        ("the layer before the signatures, trusted signature", &trusted, true),
    ] {
        let forge = Forge::tar(key, &base_raw());
        let forged = forge.write(&host.fresh("layout"));
        let entries = forged.entries();
        let name = if as_layer {
            let m = ImageManifest::from_bytes(&forged.blob(&forged.image.digest)).unwrap();
            format!("blobs/sha256/{}", m.layers[0].digest.hex())
        } else {
            format!("blobs/sha256/{}", Digest::of(b"junk").hex())
        };
        let mut prefix = tar_entries(&entries[..4]);
        prefix.extend_from_slice(&headers(&Raw { size: huge, ..file(name, b"") }));
        let before = host.snapshot();
        let start = std::time::Instant::now();
        let (written, code, stderr) = stream_into_deploy(&host, &prefix, limit);
        let after = host.snapshot();
        let line = format!(
            "{what}: read {} MiB before stopping, exit {code}, {:?}: {}",
            written >> 20,
            start.elapsed(),
            stderr.lines().next().unwrap_or_default()
        );
        eprintln!("{line}");
        if written >= limit || ![3, 7].contains(&code) || before != after {
            failures.push(line);
        }
    }
    assert!(failures.is_empty(), "unauthenticated bytes were read to their end:\n{}", failures.join("\n"));
}
