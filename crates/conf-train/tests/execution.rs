//! How steps execute changes memory and time, not results: gradient checkpointing gives the
//! same gradients, a step's batch split across data-parallel workers trains the weights one
//! device trains, and objectives timed in turns train as each would alone.

use std::sync::Mutex;

use burn::data::dataloader::DataLoader;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::{GradientCheckpointingStrategy, Gradients};
use conf_data::{CorpusRequest, Split, TrainWindows, load_corpus};
use conf_model::init::Perturb;
use conf_model::{ConfidenceGptConfig, GptConfig, Precision};
use conf_train::bench::{BenchSettings, time_objectives};
use conf_train::loader::{StepLoader, TrainBatches};
use conf_train::optim::{OptimizerSettings, named_params};
use conf_train::stop::StopRequest;
use conf_train::trainee::Trainee;
use conf_train::training::{Execution, TrainingSettings, fit};
use conf_train::{
    ConfInput, ConfidenceSettings, DenseObjective, LookaheadBatch, LookaheadBatcher, Objective,
    ObjectiveKind,
};

const SEQ: usize = 16;

/// The CPU device's generator is one per process: tests that seed it take turns.
static SEEDED: Mutex<()> = Mutex::new(());

/// Every float parameter's gradient, flattened, in visiting order.
fn gradients<M: Module>(model: &M, grads: &Gradients) -> Vec<Vec<f32>> {
    struct Collect<'a>(&'a Gradients, Vec<Vec<f32>>);
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let grad = param
                .val()
                .grad(self.0)
                .expect("every parameter has a gradient");
            self.1
                .push(grad.into_data().try_into_vec_as::<f32>().unwrap());
        }
    }
    let mut collect = Collect(grads, Vec::new());
    model.visit(&mut collect);
    collect.1
}

fn settings(dir: &std::path::Path, execution: Execution) -> TrainingSettings {
    TrainingSettings {
        training_steps: 6,
        eval_interval: 3,
        batch_size: 8,
        seq_len: SEQ,
        eval_windows: Some(8),
        seed: 7,
        optimizer: OptimizerSettings {
            learning_rate: 1e-3,
            min_learning_rate: 1e-4,
            warmup_steps: 2,
            weight_decay: 0.1,
            grad_clip: 1.0,
        },
        artifact_dir: dir.to_path_buf(),
        no_tui: true,
        save_interval: 100,
        resume: false,
        execution,
    }
}

fn dense() -> DenseObjective {
    DenseObjective(ConfidenceSettings {
        alpha: 1.0,
        conf_input: ConfInput::SelfConditioned,
    })
}

fn values<M: Module>(model: &M) -> Vec<(String, Vec<f32>)> {
    named_params(model)
        .into_iter()
        .map(|p| {
            (
                p.path,
                p.values.into_data().try_into_vec_as::<f32>().unwrap(),
            )
        })
        .collect()
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let _turn = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let corpus = load_corpus(&CorpusRequest::new("synthetic", std::env::temp_dir())).unwrap();
    let gpt = GptConfig::new(corpus.vocab_size(), SEQ, 32, 2, 4, 128);
    let windows = TrainWindows::new(corpus.tokens.clone(), 0..4096, SEQ, 3, 4);
    let items: Vec<_> = (0..4).map(|i| windows.get(i).unwrap()).collect();
    let run = |checkpointing: bool| {
        let execution = Execution {
            gradient_checkpointing: checkpointing,
            devices: Vec::new(),
        };
        let device = execution.training_device(&Device::flex());
        let expected = if checkpointing {
            GradientCheckpointingStrategy::Balanced
        } else {
            GradientCheckpointingStrategy::Disabled
        };
        assert_eq!(device.gradient_checkpointing_strategy(), Some(expected));
        device.seed(5);
        // Perturbed, so that the zero-initialised modulation takes part.
        let model = ConfidenceGptConfig::new(gpt.clone())
            .init(&device)
            .map(&mut Perturb { std: 0.05 });
        let batch = LookaheadBatcher { seed: 1 }.batch(items.clone(), &device);
        let grads = dense().compute(&model, batch).total.backward();
        gradients(&model, &grads)
    };
    let plain = run(false);
    let checkpointed = run(true);
    assert_eq!(plain.len(), checkpointed.len());
    // On flex the checkpointed run takes Burn's plain operations and the other the fused
    // kernels, which round differently. Gradients that are zero up to rounding (attention's key
    // bias) are held to a floor at a thousandth of the largest.
    let largest = plain
        .iter()
        .flat_map(|p| p.iter().map(|x| x.abs()))
        .fold(0.0f32, f32::max);
    for (i, (a, b)) in plain.iter().zip(&checkpointed).enumerate() {
        let gap = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        let scale = a.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
        assert!(scale > 0.0, "parameter {i} has a zero gradient");
        assert!(
            gap <= 1e-5 * scale.max(1e-3 * largest),
            "parameter {i}: {gap} of {scale} (largest {largest})"
        );
    }
}

#[test]
fn two_data_parallel_workers_train_the_weights_one_device_trains() {
    let _turn = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let corpus = load_corpus(&CorpusRequest::new("synthetic", std::env::temp_dir())).unwrap();
    let split = Split::contiguous(&corpus, 0.1, SEQ).unwrap();
    let gpt = GptConfig::new(corpus.vocab_size(), SEQ, 32, 2, 4, 128);
    let train = |devices: Vec<Device>| {
        let dir = tempfile::tempdir().unwrap();
        let run = settings(
            dir.path(),
            Execution {
                gradient_checkpointing: false,
                devices,
            },
        );
        let device = run.execution.training_device(&Device::flex());
        device.seed(42);
        let trainee = Trainee::new(
            ConfidenceGptConfig::new(gpt.clone()).init(&device),
            dense(),
            1.0,
        );
        let trained = fit(trainee, &corpus, &split, &run, &StopRequest::default()).unwrap();
        let history: Vec<f64> = trained
            .report
            .history
            .iter()
            .map(|r| r.valid[&conf_train::metrics::MetricKind::LmLoss])
            .collect();
        (
            values(&trained.model.model),
            history,
            trained.report.steps_trained,
        )
    };
    let (one, one_history, one_steps) = train(Vec::new());
    let (two, two_history, two_steps) = train(vec![Device::flex(), Device::flex()]);
    assert_eq!((one_steps, two_steps), (6, 6), "the same optimizer steps");
    for (a, b) in one_history.iter().zip(&two_history) {
        assert!((a - b).abs() < 1e-4, "evaluation loss {a} vs {b}");
    }
    let mut largest = 0.0f32;
    for ((path, a), (_, b)) in one.iter().zip(&two) {
        let gap = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        largest = largest.max(gap);
        assert!(gap < 1e-5, "{path} differs by {gap}");
    }
    eprintln!("largest weight difference after 6 steps: {largest:e}");
}

#[test]
fn each_worker_takes_its_part_of_every_step_and_the_parts_make_the_batch() {
    let corpus = load_corpus(&CorpusRequest::new("synthetic", std::env::temp_dir())).unwrap();
    let split = Split::contiguous(&corpus, 0.1, SEQ).unwrap();
    let device = Device::flex();
    let batches = TrainBatches::new(&corpus, &split, SEQ, 6, 4, 9, device.clone());
    let tokens = |b: LookaheadBatch| b.tokens.into_data().try_into_vec_as::<i64>().unwrap();
    let whole: Vec<Vec<i64>> = (0..4).map(|s| tokens(batches.batch(s).unwrap())).collect();
    // Two epochs of two steps, as burn-train's multi-device strategy splits it for 3 devices.
    let loader = StepLoader::new(batches, 2, 4).split_into(3);
    let n = loader.num_items();
    let parts: Vec<_> = (0..3)
        .map(|i| loader.slice(i * n / 3, (i + 1) * n / 3))
        .collect();
    for epoch in 0..2 {
        let mut iterators: Vec<_> = parts.iter().map(|p| p.iter()).collect();
        for (step, expected) in whole.iter().enumerate().skip(2 * epoch).take(2) {
            let joined: Vec<i64> = iterators
                .iter_mut()
                .flat_map(|it| tokens(it.next().unwrap().unwrap()))
                .collect();
            assert_eq!(&joined, expected, "step {step}");
        }
        assert!(iterators.iter_mut().all(|it| it.next().is_none()));
    }
}

/// The bench's objectives take turns at the device; each trains as it would alone: the same
/// losses, and only the steps asked for are timed.
#[test]
fn objectives_timed_in_turns_train_as_each_would_alone() {
    let _turn = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let corpus = load_corpus(&CorpusRequest::new("synthetic", std::env::temp_dir())).unwrap();
    let split = Split::contiguous(&corpus, 0.1, SEQ).unwrap();
    let model = ConfidenceGptConfig::new(GptConfig::new(corpus.vocab_size(), SEQ, 16, 1, 2, 64));
    let settings = |turn_steps| BenchSettings {
        warmup_steps: 1,
        timed_steps: 5,
        batch_size: 4,
        seq_len: SEQ,
        seed: 7,
        optimizer: OptimizerSettings {
            learning_rate: 1e-2,
            min_learning_rate: 1e-2,
            warmup_steps: 0,
            weight_decay: 0.1,
            grad_clip: 1.0,
        },
        execution: Execution::default(),
        precision: Precision::F32,
        turn_steps,
        profile: None,
    };
    let confidence = ConfidenceSettings {
        alpha: 1.0,
        conf_input: ConfInput::SelfConditioned,
    };
    let time = |objectives: &[ObjectiveKind], turn_steps| {
        time_objectives(
            objectives,
            &model,
            confidence,
            &corpus,
            &split,
            &settings(turn_steps),
            &Device::flex(),
        )
    };
    let together = time(&[ObjectiveKind::Standard, ObjectiveKind::Dense], 2);
    let standard = time(&[ObjectiveKind::Standard], 5);
    let dense = time(&[ObjectiveKind::Dense], 5);
    for (turns, alone) in together.iter().zip([&standard[0], &dense[0]]) {
        assert_eq!(turns.timing.timed_steps, 5);
        assert_eq!(turns.parameters, alone.parameters);
        assert_eq!(
            turns.timing.last_lm_loss, alone.timing.last_lm_loss,
            "the fifth timed step's loss"
        );
        assert!(turns.timing.ms_per_step > 0.0);
    }
    assert_ne!(
        together[0].timing.last_lm_loss, together[1].timing.last_lm_loss,
        "two models"
    );
}
