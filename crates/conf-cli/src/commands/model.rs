//! `lookahead model`: both architectures of a preset with their parameter counts.

use anyhow::anyhow;
use conf_model::{ConfidenceGptConfig, GptConfig, ParameterMatch};
use serde::Serialize;

use crate::Failure;
use crate::cli::ModelArgs;
use crate::presets::preset;

#[derive(Debug, Serialize)]
struct ModelSummary {
    preset: String,
    confidence: ConfidenceGptConfig,
    standard: GptConfig,
    parameter_counts: ParameterMatch,
}

pub fn run(args: ModelArgs) -> Result<(), Failure> {
    let preset = preset(&args.preset).map_err(|e| Failure::BadInput(anyhow!("--{e}")))?;
    let vocab_size = match args.vocab_size {
        Some(0) => {
            return Err(Failure::BadInput(anyhow!(
                "--vocab-size must be at least 1"
            )));
        }
        Some(v) => v,
        None => super::load(&args.corpus)?.vocab_size(),
    };
    let confidence = preset
        .model(vocab_size)
        .with_conf_head(args.conf_head)
        .with_confidence_init_bias(args.confidence_init_bias);
    confidence
        .gpt
        .validate()
        .map_err(|e| Failure::BadInput(e.into()))?;
    let matched = confidence.matched_standard();
    let summary = ModelSummary {
        preset: args.preset.clone(),
        standard: matched.standard.clone(),
        confidence,
        parameter_counts: matched,
    };
    if args.json {
        return super::print_json(&summary);
    }
    // Printing the modules needs a device; the first backend of this build does.
    let device = crate::backend::device(crate::backend::BackendChoice::default_compiled(), None)?;
    let standard = summary.standard.init_minigpt(&device);
    let confidence = summary.confidence.init(&device);
    let counts = &summary.parameter_counts;
    println!(
        "== MiniGPT (standard, MLP width {}) ==",
        summary.standard.mlp_hidden
    );
    println!("{standard}");
    println!(
        "== ConfidenceAwareGPT ({:?} head, MLP width {}) ==",
        summary.confidence.conf_head, summary.confidence.gpt.mlp_hidden
    );
    println!("{confidence}");
    println!(
        "parameters  standard {}  confidence {}",
        counts.standard_params, counts.confidence_params
    );
    println!(
        "relative gap {:.4}% (|standard - confidence| / confidence)",
        counts.relative_gap * 100.0
    );
    Ok(())
}
