//! Training through the Learner: learning, metrics, a diverging run, exact resume.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::prelude::*;
use conf_data::{Corpus, CorpusRequest, EvalWindows, Split, load_corpus};
use conf_model::{ConfidenceAwareGpt, ConfidenceGptConfig, GptConfig};
use conf_train::history::EvalRecord;
use conf_train::metrics::{MetricKind, MetricValues};
use conf_train::optim::{OptimizerSettings, warmup_cosine};
use conf_train::stop::{RunStatus, StopReason, StopRequest};
use conf_train::trainee::Trainee;
use conf_train::training::{TrainingSettings, fit};
use conf_train::{
    ConfInput, ConfidenceSettings, DenseObjective, LookaheadBatch, LookaheadBatcher, Objective,
    ObjectiveOutput, StandardObjective,
};

const SEQ: usize = 32;

fn settings(dir: &std::path::Path, steps: usize, eval_interval: usize) -> TrainingSettings {
    TrainingSettings {
        training_steps: steps,
        eval_interval,
        batch_size: 16,
        seq_len: SEQ,
        eval_windows: Some(32),
        seed: 42,
        optimizer: OptimizerSettings {
            learning_rate: 3e-3,
            min_learning_rate: 3e-4,
            warmup_steps: 10,
            weight_decay: 0.1,
            grad_clip: 1.0,
        },
        artifact_dir: dir.to_path_buf(),
        no_tui: true,
        save_interval: 20,
        resume: false,
        execution: Default::default(),
    }
}

fn corpus() -> (Corpus, Split) {
    let corpus = load_corpus(&CorpusRequest::new("synthetic", std::env::temp_dir())).unwrap();
    let split = Split::contiguous(&corpus, 0.1, SEQ).unwrap();
    (corpus, split)
}

fn gpt(vocab: usize) -> GptConfig {
    GptConfig::new(vocab, SEQ, 32, 2, 4, 128)
}

#[test]
fn the_standard_model_closes_a_third_of_the_gap_to_the_entropy_floor() {
    let dir = tempfile::tempdir().unwrap();
    let (corpus, split) = corpus();
    let oracle = corpus.oracle.clone().unwrap();
    let run = settings(dir.path(), 120, 40);
    let device = Device::flex().autodiff();
    device.seed(42);
    let trainee = Trainee::new(
        gpt(corpus.vocab_size()).init_minigpt(&device),
        StandardObjective,
        1.0,
    );

    // Loss before training and the exact source's floor, on the evaluation windows.
    let eval = EvalWindows::new(corpus.tokens.clone(), split.val.clone(), SEQ, Some(32));
    let items: Vec<_> = (0..eval.len()).map(|i| eval.get(i).unwrap()).collect();
    let floor = items
        .iter()
        .map(|w| {
            oracle.token_losses(&w.tokens[..SEQ + 1])[1..]
                .iter()
                .sum::<f64>()
        })
        .sum::<f64>()
        / (items.len() * SEQ) as f64;
    let batch = LookaheadBatcher { seed: 42 }.batch(items, &Device::flex());
    let initial = StandardObjective
        .compute(&trainee.model.valid(), batch)
        .lm_loss
        .into_scalar::<f64>();

    let trained = fit(trainee, &corpus, &split, &run, &StopRequest::default()).unwrap();
    let history = &trained.report.history;
    assert_eq!(
        history.iter().map(|r| r.step).collect::<Vec<_>>(),
        vec![40, 80, 120]
    );
    let last = history.last().unwrap().valid[&MetricKind::LmLoss];
    eprintln!("initial {initial:.3} final {last:.3} floor {floor:.3}");
    assert!(
        initial - last >= 0.3 * (initial - floor),
        "{initial} → {last}, floor {floor}"
    );
    // The learning rate recorded at each evaluation is that of the schedule's step.
    let mut schedule = warmup_cosine(&run.optimizer, run.training_steps).unwrap();
    let lrs: Vec<f64> = (0..run.training_steps)
        .map(|_| schedule.step().base())
        .collect();
    for record in history {
        assert_eq!(record.lr, lrs[record.step - 1], "step {}", record.step);
    }
    let ppl = history.last().unwrap().valid[&MetricKind::Perplexity];
    assert!((ppl - last.exp()).abs() < 1e-6 * ppl);
    for record in history {
        for kind in MetricKind::STANDARD {
            assert!(
                record.valid[&kind].is_finite(),
                "{} at {}",
                kind.name(),
                record.step
            );
        }
    }
    assert!(trained.report.tokens_per_second > 0.0);
}

#[test]
fn the_confidence_model_trains_with_the_dense_objective_and_reports_calibration() {
    let dir = tempfile::tempdir().unwrap();
    let (corpus, split) = corpus();
    let run = settings(dir.path(), 50, 25);
    let device = Device::flex().autodiff();
    device.seed(42);
    let trainee = Trainee::new(
        ConfidenceGptConfig::new(gpt(corpus.vocab_size())).init(&device),
        DenseObjective(ConfidenceSettings {
            alpha: 1.0,
            conf_input: ConfInput::SelfConditioned,
        }),
        1.0,
    );
    let trained = fit(trainee, &corpus, &split, &run, &StopRequest::default()).unwrap();
    let history = &trained.report.history;
    assert_eq!(history.len(), 2);
    let first = &history[0].valid;
    let last = &history[1].valid;
    for kind in &MetricKind::ALL {
        assert!(last.contains_key(kind), "{} missing: {last:?}", kind.name());
    }
    assert!(last[&MetricKind::LmLoss] < first[&MetricKind::LmLoss]);
    for record in history {
        let v = &record.valid;
        for kind in [MetricKind::Auroc, MetricKind::EntropyAuroc] {
            assert!((0.0..=1.0).contains(&v[&kind]));
        }
        for kind in [
            MetricKind::Pearson,
            MetricKind::Spearman,
            MetricKind::EntropySpearman,
        ] {
            assert!((-1.0..=1.0).contains(&v[&kind]));
        }
        // total = lm + alpha · conf with alpha = 1; the batches are equal in size, so the
        // epoch means add up exactly.
        let parts = v[&MetricKind::LmLoss] + v[&MetricKind::ConfidenceLoss];
        assert!((v[&MetricKind::TotalLoss] - parts).abs() < 1e-4, "{v:?}");
    }
}

/// What a [`Scripted`] objective does from its `from`-th call (counted from 0) on.
#[derive(Debug)]
enum Fault {
    /// The total loss turns to NaN.
    NanLoss,
    /// A stop is requested (as SIGINT would), before the step is computed.
    Stop(StopRequest),
}

/// Dense, with a fault from a given call on.
#[derive(Debug)]
struct Scripted {
    inner: DenseObjective,
    from: usize,
    fault: Fault,
    calls: std::sync::atomic::AtomicUsize,
}

impl Scripted {
    fn new(from: usize, fault: Fault) -> Arc<Self> {
        Arc::new(Self {
            inner: dense(),
            from,
            fault,
            calls: Default::default(),
        })
    }
}

impl Objective<ConfidenceAwareGpt> for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn metrics(&self) -> &'static [MetricKind] {
        self.inner.metrics()
    }

    fn extra_forward_passes(&self, seq_len: usize) -> f64 {
        self.inner.extra_forward_passes(seq_len)
    }

    fn compute(&self, model: &ConfidenceAwareGpt, batch: LookaheadBatch) -> ObjectiveOutput {
        let faulty = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= self.from;
        if let (true, Fault::Stop(stop)) = (faulty, &self.fault) {
            stop.request(StopReason::Signal(2));
        }
        let mut out = self.inner.compute(model, batch);
        if let (true, Fault::NanLoss) = (faulty, &self.fault) {
            out.total = out.total * f64::NAN;
        }
        out
    }
}

fn dense() -> DenseObjective {
    DenseObjective(ConfidenceSettings {
        alpha: 1.0,
        conf_input: ConfInput::SelfConditioned,
    })
}

#[test]
fn a_non_finite_loss_stops_the_run_naming_the_step_and_the_loss_parts() {
    let dir = tempfile::tempdir().unwrap();
    let (corpus, split) = corpus();
    let run = settings(dir.path(), 40, 10);
    let device = Device::flex().autodiff();
    let trainee = Trainee::new(
        ConfidenceGptConfig::new(gpt(corpus.vocab_size())).init(&device),
        Scripted::new(5, Fault::NanLoss),
        1.0,
    );
    let err = match fit(trainee, &corpus, &split, &run, &StopRequest::default()) {
        Ok(_) => panic!("a NaN loss must stop the run"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("non-finite loss at step 6"), "{err}");
    assert!(
        err.contains("Total Loss = NaN")
            && err.contains("LM Loss")
            && err.contains("Confidence MSE"),
        "{err}"
    );
}

fn params(model: &conf_model::ConfidenceAwareGpt) -> Vec<f32> {
    let mut all = Vec::new();
    for t in [
        model.tok_emb.weight.val(),
        model.blocks[1].mlp.fc.weight.val(),
    ] {
        all.extend(t.into_data().try_into_vec_as::<f32>().unwrap());
    }
    all.extend(
        model
            .confidence_predictor
            .weight
            .val()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap(),
    );
    all
}

#[test]
fn a_run_that_diverges_keeps_its_last_good_checkpoint_and_resumes_exactly() {
    let (corpus, split) = corpus();
    let dense = dense();
    let device = Device::flex().autodiff();
    // One initial model for all three runs: tests share the process-wide generator, so
    // re-seeding it would not guarantee equal initialisations.
    let initial = ConfidenceGptConfig::new(gpt(corpus.vocab_size())).init(&device);
    let fresh = |_: &Device| initial.clone();

    // The reference: 60 steps in one go.
    let reference_dir = tempfile::tempdir().unwrap();
    let run = settings(reference_dir.path(), 60, 20);
    let reference = fit(
        Trainee::new(fresh(&device), dense, 1.0),
        &corpus,
        &split,
        &run,
        &StopRequest::default(),
    )
    .unwrap();
    assert_eq!(reference.checkpoint_step, Some(60));

    // The same run, but its loss turns NaN at step 41 (after 40 steps and two evaluations
    // of two batches each): it stops, naming the step and the checkpoint it keeps.
    let dir = tempfile::tempdir().unwrap();
    let run = settings(dir.path(), 60, 20);
    let diverging = Scripted::new(44, Fault::NanLoss);
    let err = match fit(
        Trainee::new(fresh(&device), diverging, 1.0),
        &corpus,
        &split,
        &run,
        &StopRequest::default(),
    ) {
        Ok(_) => panic!("must stop"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("step 41") && err.contains("step 40") && err.contains("checkpoints"),
        "{err}"
    );

    // Resumed with a healthy objective, it ends exactly where the reference did.
    let resume = TrainingSettings {
        resume: true,
        ..run
    };
    let resumed = fit(
        Trainee::new(fresh(&device), dense, 1.0),
        &corpus,
        &split,
        &resume,
        &StopRequest::default(),
    )
    .unwrap();
    let (a, b) = (params(&resumed.model.model), params(&reference.model.model));
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(
        max_diff == 0.0,
        "resumed weights differ from the reference by up to {max_diff}"
    );
    let steps = |h: &[EvalRecord]| h.iter().map(|r| r.step).collect::<Vec<_>>();
    assert_eq!(steps(&resumed.report.history), vec![20, 40, 60]);
    // Equal up to the last digit of the decimal text the history is stored in.
    let same = |a: &MetricValues, b: &MetricValues| {
        a.len() == b.len()
            && a.iter()
                .all(|(k, v)| (v - b[k]).abs() <= 1e-12 * v.abs().max(1.0))
    };
    for (a, b) in resumed.report.history.iter().zip(&reference.report.history) {
        assert!(same(&a.valid, &b.valid), "evaluation at step {}", a.step);
        assert_eq!(a.lr, b.lr, "learning rate at step {}", a.step);
    }
    assert!(same(
        &resumed.report.history[0].train,
        &reference.report.history[0].train
    ));
}

#[test]
fn a_stopped_run_saves_its_step_says_so_and_resumes_to_the_same_weights() {
    let (corpus, split) = corpus();
    let device = Device::flex().autodiff();
    let initial = ConfidenceGptConfig::new(gpt(corpus.vocab_size())).init(&device);
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = fit(
        Trainee::new(initial.clone(), dense(), 1.0),
        &corpus,
        &split,
        &settings(reference_dir.path(), 30, 10),
        &StopRequest::default(),
    )
    .unwrap();
    assert_eq!(reference.status, RunStatus::Complete);
    assert_eq!(reference.report.steps_trained, 30);

    // A stop at the 14th step: the step finishes, is saved, and the run reports what it
    // trained.
    let dir = tempfile::tempdir().unwrap();
    let run = settings(dir.path(), 30, 10);
    let stop = StopRequest::default();
    // The 16th call (from 0: 15) is the 14th step: 10 steps, 2 evaluation batches, 4 steps.
    let stopping = Scripted::new(15, Fault::Stop(stop.clone()));
    let stopped = fit(
        Trainee::new(initial.clone(), stopping, 1.0),
        &corpus,
        &split,
        &run,
        &stop,
    )
    .unwrap();
    assert_eq!(stopped.status, RunStatus::Interrupted);
    assert_eq!(stopped.report.steps_trained, 14);
    assert_eq!(stopped.checkpoint_step, Some(14));
    assert!(stopped.report.ms_per_step > 0.0);

    // Resumed, it ends where the uninterrupted run did; the interval it was stopped in has no
    // train means (they would cover steps 15..20 only), the others do.
    let resumed = fit(
        Trainee::new(initial, dense(), 1.0),
        &corpus,
        &split,
        &TrainingSettings {
            resume: true,
            ..run
        },
        &StopRequest::default(),
    )
    .unwrap();
    assert_eq!(resumed.status, RunStatus::Complete);
    assert_eq!(resumed.report.steps_trained, 30);
    assert_eq!(params(&resumed.model.model), params(&reference.model.model));
    let history = &resumed.report.history;
    assert_eq!(
        history.iter().map(|r| r.step).collect::<Vec<_>>(),
        [10, 20, 30]
    );
    assert!(history[1].train.is_empty(), "{:?}", history[1].train);
    assert!(!history[0].train.is_empty() && !history[2].train.is_empty());
    // Times cover both launches.
    assert!(resumed.report.train_seconds > stopped.report.train_seconds);
}

#[test]
fn resume_refuses_what_it_cannot_continue_and_a_fresh_run_never_replaces_checkpoints() {
    let (corpus, split) = corpus();
    let device = Device::flex().autodiff();
    let initial = ConfidenceGptConfig::new(gpt(corpus.vocab_size())).init(&device);
    let train = |run: &TrainingSettings| {
        fit(
            Trainee::new(initial.clone(), dense(), 1.0),
            &corpus,
            &split,
            run,
            &StopRequest::default(),
        )
    };
    let message = |r: Result<_, conf_train::training::TrainError>| match r {
        Ok(_) => panic!("must be refused"),
        Err(e) => {
            assert!(e.is_usage(), "{e}");
            e.to_string()
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let run = settings(dir.path(), 10, 10);

    // Nothing to resume.
    let err = message(train(&TrainingSettings {
        resume: true,
        ..run.clone()
    }));
    assert!(
        err.contains("no checkpoint") && err.contains("checkpoints"),
        "{err}"
    );

    // A finished run's checkpoints are not silently replaced by a fresh run.
    train(&run).unwrap();
    let err = message(train(&run));
    assert!(
        err.contains("--resume") && err.contains("earlier run"),
        "{err}"
    );

    // A different schedule or model is named.
    let err = message(train(&TrainingSettings {
        batch_size: 8,
        resume: true,
        ..run.clone()
    }));
    assert!(
        err.contains("batch_size is 8") && err.contains("16"),
        "{err}"
    );
    let err = message(train(&TrainingSettings {
        training_steps: 20,
        resume: true,
        ..run.clone()
    }));
    assert!(err.contains("training_steps"), "{err}");
    let wider = ConfidenceGptConfig::new(GptConfig::new(corpus.vocab_size(), SEQ, 48, 2, 4, 128))
        .init(&device);
    let err = message(fit(
        Trainee::new(wider, dense(), 1.0),
        &corpus,
        &split,
        &TrainingSettings {
            resume: true,
            ..run.clone()
        },
        &StopRequest::default(),
    ));
    assert!(
        err.contains("the model differs") && err.contains("shape"),
        "{err}"
    );

    // Without the `latest` pointer the sets are kept and the resume is refused.
    let checkpoints = dir.path().join("checkpoints");
    std::fs::remove_file(checkpoints.join("latest")).unwrap();
    let err = train(&TrainingSettings {
        resume: true,
        ..run.clone()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("latest"), "{err}");
    assert!(checkpoints.join("step-0000010").is_dir());
}
