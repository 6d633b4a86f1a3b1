//! The statistics of the evaluation protocol: mean with a 95% confidence
//! interval over episodes, and a paired t-test between two learners
//! evaluated on the same episodes.

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::special::regularized_incomplete_beta;

/// The normal quantile of a two-sided 95% interval, as the few-shot papers
/// use it (MAML: "95% confidence interval = 1.96 * std / sqrt(n)"). The
/// exact t quantile is 1.9639 for 600 episodes: 0.2% wider, which papers
/// ignore, and so do we, to stay comparable.
const Z95: f64 = 1.96;

/// Mean of per-episode values with its 95% confidence interval.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (divides by n - 1; 0 when n = 1).
    pub std: f64,
    /// Half-width of the 95% interval: `1.96 * std / sqrt(n)`.
    pub ci95: f64,
}

/// Mean, sample standard deviation and 95% interval of `values`.
///
/// The standard deviation divides by n - 1, the unbiased choice, where
/// MAML's code uses numpy's default population std (divides by n). The two
/// differ by a factor sqrt(n / (n - 1)): under 0.1% for n >= 600, the
/// episode counts the papers report, so our intervals are comparable.
pub fn summarize(values: &[f64]) -> Result<Summary> {
    if values.is_empty() {
        return Err(EvalError::Empty {
            what: "no values to summarize".into(),
        });
    }
    let n = values.len();
    let (mean, std) = mean_and_std(values);
    Ok(Summary {
        n,
        mean,
        std,
        ci95: Z95 * std / (n as f64).sqrt(),
    })
}

/// Paired comparison of two learners on the same episodes: is `a` better
/// than `b`, or is the difference within the noise of the episodes?
///
/// Pairing removes the variation between episodes (some are simply harder
/// for every learner), so it detects differences that two overlapping
/// confidence intervals cannot.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct PairedComparison {
    pub n: usize,
    pub mean_a: f64,
    pub mean_b: f64,
    /// Mean of `a - b` over the episodes.
    pub mean_difference: f64,
    /// Half-width of the 95% interval of the mean difference:
    /// `1.96 * sd(a - b) / sqrt(n)`.
    pub ci95: f64,
    /// `mean_difference / (sd(a - b) / sqrt(n))`.
    pub t_statistic: f64,
    /// n - 1.
    pub degrees_of_freedom: usize,
    /// Two-sided p-value of the paired t-test: the probability of a
    /// difference at least this large if the learners were equally good.
    pub p_value: f64,
}

/// Paired t-test of `a` against `b`, where `a[i]` and `b[i]` were measured
/// on the same episode.
///
/// When every difference is the same, the t statistic is undefined: it is
/// taken as 0 with p = 1 if the differences are all zero (identical
/// results), and as ±infinity with p = 0 otherwise.
pub fn paired_comparison(a: &[f64], b: &[f64]) -> Result<PairedComparison> {
    if a.len() != b.len() {
        return Err(EvalError::Mismatch {
            what: format!(
                "paired comparison of {} values with {} values",
                a.len(),
                b.len()
            ),
        });
    }
    let n = a.len();
    if n < 2 {
        return Err(EvalError::Empty {
            what: format!("a paired comparison needs at least 2 pairs, got {n}"),
        });
    }
    let differences: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let (mean_difference, std) = mean_and_std(&differences);
    let standard_error = std / (n as f64).sqrt();
    let degrees_of_freedom = n - 1;
    let (t_statistic, p_value) = if standard_error > 0.0 {
        let t = mean_difference / standard_error;
        (t, student_t_two_sided_p(t, degrees_of_freedom as f64))
    } else if mean_difference == 0.0 {
        (0.0, 1.0)
    } else {
        (f64::INFINITY.copysign(mean_difference), 0.0)
    };
    Ok(PairedComparison {
        n,
        mean_a: mean_and_std(a).0,
        mean_b: mean_and_std(b).0,
        mean_difference,
        ci95: Z95 * standard_error,
        t_statistic,
        degrees_of_freedom,
        p_value,
    })
}

/// Two-sided tail probability `P(|T| >= |t|)` of Student's t distribution
/// with `df` degrees of freedom: `I_{df/(df+t^2)}(df/2, 1/2)`. NaN when `t`
/// is NaN or `df` is not positive.
pub fn student_t_two_sided_p(t: f64, df: f64) -> f64 {
    if t.is_infinite() {
        // df / (df + t^2) would be df / inf = 0: the formula's limit, exactly.
        return if df > 0.0 { 0.0 } else { f64::NAN };
    }
    regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
}

/// Mean and sample standard deviation (n - 1; 0 for one value) of a
/// non-empty slice. Two passes: summing squared deviations from the mean
/// avoids the cancellation of `E[x^2] - E[x]^2` on values near 1.
fn mean_and_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let squares: f64 = values.iter().map(|v| (v - mean).powi(2)).sum();
    (mean, (squares / (n - 1.0)).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "{actual} != {expected} (tolerance {tolerance})"
        );
    }

    #[test]
    fn summary_uses_the_sample_std_and_the_papers_interval() {
        let s = summarize(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.n, 4);
        close(s.mean, 2.5, 1e-15);
        // Squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; 5 / 3 = 1.6667.
        close(s.std, (5.0f64 / 3.0).sqrt(), 1e-15);
        close(s.std, 1.290_994_4, 1e-7);
        close(s.ci95, 1.96 * 1.290_994_448_735_806 / 2.0, 1e-12);

        let one = summarize(&[0.7]).unwrap();
        assert_eq!((one.mean, one.std, one.ci95), (0.7, 0.0, 0.0));
        assert!(matches!(summarize(&[]), Err(EvalError::Empty { .. })));
    }

    #[test]
    fn t_test_p_values_match_independent_computation() {
        // Reference values from mpmath's betainc at 30 digits, cross-checked
        // by integrating the t density: 2 * integral from |t| to inf.
        for (t, df, p) in [
            (2.0, 10.0, 0.073_388_034_770_740_38),
            (1.0, 5.0, 0.363_217_467_649_122_7),
            (3.5, 30.0, 0.001_476_807_437_644_252),
            (0.5, 1.0, 0.704_832_764_699_133_5),
            (10.0, 3.0, 0.002_128_399_058_414_15),
            (1.7, 200.0, 0.090_685_479_491_482_56),
        ] {
            close(student_t_two_sided_p(t, df), p, 1e-12);
            // The test is two-sided: the sign of t does not matter.
            close(student_t_two_sided_p(-t, df), p, 1e-12);
        }
        assert_eq!(student_t_two_sided_p(0.0, 7.0), 1.0);
        assert_eq!(student_t_two_sided_p(f64::INFINITY, 7.0), 0.0);
        assert!(student_t_two_sided_p(1.0, 0.0).is_nan());
        assert!(student_t_two_sided_p(f64::NAN, 3.0).is_nan());
    }

    #[test]
    fn paired_comparison_matches_hand_computation() {
        let a = [0.90, 0.80, 0.70, 0.95];
        let b = [0.85, 0.80, 0.60, 0.90];
        let c = paired_comparison(&a, &b).unwrap();
        // Differences 0.05, 0, 0.1, 0.05: mean 0.05; squared deviations
        // 0 + 0.0025 + 0.0025 + 0 = 0.005, so sd = sqrt(0.005 / 3) = 0.0408248
        // and the standard error is sd / sqrt(4) = 0.0204124.
        // t = 0.05 / 0.0204124 = sqrt(6) = 2.4494897 with 3 degrees of freedom.
        assert_eq!((c.n, c.degrees_of_freedom), (4, 3));
        close(c.mean_a, 0.8375, 1e-12);
        close(c.mean_b, 0.7875, 1e-12);
        close(c.mean_difference, 0.05, 1e-12);
        close(c.ci95, 1.96 * 0.020_412_414_523_193_15, 1e-12);
        close(c.t_statistic, 6f64.sqrt(), 1e-9);
        // I_{3/9}(1.5, 0.5), from mpmath.
        close(c.p_value, 0.091_721_113_311_571_91, 1e-9);

        // Swapping the learners flips the sign, not the evidence.
        let swapped = paired_comparison(&b, &a).unwrap();
        close(swapped.t_statistic, -c.t_statistic, 1e-12);
        close(swapped.p_value, c.p_value, 1e-15);
    }

    #[test]
    fn paired_comparison_of_constant_differences() {
        let same = paired_comparison(&[0.5, 0.7, 0.9], &[0.5, 0.7, 0.9]).unwrap();
        assert_eq!(
            (same.mean_difference, same.t_statistic, same.p_value),
            (0.0, 0.0, 1.0)
        );
        assert_eq!(same.ci95, 0.0);

        let shifted = paired_comparison(&[0.5, 0.75], &[0.25, 0.5]).unwrap();
        assert_eq!(shifted.t_statistic, f64::INFINITY);
        assert_eq!(shifted.p_value, 0.0);
    }

    #[test]
    fn paired_comparison_refuses_unpaired_or_tiny_inputs() {
        let err = paired_comparison(&[0.1, 0.2], &[0.1]).unwrap_err();
        assert!(matches!(err, EvalError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("2 values with 1"), "{err}");
        let err = paired_comparison(&[0.1], &[0.2]).unwrap_err();
        assert!(matches!(err, EvalError::Empty { .. }), "{err}");
    }
}
