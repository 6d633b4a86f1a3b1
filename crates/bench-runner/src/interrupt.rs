//! Ctrl-C (SIGINT) or SIGTERM during training: the first asks the run to
//! stop after its current step and write a checkpoint, so that `--resume`
//! loses nothing (a running validation stops too, and the resumed run does
//! it again); a second one ends the process at once.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::flag;

/// Whether a stop was asked for since [`StopRequest::install`].
pub struct StopRequest(Arc<AtomicBool>);

impl StopRequest {
    pub fn install() -> Result<Self> {
        let requested = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM] {
            // The signal's default action (ending the process) runs before
            // the flag is set (hooks run in the order registered), so only
            // if an earlier signal set the flag already.
            flag::register_conditional_default(signal, Arc::clone(&requested))
                .and_then(|_| flag::register(signal, Arc::clone(&requested)))
                .with_context(|| format!("cannot install a handler for signal {signal}"))?;
        }
        Ok(Self(requested))
    }

    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// For progress callbacks: break once a stop is asked for.
    pub fn control_flow(&self) -> ControlFlow<()> {
        if self.is_requested() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// From now on the first signal ends the process at once, as if no
    /// handler were installed: for work after training (the test
    /// evaluation), where there is nothing to save.
    pub fn end_process_on_signal(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
