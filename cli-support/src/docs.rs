//! Man pages and shell completions, generated from the clap definitions.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Command;
pub use clap_complete::Shell;

/// Prints the completion script of `cmd` for `shell` on stdout (a closed stdout ends
/// cleanly, as for every other output).
pub fn completions(mut cmd: Command, shell: Shell) -> anyhow::Result<()> {
    use std::io::Write;
    let name = cmd.get_name().to_owned();
    // Generated into memory first: clap_complete panics on a failed write.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    let mut out = std::io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(crate::exit::StdoutClosed(e).into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// Writes one man page per command into `dir` (`NAME.1`, `NAME-SUB.1`, ...), hidden
/// commands left out; returns the files written.
pub fn man_pages(cmd: Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = cmd;
    cmd.build();
    let mut written = Vec::new();
    write_page(&cmd, cmd.get_name(), dir, &mut written)?;
    Ok(written)
}

fn write_page(cmd: &Command, name: &str, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let page = cmd.clone().name(name.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut bytes = Vec::new();
    clap_mangen::Man::new(page).render(&mut bytes).with_context(|| format!("rendering {}", path.display()))?;
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        write_page(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
