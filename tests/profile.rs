//! The bench's profile (`lookahead bench --profile DIR`): each objective's steps under
//! libtorch's profiler, written as a Chrome trace and summarised. Runs in builds with the tch
//! backends (`cargo xtask test --backend tch-cpu`) on libtorch's CPU; on a GPU the same code
//! records the kernels too (bench/gpu-check.sh).
#![cfg(feature = "tch")]

use conf_cli::backend::{BackendChoice, device};
use conf_data::{CorpusRequest, Split, load_corpus};
use conf_model::{ConfidenceGptConfig, GptConfig, Precision};
use conf_train::bench::{BenchSettings, time_objectives};
use conf_train::optim::{OptimizerSettings, named_params};
use conf_train::profile::ProfileRequest;
use conf_train::trainee::ObjectiveTrainee;
use conf_train::training::Execution;
use conf_train::{ConfInput, ConfidenceSettings, ObjectiveKind};

const SEQ: usize = 16;
const STEPS: usize = 2;

/// Every AdamW update is one fused kernel per parameter: in the trace, one
/// `aten::_fused_adamw_` per parameter tensor and step, for each objective in turn.
#[test]
fn each_objective_is_profiled_into_its_own_trace_with_one_fused_adamw_per_parameter_and_step() {
    let device = device(BackendChoice::TchCpu, None).unwrap();
    let corpus = load_corpus(&CorpusRequest::new("synthetic", std::env::temp_dir())).unwrap();
    let split = Split::contiguous(&corpus, 0.1, SEQ).unwrap();
    let model = ConfidenceGptConfig::new(GptConfig::new(corpus.vocab_size(), SEQ, 16, 2, 2, 64));
    let confidence = ConfidenceSettings {
        alpha: 1.0,
        conf_input: ConfInput::SelfConditioned,
    };
    let dir = tempfile::tempdir().unwrap();
    let settings = BenchSettings {
        warmup_steps: 1,
        timed_steps: 1,
        batch_size: 4,
        seq_len: SEQ,
        seed: 7,
        optimizer: OptimizerSettings {
            learning_rate: 1e-3,
            min_learning_rate: 1e-3,
            warmup_steps: 0,
            weight_decay: 0.1,
            grad_clip: 1.0,
        },
        execution: Execution::default(),
        precision: Precision::F32,
        turn_steps: 1,
        profile: Some(ProfileRequest {
            dir: dir.path().to_path_buf(),
            steps: STEPS,
        }),
    };
    let objectives = [ObjectiveKind::Standard, ObjectiveKind::Seed];
    let timings = time_objectives(
        &objectives,
        &model,
        confidence,
        &corpus,
        &split,
        &settings,
        &device,
    );
    for (objective, timed) in objectives.into_iter().zip(timings) {
        let tensors = match ObjectiveTrainee::new(
            objective,
            &model,
            Precision::F32,
            confidence,
            1.0,
            &device,
        ) {
            ObjectiveTrainee::Standard(t) => named_params(&t.model).len(),
            ObjectiveTrainee::Confidence(t) => named_params(&t.model).len(),
        };
        let profile = timed.profile.expect("profiled");
        assert_eq!(
            profile.trace,
            dir.path().join(format!("{}.trace.json", objective.name()))
        );
        let trace: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&profile.trace).unwrap()).unwrap();
        let adamw = trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ph"] == "X" && e["name"] == "aten::_fused_adamw_")
            .count();
        assert_eq!(adamw, STEPS * tensors, "{objective:?}: {tensors} tensors");
        assert_eq!(profile.steps, STEPS);
        assert!(profile.host_operations > tensors as f64, "{profile:?}");
        assert!(profile.wall_ms > 0.0);
        assert_eq!(profile.gpu_kernels, 0.0, "libtorch's CPU runs no kernels");
        assert_eq!(profile.kernel_launches, 0.0);
        let rows = &profile.top_host_operations;
        assert!(!rows.is_empty() && rows.len() <= 15);
        assert!(rows.windows(2).all(|w| w[0].ms >= w[1].ms), "{rows:?}");
    }
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["seed.trace.json", "standard.trace.json"],
        "no partial trace left"
    );
}
