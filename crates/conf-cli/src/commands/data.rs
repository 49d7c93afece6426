//! `lookahead data`: prepare a corpus and describe it.

use conf_data::{EvalWindows, Split};
use serde::Serialize;

use crate::Failure;
use crate::cli::DataArgs;

#[derive(Debug, Serialize)]
struct DataSummary {
    dataset: String,
    tokenizer: String,
    vocab_size: usize,
    tokens: usize,
    train_tokens: usize,
    val_tokens: usize,
    seq_len: usize,
    eval_windows: usize,
    /// Mean loss of the exact source on the evaluation windows, as a model with context L sees
    /// them (synthetic corpus only).
    entropy_floor: Option<f64>,
    sample: String,
}

pub fn run(args: DataArgs) -> Result<(), Failure> {
    let corpus = super::load(&args.corpus)?;
    let split = Split::contiguous(&corpus, args.val_fraction, args.seq_len)
        .map_err(|e| Failure::BadInput(e.into()))?;
    let eval = EvalWindows::new(corpus.tokens.clone(), split.val.clone(), args.seq_len, None);
    let entropy_floor = corpus.oracle.as_ref().map(|o| o.entropy_floor(&eval));
    let sample_len = corpus.len().min(80);
    let summary = DataSummary {
        dataset: corpus.source.clone(),
        tokenizer: corpus.tokenizer.kind().to_string(),
        vocab_size: corpus.vocab_size(),
        tokens: corpus.len(),
        train_tokens: split.train.len(),
        val_tokens: split.val.len(),
        seq_len: args.seq_len,
        eval_windows: eval.starts().len(),
        entropy_floor,
        sample: corpus
            .tokenizer
            .build()
            .decode(&corpus.tokens.slice(0..sample_len)),
    };
    if args.json {
        return super::print_json(&summary);
    }
    println!("dataset        {}", summary.dataset);
    println!(
        "tokenizer      {} (vocab {})",
        summary.tokenizer, summary.vocab_size
    );
    println!("tokens         {}", summary.tokens);
    println!(
        "split          train {} / validation {} (last {:.0}%)",
        summary.train_tokens,
        summary.val_tokens,
        args.val_fraction * 100.0
    );
    println!(
        "windows        {} tokens each (L = {}), {} evaluation windows",
        args.seq_len + 2,
        args.seq_len,
        summary.eval_windows
    );
    if let Some(floor) = summary.entropy_floor {
        println!("entropy floor  {floor:.4} nats/token (exact source, context L)");
    }
    println!("sample         {:?}", summary.sample);
    Ok(())
}
