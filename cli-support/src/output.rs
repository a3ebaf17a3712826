//! Output: one JSON document or text for people, tables with headers, human sizes.

use std::io::Write;

use serde::Serialize;

use crate::GlobalArgs;
use crate::exit::StdoutClosed;

/// Where a command's result goes: stdout, as JSON or text; `-q` silences the text.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
    pub quiet: bool,
}

impl Output {
    pub fn new(g: &GlobalArgs) -> Output {
        Output { json: g.json, quiet: g.quiet }
    }

    /// Prints `value` as one JSON document, or `text(value)` for people (nothing under
    /// `-q`). A closed stdout is returned as [`StdoutClosed`], which ends the command
    /// cleanly (exit 0).
    pub fn emit<T: Serialize>(&self, value: &T, text: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        let written = if self.json {
            serde_json::to_writer_pretty(&mut out, value)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(out))
                .and_then(|()| out.flush())
        } else if self.quiet {
            Ok(())
        } else {
            out.write_all(text(value).as_bytes()).and_then(|()| out.flush())
        };
        match written {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed(e).into()),
            Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
        }
    }

    /// [`Output::emit`] on stderr, for a command whose stdout carries data
    /// (`export --out -`).
    pub fn emit_to_stderr<T: Serialize>(&self, value: &T, text: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
        let mut err = std::io::stderr().lock();
        if self.json {
            serde_json::to_writer_pretty(&mut err, value)?;
            writeln!(err)?;
        } else if !self.quiet {
            err.write_all(text(value).as_bytes())?;
        }
        Ok(())
    }

    /// A warning on stderr, unless `-q`.
    pub fn warn(&self, message: &str) {
        if !self.quiet {
            let _ = writeln!(std::io::stderr(), "warning: {message}");
        }
    }

    /// A note on stderr, unless `-q`.
    pub fn note(&self, message: &str) {
        if !self.quiet {
            let _ = writeln!(std::io::stderr(), "{message}");
        }
    }
}

/// A size for people: `512 B`, `1.5 KiB`, `20.0 MiB`, `3.2 GiB` (exact bytes go in JSON).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A text table: a header line, then one line per row, columns padded to their widest
/// cell (the last column is not padded). Columns listed in `right` are right-aligned.
pub fn table(headers: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i > 0 {
                s.push_str("  ");
            }
            if right.contains(&i) {
                s += &format!("{cell:>w$}");
            } else if i == last {
                s.push_str(cell);
            } else {
                s += &format!("{cell:<w$}");
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut s = line(headers.to_vec());
    for row in rows {
        s += &line(row.iter().map(String::as_str).collect());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(20 << 20), "20.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn tables_have_headers_and_aligned_columns() {
        let t = table(&["NAME", "SIZE", "NOTE"], &[vec!["a".into(), "1.0 KiB".into(), "x".into()]], &[1]);
        assert_eq!(t, "NAME     SIZE  NOTE\na     1.0 KiB  x\n");
    }
}
