//! Metric definitions shared by the dashboard, the results file and the report (DESIGN §7).
//! Plain functions on host vectors, so each is tested against hand-made answers.

use serde::{Deserialize, Serialize};

/// Token-ECE bins: (lo, hi] on 16 evenly spaced edges from 0 to 1.
pub const TOKEN_ECE_BINS: usize = 15;
/// Loss-ECE bins: 15 contiguous groups of near-equal size after a stable sort by prediction.
pub const LOSS_ECE_BINS: usize = 15;

/// Why a metric has no value (written as JSON `null` with this reason beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undefined(pub &'static str);

pub type MetricResult = Result<f64, Undefined>;

const EMPTY: Undefined = Undefined("no samples");

/// Expected calibration error of the top-1 probability against top-1 accuracy.
pub fn token_ece(max_prob: &[f32], correct: &[f32]) -> MetricResult {
    if max_prob.is_empty() {
        return Err(EMPTY);
    }
    let mut count = [0usize; TOKEN_ECE_BINS];
    let mut conf = [0f64; TOKEN_ECE_BINS];
    let mut acc = [0f64; TOKEN_ECE_BINS];
    for (&p, &c) in max_prob.iter().zip(correct) {
        // Bin b holds (b/15, (b+1)/15]; p = 0 lies in no bin.
        if p <= 0.0 {
            continue;
        }
        let bin = ((p as f64 * TOKEN_ECE_BINS as f64).ceil() as usize).clamp(1, TOKEN_ECE_BINS) - 1;
        count[bin] += 1;
        conf[bin] += p as f64;
        acc[bin] += c as f64;
    }
    let n = max_prob.len() as f64;
    Ok((0..TOKEN_ECE_BINS)
        .filter(|&b| count[b] > 0)
        .map(|b| (acc[b] - conf[b]).abs() / n)
        .sum())
}

/// One bin of the reliability diagram of predicted against actual future loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationBin {
    pub count: usize,
    pub mean_predicted: f64,
    pub mean_actual: f64,
}

/// Loss-ECE, `Σ n_b/N · |mean predicted − mean actual|`, and its bins.
pub fn loss_calibration(predicted: &[f32], actual: &[f32]) -> (MetricResult, Vec<CalibrationBin>) {
    let n = predicted.len();
    if n == 0 {
        return (Err(EMPTY), Vec::new());
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| predicted[a].total_cmp(&predicted[b])); // stable
    let bins: Vec<CalibrationBin> = (0..LOSS_ECE_BINS.min(n))
        .map(|b| {
            let bins = LOSS_ECE_BINS.min(n);
            let range = (b * n / bins)..((b + 1) * n / bins);
            let count = range.len();
            let (sp, sa) = order[range].iter().fold((0f64, 0f64), |(sp, sa), &i| {
                (sp + predicted[i] as f64, sa + actual[i] as f64)
            });
            CalibrationBin {
                count,
                mean_predicted: sp / count as f64,
                mean_actual: sa / count as f64,
            }
        })
        .collect();
    let ece = bins
        .iter()
        .map(|b| b.count as f64 / n as f64 * (b.mean_predicted - b.mean_actual).abs())
        .sum();
    (Ok(ece), bins)
}

pub fn mse(predicted: &[f32], actual: &[f32]) -> MetricResult {
    mean(
        predicted
            .iter()
            .zip(actual)
            .map(|(&p, &a)| ((p - a) as f64).powi(2)),
    )
}

pub fn mae(predicted: &[f32], actual: &[f32]) -> MetricResult {
    mean(
        predicted
            .iter()
            .zip(actual)
            .map(|(&p, &a)| ((p - a) as f64).abs()),
    )
}

fn mean(values: impl Iterator<Item = f64>) -> MetricResult {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        Err(EMPTY)
    } else {
        Ok(sum / n as f64)
    }
}

pub fn pearson(a: &[f32], b: &[f32]) -> MetricResult {
    let n = a.len();
    if n < 2 {
        return Err(Undefined("fewer than two samples"));
    }
    let ma = a.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let mb = b.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 || sbb == 0.0 {
        return Err(Undefined("zero variance"));
    }
    Ok(sab / (saa * sbb).sqrt())
}

/// Ranks from 1, ties sharing their average rank.
fn ranks(values: &[f32]) -> Vec<f32> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0f32; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f32 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    ranks
}

pub fn spearman(a: &[f32], b: &[f32]) -> MetricResult {
    pearson(&ranks(a), &ranks(b))
}

/// AUROC of `score` for the label "actual above its median" (strict): a higher score means a
/// higher predicted loss; tied scores count ½.
pub fn auroc_above_median(score: &[f32], actual: &[f32]) -> MetricResult {
    if actual.is_empty() {
        return Err(EMPTY);
    }
    let mut sorted = actual.to_vec();
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    let labels: Vec<bool> = actual.iter().map(|&a| a > median).collect();
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = n - positives;
    if positives == 0 || negatives == 0 {
        return Err(Undefined("one class is empty"));
    }
    // Mann–Whitney U from average ranks handles ties as ½.
    let r = ranks(score);
    let rank_sum: f64 = r
        .iter()
        .zip(&labels)
        .filter(|(_, l)| **l)
        .map(|(&r, _)| r as f64)
        .sum();
    let p = positives as f64;
    Ok((rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: MetricResult, b: f64) {
        let a = a.unwrap();
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }

    #[test]
    fn token_ece_of_a_calibrated_predictor_is_zero_and_of_an_overconfident_one_is_the_gap() {
        // 10 tokens at 0.8 confidence, 8 right: calibrated.
        let p = vec![0.8; 10];
        let c: Vec<f32> = (0..10).map(|i| if i < 8 { 1.0 } else { 0.0 }).collect();
        close(token_ece(&p, &c), 0.0);
        // Always 0.9 sure, right half the time: ECE 0.4.
        let c: Vec<f32> = (0..10).map(|i| (i % 2) as f32).collect();
        close(token_ece(&[0.9; 10], &c), 0.4);
        // Two bins, weighted by count: 0.2 → right 0 of 2 (gap .2), 1.0 → right 2 of 2.
        close(token_ece(&[0.2, 0.2, 1.0, 1.0], &[0.0, 0.0, 1.0, 1.0]), 0.1);
        // An edge value goes to the bin below: 1/15 exactly lies in bin 0.
        close(token_ece(&[1.0 / 15.0], &[0.0]), 1.0 / 15.0);
        assert!(token_ece(&[], &[]).is_err());
    }

    #[test]
    fn loss_ece_sorts_by_prediction_into_equal_mass_bins() {
        let predicted: Vec<f32> = (0..30).map(|i| i as f32).collect();
        // Perfectly calibrated on average in every bin.
        let (ece, bins) = loss_calibration(&predicted, &predicted);
        close(ece, 0.0);
        assert_eq!(bins.len(), 15);
        assert!(bins.iter().all(|b| b.count == 2));
        assert_eq!(bins[0].mean_predicted, 0.5);
        // A constant offset of 1 nat gives ECE 1.
        let actual: Vec<f32> = predicted.iter().map(|p| p + 1.0).collect();
        close(loss_calibration(&predicted, &actual).0, 1.0);
        // Fewer samples than bins: one per bin.
        let (ece, bins) = loss_calibration(&[1.0, 3.0], &[2.0, 3.0]);
        assert_eq!(bins.len(), 2);
        close(ece, 0.5);
        // 31 samples: near-equal sizes that add up.
        let (_, bins) = loss_calibration(&[0.0; 31], &[0.0; 31]);
        assert_eq!(bins.iter().map(|b| b.count).sum::<usize>(), 31);
        assert!(bins.iter().all(|b| b.count == 2 || b.count == 3));
    }

    #[test]
    fn correlations_of_perfect_inverted_and_constant_predictors() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        close(pearson(&a, &[2.0, 4.0, 6.0, 8.0, 10.0]), 1.0);
        close(pearson(&a, &[5.0, 4.0, 3.0, 2.0, 1.0]), -1.0);
        // Monotone but not linear: Spearman 1, Pearson below 1.
        let cubed = a.map(|x: f32| x.powi(3));
        close(spearman(&a, &cubed), 1.0);
        assert!(pearson(&a, &cubed).unwrap() < 0.99);
        assert_eq!(pearson(&a, &[3.0; 5]), Err(Undefined("zero variance")));
        assert_eq!(spearman(&[1.0; 5], &a), Err(Undefined("zero variance")));
        // Ties share average ranks.
        assert_eq!(ranks(&[10.0, 20.0, 10.0, 30.0]), vec![1.5, 3.0, 1.5, 4.0]);
    }

    #[test]
    fn auroc_of_perfect_inverted_constant_and_tied_predictors() {
        let actual = [1.0, 2.0, 3.0, 4.0];
        close(auroc_above_median(&[0.1, 0.2, 0.3, 0.4], &actual), 1.0);
        close(auroc_above_median(&[0.4, 0.3, 0.2, 0.1], &actual), 0.0);
        close(auroc_above_median(&[7.0; 4], &actual), 0.5);
        // One positive tied with one negative: (1 + 1 + ½ + 1) / 4 pairs... computed exactly:
        // positives {3, 4} score {0.5, 0.9}; negatives {1, 2} score {0.1, 0.5}.
        close(auroc_above_median(&[0.1, 0.5, 0.5, 0.9], &actual), 0.875);
        // Labels are strictly above the median: all equal actuals leave no positive.
        assert_eq!(
            auroc_above_median(&[1.0, 2.0], &[3.0, 3.0]),
            Err(Undefined("one class is empty"))
        );
    }

    #[test]
    fn mse_and_mae_on_known_errors() {
        close(mse(&[1.0, 2.0], &[2.0, 4.0]), 2.5);
        close(mae(&[1.0, 2.0], &[2.0, 4.0]), 1.5);
        assert!(mse(&[], &[]).is_err());
    }
}
