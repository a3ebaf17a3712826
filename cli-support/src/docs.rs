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

/// Every command of `cmd` that is not hidden, with its path (`op-dbus-stage trust add`),
/// the top-level command first.
pub fn visible_commands(mut cmd: Command) -> Vec<(String, Command)> {
    fn walk(cmd: &Command, path: &str, out: &mut Vec<(String, Command)>) {
        out.push((path.to_owned(), cmd.clone()));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            walk(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }
    cmd.build();
    let name = cmd.get_name().to_owned();
    let mut out = Vec::new();
    walk(&cmd, &name, &mut out);
    out
}

/// `command: argument` for every visible argument of every visible command that has no
/// help text (empty when every one has).
pub fn undocumented(cmd: Command) -> Vec<String> {
    let mut out = Vec::new();
    for (path, c) in visible_commands(cmd) {
        for arg in c.get_arguments().filter(|a| !a.is_hide_set()) {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" && arg.get_help().is_none() {
                out.push(format!("{path}: {id}"));
            }
        }
    }
    out
}

/// The visible commands that take the argument `id`.
pub fn commands_with(cmd: Command, id: &str) -> Vec<String> {
    visible_commands(cmd)
        .into_iter()
        .filter(|(_, c)| c.get_arguments().any(|a| a.get_id() == id))
        .map(|(path, _)| path)
        .collect()
}

/// The long help of every visible command, 100 columns wide, keyed by its path with `_`
/// for spaces (the names of the help snapshots).
pub fn long_helps(cmd: Command) -> Vec<(String, String)> {
    visible_commands(cmd)
        .into_iter()
        .map(|(path, c)| (path.replace(' ', "_"), c.term_width(100).render_long_help().to_string()))
        .collect()
}

/// The tests every binary's command line gets (expand inside a `#[cfg(test)] mod help`
/// of the module that defines the `clap::Parser`): every argument has help, the registry
/// flags sit only on the listed commands, and the help of every command is pinned by an
/// insta snapshot (the binary needs `insta` as a dev-dependency).
#[macro_export]
macro_rules! help_tests {
    ($cli:ty, registry_flags_on: [$($cmd:expr),* $(,)?]) => {
        #[test]
        fn every_argument_and_value_has_help() {
            use clap::CommandFactory;
            assert_eq!($crate::docs::undocumented(<$cli>::command()), Vec::<String>::new());
        }

        #[test]
        fn registry_flags_only_where_they_are_used() {
            use clap::CommandFactory;
            let mut with = $crate::docs::commands_with(<$cli>::command(), "insecure");
            with.sort();
            let mut want: Vec<String> = vec![$($cmd.to_string()),*];
            want.sort();
            assert_eq!(with, want);
        }

        #[test]
        fn help_snapshots() {
            use clap::CommandFactory;
            for (name, help) in $crate::docs::long_helps(<$cli>::command()) {
                insta::assert_snapshot!(name, help);
            }
        }
    };
}
