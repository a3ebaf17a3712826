//! Confirmation on a terminal.

use std::io::{BufRead, IsTerminal, Write};

/// Whether a question can be asked: stdin and stderr are terminals.
pub fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Asks `question` on stderr and reads the answer from stdin: `true` for y or yes.
pub fn confirm(question: &str) -> std::io::Result<bool> {
    let mut err = std::io::stderr().lock();
    write!(err, "{question} [y/N] ")?;
    err.flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().take_line(&mut answer)?;
    Ok(matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
}

trait TakeLine {
    fn take_line(&mut self, s: &mut String) -> std::io::Result<()>;
}

impl<R: BufRead> TakeLine for R {
    /// One line of at most 1 KiB.
    fn take_line(&mut self, s: &mut String) -> std::io::Result<()> {
        use std::io::Read;
        self.take(1024).read_line(s).map(|_| ())
    }
}
