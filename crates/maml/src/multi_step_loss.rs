//! MAML++'s multi-step loss (Antoniou, Edwards & Storkey 2019, "How to train
//! your MAML", section 4): the meta-loss is the query loss after every inner
//! step, weighted, rather than after the last one only. The weights start
//! equal and move toward the last step over the first epochs; after those,
//! only the last step counts, as in plain MAML. Early in training this gives
//! the initial weights a gradient through short paths too, which the paper
//! found steadies training.

use serde::{Deserialize, Serialize};

/// The multi-step loss's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiStepLoss {
    /// Epochs during which every step's query loss counts (MAML++: 10).
    pub epochs: usize,
}

impl Default for MultiStepLoss {
    fn default() -> Self {
        Self { epochs: 10 }
    }
}

/// The share of the last step's loss that the others keep at least, as in
/// the MAML++ reference code: each non-final step keeps 0.03 / steps.
const NON_FINAL_FLOOR: f64 = 0.03;

/// The weight of the query loss after each of `steps` inner steps, in
/// (0-based) `epoch`: each non-final weight falls linearly from 1/steps by
/// 1/(steps × epochs) an epoch to a floor of 0.03/steps; the last one takes
/// what they lose. They sum to 1. From epoch `schedule.epochs` on (or with
/// no multi-step loss) only the last step's loss counts.
pub fn query_loss_weights(steps: usize, schedule: Option<MultiStepLoss>, epoch: usize) -> Vec<f64> {
    let mut weights = vec![0.0; steps];
    let Some(last) = steps.checked_sub(1) else {
        return weights;
    };
    match schedule {
        Some(MultiStepLoss { epochs }) if epoch < epochs => {
            let k = steps as f64;
            let decay = epoch as f64 / (k * epochs as f64);
            let floor = NON_FINAL_FLOOR / k;
            for weight in &mut weights[..last] {
                *weight = (1.0 / k - decay).max(floor);
            }
            weights[last] = (1.0 / k + (k - 1.0) * decay).min(1.0 - (k - 1.0) * floor);
        }
        _ => weights[last] = 1.0,
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    }

    /// Five steps over ten epochs, by hand: the decay is 1/50 an epoch and the
    /// floor 0.006.
    #[test]
    fn the_weights_follow_the_reference_schedule() {
        let schedule = Some(MultiStepLoss { epochs: 10 });
        let at = |epoch| query_loss_weights(5, schedule, epoch);
        assert!(close(&at(0), &[0.2; 5]));
        assert!(close(&at(5), &[0.1, 0.1, 0.1, 0.1, 0.6]));
        assert!(close(&at(9), &[0.02, 0.02, 0.02, 0.02, 0.92]));
        assert!(close(&at(10), &[0.0, 0.0, 0.0, 0.0, 1.0]));
        assert!(close(&at(300), &[0.0, 0.0, 0.0, 0.0, 1.0]));
        for epoch in 0..12 {
            let sum: f64 = at(epoch).iter().sum();
            assert!((sum - 1.0).abs() < 1e-12, "epoch {epoch}: {sum}");
        }
        // The floor holds where the decay would pass it: at epoch 99 of 100
        // the non-final weights would be 0.002, under the floor of 0.006, and
        // the last is capped at 1 - 4 * 0.006.
        let late = query_loss_weights(5, Some(MultiStepLoss { epochs: 100 }), 99);
        assert!(close(&late, &[0.006, 0.006, 0.006, 0.006, 0.976]));
    }

    #[test]
    fn without_a_schedule_only_the_last_step_counts() {
        assert!(close(&query_loss_weights(3, None, 0), &[0.0, 0.0, 1.0]));
        assert!(close(
            &query_loss_weights(1, Some(MultiStepLoss::default()), 0),
            &[1.0]
        ));
        assert!(query_loss_weights(0, None, 0).is_empty());
    }
}
