//! Progress bars with rate and ETA (hidden when stderr is not a terminal),
//! and log lines that stand in for a hidden bar.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

pub fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{prefix} {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}, {per_sec}] {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(what.to_string());
    bar
}

/// Progress lines for a bar nobody sees (stderr to a file, as under
/// `nohup`): one each time the work passes another tenth, with the time
/// left, so the log of a 40-minute evaluation shows it is alive and when it
/// will end. No line at the end: the caller's result line says that.
pub struct TenthsLog {
    what: &'static str,
    total: u64,
    tenths_logged: u64,
    started: Instant,
}

impl TenthsLog {
    pub fn new(what: &'static str, total: u64) -> Self {
        Self {
            what,
            total,
            tenths_logged: 0,
            started: Instant::now(),
        }
    }

    /// The line to log now that `done` units are done, if they passed a
    /// tenth of the total not logged yet.
    pub fn line(&mut self, done: u64) -> Option<String> {
        if self.total == 0 || done >= self.total {
            return None;
        }
        let tenths = done * 10 / self.total;
        if tenths <= self.tenths_logged {
            return None;
        }
        self.tenths_logged = tenths;
        let seconds_each = self.started.elapsed().as_secs_f64() / done as f64;
        let left = seconds_each * (self.total - done) as f64;
        Some(format!(
            "{} {done}/{}: {} to go",
            self.what,
            self.total,
            fewshot_eval::duration(left)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenths_log_writes_one_line_per_tenth_passed_and_none_at_the_end() {
        let mut log = TenthsLog::new("eval", 1000);
        let logged: Vec<u64> = [50, 100, 150, 350, 360, 990, 1000]
            .into_iter()
            .filter(|&done| log.line(done).is_some())
            .collect();
        assert_eq!(logged, vec![100, 350, 990]);
        let line = TenthsLog::new("eval", 1000).line(100).unwrap();
        assert!(line.starts_with("eval 100/1000: "), "{line}");
        assert!(line.ends_with(" to go"), "{line}");
    }

    #[test]
    fn tenths_log_is_silent_on_empty_work() {
        assert_eq!(TenthsLog::new("eval", 0).line(0), None);
    }
}
