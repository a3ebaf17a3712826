//! Helpers for tests that run real tools.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The path of `tool` on `PATH`; fails the test, saying how to install it, when missing.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("this interop test needs `{tool}`, which is not on PATH: run `apt-get install {package}`")
        })
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

/// Runs `cmd`, fails the test unless it succeeds, returns its stdout.
pub fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out.stdout
}
