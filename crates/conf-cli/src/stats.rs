//! Statistics across seeds: mean, sample standard deviation, a Student-t 95% interval, and the
//! paired t-test of confidence − standard.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

/// One metric across seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedStats {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (n − 1); `null` for one seed.
    pub std: Option<f64>,
    /// Half-width of the 95% Student-t interval around the mean; `null` for one seed.
    pub ci95: Option<f64>,
}

/// Across-seed statistics of `values` (at least one).
pub fn seed_stats(values: &[f64]) -> SeedStats {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return SeedStats {
            n,
            mean,
            std: None,
            ci95: None,
        };
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let std = var.sqrt();
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64)
        .expect("n − 1 ≥ 1 degrees of freedom")
        .inverse_cdf(0.975);
    SeedStats {
        n,
        mean,
        std: Some(std),
        ci95: Some(t * std / (n as f64).sqrt()),
    }
}

/// The paired difference `b − a` across seeds with its interval and two-sided p-value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedDifference {
    pub difference: SeedStats,
    /// Paired t-test p-value (two-sided); `null` with one seed or zero variance, see `note`.
    pub p_value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

pub fn paired_difference(a: &[f64], b: &[f64]) -> PairedDifference {
    let diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let difference = seed_stats(&diffs);
    let (p_value, note) = match difference.std {
        None => (None, Some("one seed: no test".to_string())),
        Some(0.0) => (None, Some("zero variance of the differences".to_string())),
        Some(s) => {
            let n = diffs.len() as f64;
            let t = difference.mean / (s / n.sqrt());
            let dist = StudentsT::new(0.0, 1.0, n - 1.0).expect("n − 1 ≥ 1");
            (Some(2.0 * (1.0 - dist.cdf(t.abs()))), None)
        }
    };
    PairedDifference {
        difference,
        p_value,
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_stats_match_a_hand_computation() {
        let s = seed_stats(&[1.0, 2.0, 3.0]);
        assert_eq!(s.mean, 2.0);
        assert!((s.std.unwrap() - 1.0).abs() < 1e-12);
        // t(0.975, 2) = 4.302653; half-width = t · 1 / sqrt(3).
        assert!((s.ci95.unwrap() - 4.302_653 / 3f64.sqrt()).abs() < 1e-5);
        let one = seed_stats(&[5.0]);
        assert_eq!((one.mean, one.std, one.ci95), (5.0, None, None));
    }

    #[test]
    fn the_paired_t_test_matches_a_reference_value() {
        // Differences 1, 2, 3, 4: mean 2.5, sd 1.29099, t = 3.87298 on 3 df, p = 0.030466.
        let p = paired_difference(&[0.0; 4], &[1.0, 2.0, 3.0, 4.0]);
        assert!((p.difference.mean - 2.5).abs() < 1e-12);
        assert!(
            (p.p_value.unwrap() - 0.030466).abs() < 1e-5,
            "{:?}",
            p.p_value
        );
        let flat = paired_difference(&[1.0, 2.0], &[2.0, 3.0]);
        assert_eq!(flat.p_value, None);
        assert!(flat.note.unwrap().contains("zero variance"));
    }
}
