//! The built-in corpus: a seeded hidden-Markov source whose states mix near-deterministic and
//! high-entropy emissions, so difficulty varies token to token. Because the source is known,
//! the forward algorithm gives the exact Bayes-optimal next-token distribution everywhere: the
//! entropy floor that no model can beat, and the oracle expected loss per position.

use burn::data::dataset::Dataset;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::windows::EvalWindows;

/// Symbols the source emits; id `i` is `ALPHABET[i]`, so samples print as text.
pub const ALPHABET: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Hidden states; the first half are near-deterministic, the second half high-entropy.
    pub states: usize,
    /// Emitted symbols (at most the 62 of `ALPHABET`).
    pub vocab: usize,
    /// Length of the generated corpus in tokens.
    pub tokens: usize,
    /// Seeds both the source's parameters and the generated sequence.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            states: 16,
            vocab: 32,
            tokens: 1 << 18,
            seed: 1234,
        }
    }
}

/// A fully specified hidden-Markov source.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenMarkovSource {
    config: SyntheticConfig,
    /// Stationary distribution of the chain; the sequence starts from it, so every window is
    /// statistically alike and the forward pass may restart from it at any window.
    initial: Vec<f64>,
    transition: Vec<Vec<f64>>, // [S][S], rows sum to 1
    emission: Vec<Vec<f64>>,   // [S][V], rows sum to 1
}

/// Probability a near-deterministic state puts on its signature symbol.
const SIGNATURE_PROB: f64 = 0.97;
/// Symbols a high-entropy state spreads its emissions over.
const NOISY_SUPPORT: usize = 10;
/// Each state has one dominant successor (so runs of states recur like words) and a few minor
/// ones; every other successor keeps a small floor so the chain is ergodic and the stationary
/// distribution unique.
const DOMINANT_WEIGHT: f64 = 8.0;
const MINOR_SUCCESSORS: usize = 2;
const TRANSITION_FLOOR: f64 = 1e-3;

impl HiddenMarkovSource {
    /// # Panics
    /// On a configuration outside `2 <= states`, `2 <= vocab <= 62`: callers validate user input.
    pub fn new(config: SyntheticConfig) -> Self {
        let SyntheticConfig { states, vocab, .. } = config;
        assert!(states >= 2 && (2..=ALPHABET.len()).contains(&vocab));
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);

        let deterministic = states / 2;
        let mut emission = vec![vec![0.0; vocab]; states];
        for (s, row) in emission.iter_mut().enumerate() {
            if s < deterministic {
                let signature = s % vocab;
                for (v, p) in row.iter_mut().enumerate() {
                    *p = if v == signature {
                        SIGNATURE_PROB
                    } else {
                        (1.0 - SIGNATURE_PROB) / (vocab - 1) as f64
                    };
                }
            } else {
                for _ in 0..NOISY_SUPPORT.min(vocab) {
                    let v = rng.random_range(0..vocab);
                    row[v] += rng.random_range(0.5..1.5);
                }
                normalise(row);
            }
        }

        let mut transition = vec![vec![TRANSITION_FLOOR; states]; states];
        for row in transition.iter_mut() {
            row[rng.random_range(0..states)] += DOMINANT_WEIGHT;
            for _ in 0..MINOR_SUCCESSORS {
                let next = rng.random_range(0..states);
                row[next] += rng.random_range(0.2..1.0);
            }
            normalise(row);
        }

        let initial = stationary(&transition);
        Self {
            config,
            initial,
            transition,
            emission,
        }
    }

    pub fn config(&self) -> &SyntheticConfig {
        &self.config
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab
    }

    /// The symbol of each id, in id order.
    pub fn vocabulary(&self) -> Vec<char> {
        ALPHABET.chars().take(self.config.vocab).collect()
    }

    /// Samples `config.tokens` symbols, starting from the stationary distribution.
    pub fn generate(&self) -> Vec<u32> {
        // A separate stream, so the sequence does not depend on how many draws the parameters took.
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(1);
        let mut state = draw(&self.initial, &mut rng);
        let mut tokens = Vec::with_capacity(self.config.tokens);
        for _ in 0..self.config.tokens {
            tokens.push(draw(&self.emission[state], &mut rng) as u32);
            state = draw(&self.transition[state], &mut rng);
        }
        tokens
    }

    /// Forward algorithm from the stationary prior: entry `t` is the exact distribution of
    /// `x_t` given `x_0..x_{t-1}`; there are `tokens.len() + 1` entries (the last one predicts the
    /// token after the sequence).
    pub fn predictive(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let states = self.config.states;
        let mut belief = self.initial.clone(); // P(state_t | x_<t)
        let mut out = Vec::with_capacity(tokens.len() + 1);
        for &token in tokens {
            out.push(self.next_token(&belief));
            let mut posterior: Vec<f64> = (0..states)
                .map(|s| belief[s] * self.emission[s][token as usize])
                .collect();
            normalise(&mut posterior);
            belief = (0..states)
                .map(|next| {
                    (0..states)
                        .map(|s| posterior[s] * self.transition[s][next])
                        .sum()
                })
                .collect();
        }
        out.push(self.next_token(&belief));
        out
    }

    /// `-ln p(x_t | x_<t)` of each token under the exact source, restarting from the stationary
    /// prior at `tokens[0]` (as a model with a context window starting there must).
    pub fn token_losses(&self, tokens: &[u32]) -> Vec<f64> {
        self.predictive(tokens)
            .iter()
            .zip(tokens)
            .map(|(dist, &x)| -dist[x as usize].ln())
            .collect()
    }

    /// The exact source's mean loss per token on `windows`, as a model with context L sees
    /// them: targets `w[1..=L]`, each predicted from the window's own prefix. No model with
    /// that context can do better on average.
    pub fn entropy_floor(&self, windows: &EvalWindows) -> f64 {
        let seq = windows.seq_len();
        let total: f64 = (0..windows.len())
            .filter_map(|i| windows.get(i).ok())
            .map(|w| {
                self.token_losses(&w.tokens[..=seq])[1..]
                    .iter()
                    .sum::<f64>()
            })
            .sum();
        total / (windows.len() * seq) as f64
    }

    fn next_token(&self, belief: &[f64]) -> Vec<f64> {
        let mut dist = vec![0.0; self.config.vocab];
        for (s, &b) in belief.iter().enumerate() {
            for (p, &e) in dist.iter_mut().zip(&self.emission[s]) {
                *p += b * e;
            }
        }
        dist
    }
}

/// Shannon entropy in nats.
pub fn entropy(dist: &[f64]) -> f64 {
    dist.iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -p * p.ln())
        .sum()
}

fn normalise(row: &mut [f64]) {
    let total: f64 = row.iter().sum();
    row.iter_mut().for_each(|p| *p /= total);
}

fn draw(dist: &[f64], rng: &mut ChaCha8Rng) -> usize {
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (i, &p) in dist.iter().enumerate() {
        acc += p;
        if u < acc {
            return i;
        }
    }
    dist.len() - 1
}

/// Power iteration; the transition floor makes the chain ergodic, so this converges.
fn stationary(transition: &[Vec<f64>]) -> Vec<f64> {
    let n = transition.len();
    let mut pi = vec![1.0 / n as f64; n];
    for _ in 0..10_000 {
        let next: Vec<f64> = (0..n)
            .map(|j| (0..n).map(|i| pi[i] * transition[i][j]).sum())
            .collect();
        let delta: f64 = next.iter().zip(&pi).map(|(a, b)| (a - b).abs()).sum();
        pi = next;
        if delta < 1e-15 {
            break;
        }
    }
    pi
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SyntheticConfig {
        SyntheticConfig {
            tokens: 20_000,
            ..SyntheticConfig::default()
        }
    }

    #[test]
    fn same_seed_same_corpus_other_seed_other_corpus() {
        let a = HiddenMarkovSource::new(small()).generate();
        let b = HiddenMarkovSource::new(small()).generate();
        let c = HiddenMarkovSource::new(SyntheticConfig { seed: 7, ..small() }).generate();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 20_000);
        assert!(a.iter().all(|&t| t < 32));
    }

    #[test]
    fn predictive_distributions_are_normalised() {
        let source = HiddenMarkovSource::new(small());
        let tokens = source.generate();
        let dists = source.predictive(&tokens[..500]);
        assert_eq!(dists.len(), 501);
        for d in &dists {
            assert!((d.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        }
    }

    #[test]
    fn exact_predictor_beats_the_unigram_model_and_matches_its_own_entropy() {
        let source = HiddenMarkovSource::new(small());
        let tokens = source.generate();
        let dists = source.predictive(&tokens);
        let n = tokens.len() as f64;
        let cross_entropy: f64 = source.token_losses(&tokens).iter().sum::<f64>() / n;
        // On data drawn from the source, the Bayes predictor's loss equals its mean predictive
        // entropy (up to sampling noise): the floor is self-consistent.
        let mean_entropy: f64 = dists[..tokens.len()]
            .iter()
            .map(|d| entropy(d))
            .sum::<f64>()
            / n;
        assert!(
            (cross_entropy - mean_entropy).abs() < 0.03,
            "{cross_entropy} vs {mean_entropy}"
        );

        let mut counts = vec![0.0; 32];
        tokens.iter().for_each(|&t| counts[t as usize] += 1.0);
        let unigram: f64 = tokens
            .iter()
            .map(|&t| -(counts[t as usize] / n).ln())
            .sum::<f64>()
            / n;
        assert!(
            cross_entropy < unigram - 0.3,
            "{cross_entropy} vs unigram {unigram}"
        );
        // Difficulty varies: some positions are nearly certain, others close to uniform.
        let entropies: Vec<f64> = dists.iter().map(|d| entropy(d)).collect();
        let lo = entropies.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = entropies.iter().cloned().fold(0.0, f64::max);
        eprintln!("floor {cross_entropy:.3} unigram {unigram:.3} entropy range {lo:.3}..{hi:.3}");
        assert!(lo < 0.8 && hi > 2.0, "entropy range {lo}..{hi}");
    }

    #[test]
    fn stationary_prior_is_invariant() {
        let source = HiddenMarkovSource::new(small());
        let n = source.initial.len();
        for j in 0..n {
            let next: f64 = (0..n)
                .map(|i| source.initial[i] * source.transition[i][j])
                .sum();
            assert!((next - source.initial[j]).abs() < 1e-12);
        }
    }
}
