//! Training time without the time a run spent stopped. A training stopped
//! with Ctrl-Z or `kill -STOP` (to free the machine for a while) and
//! continued later would otherwise count the whole pause as training time,
//! and a plot of accuracy against training time would stretch by it.
//!
//! A stopped process cannot see the stop, but it is sent SIGCONT when it
//! continues: a step during which that signal came counts as long as the
//! last step that ran undisturbed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use signal_hook::consts::SIGCONT;
use signal_hook::flag;

pub struct StepClock {
    continued: Arc<AtomicBool>,
    last_undisturbed: Option<Duration>,
}

impl StepClock {
    pub fn install() -> Result<Self> {
        let continued = Arc::new(AtomicBool::new(false));
        flag::register(SIGCONT, Arc::clone(&continued))
            .context("cannot install a handler for SIGCONT")?;
        Ok(Self {
            continued,
            last_undisturbed: None,
        })
    }

    /// Runs one step and returns its result and its training time. The first
    /// step of a process has no undisturbed step to stand in for it: if it
    /// was stopped, it counts whole.
    pub fn time<T>(&mut self, step: impl FnOnce() -> T) -> (T, Duration) {
        // A continue before the step (during a validation, say) is not this
        // step's business.
        self.continued.store(false, Ordering::SeqCst);
        let started = Instant::now();
        let output = step();
        let took = started.elapsed();
        let was_stopped = self.continued.swap(false, Ordering::SeqCst);
        let counted = match (was_stopped, self.last_undisturbed) {
            (true, Some(undisturbed)) => undisturbed,
            _ => took,
        };
        if !was_stopped {
            self.last_undisturbed = Some(took);
        }
        (output, counted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signal_hook::low_level::raise;
    use std::thread::sleep;

    // One test: SIGCONT reaches every clock of the process, so clocks in
    // tests running side by side would see each other's signals.
    #[test]
    fn a_step_continued_after_a_stop_counts_as_the_last_undisturbed_one() {
        let mut clock = StepClock::install().unwrap();
        let ((), first) = clock.time(|| sleep(Duration::from_millis(5)));
        assert!(first >= Duration::from_millis(5));
        // SIGCONT to a running process only runs the handler: the stand-in
        // for a stop and continue in the middle of a step.
        let ((), paused) = clock.time(|| {
            raise(SIGCONT).unwrap();
            sleep(Duration::from_millis(50));
        });
        assert_eq!(paused, first);
        // A continue between steps (during a validation) leaves the next
        // step's time whole.
        raise(SIGCONT).unwrap();
        let ((), after) = clock.time(|| sleep(Duration::from_millis(20)));
        assert!(after >= Duration::from_millis(20), "{after:?}");
    }
}
