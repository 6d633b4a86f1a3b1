//! MAML++'s cosine annealing of the meta learning rate (Antoniou et al.
//! 2019, section 4: "cosine annealing of meta-optimizer learning rate"): the
//! learning rate falls along half a cosine from the optimiser's to a minimum
//! over the training's epochs, changing once an epoch as the reference code
//! steps PyTorch's `CosineAnnealingLR`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CosineAnnealing {
    /// Epochs from the optimiser's learning rate to `min_lr` (MAML++: all
    /// of its 100); after them the rate stays at `min_lr`.
    pub epochs: usize,
    /// The learning rate at the end (MAML++: 1e-5).
    pub min_lr: f64,
}

impl Default for CosineAnnealing {
    fn default() -> Self {
        Self {
            epochs: 100,
            min_lr: 1e-5,
        }
    }
}

impl CosineAnnealing {
    /// The learning rate in (0-based) `epoch`, starting from `lr`.
    pub fn lr_at(&self, lr: f64, epoch: usize) -> f64 {
        let progress = epoch.min(self.epochs) as f64 / self.epochs as f64;
        self.min_lr + (lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_falls_along_half_a_cosine_and_stays_at_the_minimum() {
        let schedule = CosineAnnealing::default();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
        assert!(close(schedule.lr_at(1e-3, 0), 1e-3));
        // Half way: the mean of the two.
        assert!(close(schedule.lr_at(1e-3, 50), 5.05e-4));
        // A quarter: min + (lr - min) (1 + cos(pi / 4)) / 2.
        let quarter = 1e-5 + 9.9e-4 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
        assert!(close(schedule.lr_at(1e-3, 25), quarter));
        assert!(close(schedule.lr_at(1e-3, 100), 1e-5));
        assert!(close(schedule.lr_at(1e-3, 150), 1e-5));
    }
}
