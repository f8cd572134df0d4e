//! One line of progress on stderr while a long run goes (elapsed, answered of total, rate,
//! errors), rewritten in place each second. Quiet when stderr is not a terminal (CI logs,
//! pipes, `tools/bench`), and never on stdout, which carries the report.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Progress {
    total: u64,
    answered: AtomicU64,
    errors: AtomicU64,
    started: Instant,
}

impl Progress {
    pub fn new(total: usize) -> Arc<Self> {
        Arc::new(Self {
            total: total as u64,
            answered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    /// One request answered: `ok` for the answer hoped for, else an error (another status or
    /// no answer at all).
    pub fn record(&self, ok: bool) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The line as of `elapsed`.
    pub fn line(&self, elapsed: Duration) -> String {
        let answered = self.answered.load(Ordering::Relaxed);
        let rate = answered as f64 / elapsed.as_secs_f64().max(1e-3);
        let percent = answered as f64 * 100.0 / self.total.max(1) as f64;
        format!(
            "{:>6.1} s  {answered}/{} answered ({percent:.0} %)  {rate:.0}/s  {} errors",
            elapsed.as_secs_f64(),
            self.total,
            self.errors.load(Ordering::Relaxed)
        )
    }

    /// Shows the line each second until the returned guard is dropped; nothing when stderr is
    /// not a terminal.
    pub fn show(self: &Arc<Self>) -> Option<Shown> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let progress = self.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprint!("\r{}\x1b[K", progress.line(progress.started.elapsed()));
                let _ = std::io::stderr().flush();
            }
        });
        Some(Shown { progress: self.clone(), task })
    }
}

/// Stops the line and leaves its last state on screen.
pub struct Shown {
    progress: Arc<Progress>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Shown {
    fn drop(&mut self) {
        self.task.abort();
        eprintln!("\r{}\x1b[K", self.progress.line(self.progress.started.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_answered_rate_and_errors() {
        let progress = Progress::new(200);
        for ok in [true, true, false, true] {
            progress.record(ok);
        }
        let line = progress.line(Duration::from_secs(2));
        assert!(line.contains("4/200 answered (2 %)"), "{line}");
        assert!(line.contains("2/s"), "{line}");
        assert!(line.contains("1 errors"), "{line}");
    }
}
