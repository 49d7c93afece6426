//! End to end: the `lookahead` binary as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shared_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

fn lookahead(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lookahead"))
        .args(args)
        .env("LOOKAHEAD_CACHE", cache)
        .env_remove("LOOKAHEAD_DATA")
        .output()
        .expect("the binary runs")
}

/// Whether this test build holds a conf-cli backend feature.
fn compiled(feature: &str) -> bool {
    [
        ("flex", cfg!(feature = "flex")),
        ("wgpu", cfg!(feature = "wgpu")),
        ("tch", cfg!(feature = "tch")),
        ("cuda", cfg!(feature = "cuda")),
    ]
    .contains(&(feature, true))
}

/// Fails with the command's stderr when it did not succeed.
fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The one results file an experiment wrote into `dir`.
fn results_file(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("_results.json"))
        .expect("a results file")
}

fn json(output: &Output) -> serde_json::Value {
    assert_success(output);
    serde_json::from_slice(&output.stdout).expect("stdout is JSON")
}

fn fails_with(output: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    assert!(output.stdout.is_empty(), "no partial output on failure");
}

#[test]
fn help_lists_the_commands() {
    let cache = tempfile::tempdir().unwrap();
    let out = lookahead(&["--help"], cache.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("data") && text.contains("model"), "{text}");
}

#[test]
fn data_describes_the_synthetic_corpus_with_its_entropy_floor() {
    let cache = tempfile::tempdir().unwrap();
    let summary = json(&lookahead(
        &["data", "--json", "--seq-len", "64"],
        cache.path(),
    ));
    assert_eq!(summary["vocab_size"], 32);
    assert_eq!(summary["tokens"], 262_144);
    let (train, val) = (
        summary["train_tokens"].as_u64().unwrap(),
        summary["val_tokens"].as_u64().unwrap(),
    );
    assert_eq!(train + val, 262_144);
    assert_eq!(val, 26_214);
    assert_eq!(summary["eval_windows"], 26_214 / 66);
    let floor = summary["entropy_floor"].as_f64().unwrap();
    assert!((1.0..2.0).contains(&floor), "{floor}");
}

#[test]
fn data_reads_tinyshakespeare_from_the_data_dir() {
    let cache = tempfile::tempdir().unwrap();
    let dir = shared_data();
    let args = [
        "data",
        "--json",
        "--dataset",
        "tinyshakespeare",
        "--data-dir",
        dir.to_str().unwrap(),
    ];
    let summary = json(&lookahead(&args, cache.path()));
    assert_eq!(summary["vocab_size"], 65);
    assert_eq!(summary["tokens"], 1_115_394);
    assert!(summary["entropy_floor"].is_null());
    assert!(
        summary["sample"]
            .as_str()
            .unwrap()
            .starts_with("First Citizen:")
    );
}

#[test]
fn bad_data_flags_exit_with_code_2_and_name_the_flag() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();
    fails_with(
        &lookahead(&["data", "--dataset", "nonexistent.txt"], c),
        2,
        &["--dataset", "nonexistent.txt"],
    );
    fails_with(
        &lookahead(&["data", "--tokenizer", "bpe"], c),
        2,
        &["--tokenizer", "bpe"],
    );
    fails_with(
        &lookahead(&["data", "--tokenizer", "gpt2"], c),
        2,
        &["--tokenizer", "synthetic"],
    );
    fails_with(
        &lookahead(&["data", "--seq-len", "30000"], c),
        2,
        &["validation", "26214 tokens", "30002"],
    );
    fails_with(
        &lookahead(&["data", "--val-fraction", "0"], c),
        2,
        &["val_fraction"],
    );
}

#[test]
fn model_reports_both_parameter_counts_within_half_a_percent() {
    let cache = tempfile::tempdir().unwrap();
    let summary = json(&lookahead(
        &["model", "--preset", "plan", "--json"],
        cache.path(),
    ));
    let counts = &summary["parameter_counts"];
    let (s, c) = (
        counts["standard_params"].as_f64().unwrap(),
        counts["confidence_params"].as_f64().unwrap(),
    );
    assert!(((s - c) / c).abs() < 0.005);
    assert_eq!(summary["confidence"]["gpt"]["vocab_size"], 32);
    assert_eq!(summary["confidence"]["gpt"]["d_model"], 128);
    assert_eq!(summary["confidence"]["conf_head"], "final");

    let text = lookahead(
        &[
            "model",
            "--preset",
            "plan",
            "--conf-head",
            "probe",
            "--vocab-size",
            "65",
        ],
        cache.path(),
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("MiniGPT")
            && text.contains("ConfidenceAwareGPT")
            && text.contains("AdaptiveLayer")
    );
    assert!(
        text.contains("d_input: 384, d_output: 1"),
        "probe reads 3 blocks of 128"
    );

    fails_with(
        &lookahead(&["model", "--preset", "huge"], cache.path()),
        2,
        &["--preset", "huge", "quick"],
    );
    fails_with(
        &lookahead(&["model", "--preset", "seed"], cache.path()),
        2,
        &["--preset", "now called 'plan'"],
    );
}

#[test]
fn train_runs_one_model_and_saves_its_history() {
    let cache = tempfile::tempdir().unwrap();
    let results = tempfile::tempdir().unwrap();
    let dir = results.path().to_str().unwrap();
    let common = [
        "--preset",
        "quick",
        "--training-steps",
        "4",
        "--eval-interval",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--no-tui",
        "--results-dir",
        dir,
    ];
    for (model, objective, file) in [
        ("standard", "standard", "standard-standard-seed42"),
        ("confidence", "seed", "confidence-seed-seed42"),
    ] {
        let mut args = vec!["train", "--model", model, "--objective", objective];
        args.extend(common);
        let out = lookahead(&args, cache.path());
        assert_success(&out);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.lines().filter(|l| l.starts_with("step")).count(),
            2,
            "{stdout}"
        );
        let history = results.path().join("train").join(file).join("history.json");
        let history: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&history).unwrap()).unwrap();
        let records = history["report"]["history"].as_array().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1]["step"], 4);
        assert!(records[1]["valid"]["LM Loss"].as_f64().unwrap().is_finite());
        assert_eq!(history["settings"]["seq_len"], 32);
        if model == "confidence" {
            assert!(records[1]["valid"]["Confidence MSE"].as_f64().is_some());
        }
    }
}

#[test]
fn bad_train_flags_exit_with_code_2() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();
    fails_with(
        &lookahead(&["train", "--model", "standard", "--objective", "dense"], c),
        2,
        &["--objective"],
    );
    fails_with(
        &lookahead(
            &["train", "--model", "confidence", "--objective", "standard"],
            c,
        ),
        2,
        &["--objective"],
    );
    fails_with(
        &lookahead(
            &["train", "--model", "confidence", "--objective", "lookahead"],
            c,
        ),
        2,
        &["lookahead"],
    );
    // A backend this build lacks names the feature and the xtask that provide it.
    let missing = [("cuda", "cuda"), ("wgpu", "wgpu"), ("tch-cpu", "tch")]
        .into_iter()
        .find(|(_, feature)| !compiled(feature));
    if let Some((backend, feature)) = missing {
        fails_with(
            &lookahead(&["train", "--model", "standard", "--backend", backend], c),
            2,
            &[
                &format!("--backend {backend}"),
                &format!("--features {feature}"),
                &format!("cargo xtask experiment --backend {backend}"),
            ],
        );
    }
    fails_with(
        &lookahead(&["train", "--model", "standard", "--device", "1"], c),
        2,
        &["--device 1", "flex"],
    );
    fails_with(
        &lookahead(
            &["train", "--model", "standard", "--conf-input", "maybe"],
            c,
        ),
        2,
        &["--conf-input"],
    );
}

#[test]
fn train_reads_a_config_file_that_flags_override_and_rejects_unknown_keys() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("exp.toml");
    let results = dir.path().join("out");
    std::fs::write(
        &config,
        format!(
            "training_steps = 2\neval_interval = 1\nseq_len = 16\nbatch_size = 2\nseeds = [7, 8]\nresults_dir = {:?}\n",
            results.to_str().unwrap()
        ),
    )
    .unwrap();
    let args = [
        "train",
        "--model",
        "standard",
        "--config",
        config.to_str().unwrap(),
        "--eval-interval",
        "2",
        "--no-tui",
    ];
    let out = lookahead(&args, cache.path());
    assert_success(&out);
    let history = results.join("train/standard-standard-seed7/history.json");
    let history: serde_json::Value =
        serde_json::from_slice(&std::fs::read(history).unwrap()).unwrap();
    assert_eq!(history["config"]["training_steps"], 2);
    assert_eq!(
        history["config"]["eval_interval"], 2,
        "the flag overrides the file"
    );
    assert_eq!(history["report"]["history"].as_array().unwrap().len(), 1);

    std::fs::write(&config, "training_stepz = 2\n").unwrap();
    let out = lookahead(
        &[
            "train",
            "--model",
            "standard",
            "--config",
            config.to_str().unwrap(),
        ],
        cache.path(),
    );
    fails_with(&out, 2, &["training_stepz", "exp.toml"]);
    for bad in ["0", "-5"] {
        let out = lookahead(
            &["train", "--model", "standard", "--training-steps", bad],
            cache.path(),
        );
        fails_with(&out, 2, &["--training-steps", "at least 1", bad]);
    }
}

#[test]
fn an_experiment_writes_a_results_file_that_round_trips_through_results_load() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let results_dir = dir.path().to_str().unwrap();
    let args = [
        "experiment",
        "--training-steps",
        "4",
        "--eval-interval",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--seeds",
        "1,2",
        "--no-tui",
        "--results-dir",
        results_dir,
    ];
    let out = lookahead(&args, cache.path());
    assert_success(&out);
    let file = results_file(dir.path());
    let loaded = lookahead(&["results", "load", file.to_str().unwrap()], cache.path());
    assert_success(&loaded);
    assert!(String::from_utf8_lossy(&loaded.stdout).contains(&format!(
        "valid (schema {}, 2 seeds",
        conf_cli::results::SCHEMA_VERSION
    )));

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    for key in [
        "timestamp",
        "backend",
        "device",
        "config",
        "parameter_counts",
        "training_time",
        "summary",
    ] {
        assert!(!results[key].is_null(), "{key}");
    }
    for model in ["standard_model_results", "confidence_model_results"] {
        for seed in ["1", "2"] {
            let r = &results[model][seed];
            for key in [
                "final_eval_loss",
                "best_eval_loss",
                "final_perplexity",
                "training_time",
                "flops_per_token",
                "total_flops",
            ] {
                assert!(r[key].as_f64().unwrap().is_finite(), "{model}.{seed}.{key}");
            }
            assert_eq!(r["loss_history"].as_array().unwrap().len(), 2);
        }
    }
    let c = &results["confidence_model_results"]["1"];
    let predictions = c["confidence_predictions"].as_array().unwrap();
    assert_eq!(
        predictions.len(),
        c["actual_future_losses"].as_array().unwrap().len()
    );
    assert!(!predictions.is_empty() && predictions.len() <= 2000);
    assert!(!c["calibration_bins"].as_array().unwrap().is_empty());
    assert_eq!(c["confidence_loss_history"].as_array().unwrap().len(), 2);
    assert!(results["summary"]["paired_difference"]["LM Loss"]["p_value"].is_number());
    assert!(results["summary"]["head_vs_entropy"]["spearman"].is_object());
    assert!(
        results["standard_model_results"]["1"]
            .get("confidence_predictions")
            .is_none()
    );

    // The experiment wrote its report beside the results: six plots embedded in the HTML.
    let stem = file
        .to_str()
        .unwrap()
        .trim_end_matches("_results.json")
        .to_string();
    let html = std::fs::read_to_string(format!("{stem}_report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 6);
    assert!(html.contains("Reliability") && html.contains("LM Loss"));
    let markdown = std::fs::read_to_string(format!("{stem}_report.md")).unwrap();
    assert!(markdown.starts_with("| metric | standard | confidence |"));

    // Two separate seed runs of the same configuration merge into one report.
    let other = dir.path().join("other");
    let mut args2 = args.to_vec();
    args2[10] = "3";
    args2[13] = other.to_str().unwrap();
    assert!(lookahead(&args2, cache.path()).status.success());
    let other_file = results_file(&other);
    let merged = lookahead(
        &[
            "report",
            file.to_str().unwrap(),
            other_file.to_str().unwrap(),
        ],
        cache.path(),
    );
    assert_success(&merged);
    let stdout = String::from_utf8_lossy(&merged.stdout);
    assert!(
        stdout.contains("report:") && stdout.contains("_merged-"),
        "{stdout}"
    );
    // The merged report has a name of its own: the first file's report is untouched.
    assert_eq!(
        std::fs::read_to_string(format!("{stem}_report.html")).unwrap(),
        html
    );
    // The reliability diagram names each seed; the time chart labels both bars.
    assert!(html.contains("seed 1") && html.contains("seed 2"));
    assert!(
        html.contains(">standard<") && html.contains(">confidence<"),
        "time chart labels"
    );

    // A schema-2 file (before the MFU fields) still loads.
    let mut older = results.clone();
    older["schema_version"] = 2.into();
    older.as_object_mut().unwrap().remove("peak_tflops");
    let older_file = dir.path().join("older_results.json");
    std::fs::write(&older_file, serde_json::to_vec(&older).unwrap()).unwrap();
    assert_success(&lookahead(
        &["results", "load", older_file.to_str().unwrap()],
        cache.path(),
    ));

    // A damaged file is rejected naming it.
    std::fs::write(&file, "{\"schema_version\": 1}").unwrap();
    fails_with(
        &lookahead(&["results", "load", file.to_str().unwrap()], cache.path()),
        2,
        &["_results.json"],
    );
}

#[test]
fn bench_times_every_objective_and_writes_its_figures() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("bench.json");
    let args = [
        "bench",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--peak-tflops",
        "0.5",
        "--output",
        output.to_str().unwrap(),
    ];
    let out = lookahead(&args, cache.path());
    assert_success(&out);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    assert_eq!(report["backend"], "flex");
    assert_eq!(
        (report["precision"].as_str(), report["peak_tflops"].as_f64()),
        (Some("f32"), Some(0.5))
    );
    assert_eq!(report["seq_len"], 16);
    assert_eq!(report["turn_steps"], 5);
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["objective"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["standard", "seed", "dense", "teacher"]);
    for row in rows {
        let ms = row["ms_per_step"].as_f64().unwrap();
        assert!(ms > 0.0 && ms.is_finite(), "{row}");
        let tokens = row["tokens_per_second"].as_f64().unwrap();
        // tokens/s and ms/step describe the same steps: 2 windows × 16 tokens per step.
        assert!((tokens * ms / 1e3 - 32.0).abs() < 1e-6, "{row}");
        assert!(row["last_lm_loss"].as_f64().unwrap().is_finite());
        // The model FLOP utilisation is the FLOP rate over the given peak.
        let tflops = row["tflops"].as_f64().unwrap();
        assert!(
            (row["mfu"].as_f64().unwrap() - tflops / 0.5).abs() < 1e-12,
            "{row}"
        );
    }
    assert_eq!(rows[0]["relative_to_standard"], 1.0);
    // The standard model is the parameter-matched MiniGPT: within half a percent.
    let standard = rows[0]["parameters"].as_f64().unwrap();
    let confidence = rows[1]["parameters"].as_f64().unwrap();
    assert!((standard - confidence).abs() / confidence < 0.005);
    fails_with(
        &lookahead(&["bench", "--steps", "0"], cache.path()),
        2,
        &["--steps"],
    );
    fails_with(
        &lookahead(&["bench", "--turn-steps", "0"], cache.path()),
        2,
        &["--turn-steps"],
    );
    // The profile is libtorch's: flex refuses it before any step, naming the flag.
    let profile_dir = dir.path().join("profile");
    fails_with(
        &lookahead(
            &["bench", "--profile", profile_dir.to_str().unwrap()],
            cache.path(),
        ),
        2,
        &["--profile", "tch-cpu"],
    );
    fails_with(
        &lookahead(
            &[
                "bench",
                "--profile",
                profile_dir.to_str().unwrap(),
                "--devices",
                "0,1",
            ],
            cache.path(),
        ),
        2,
        &["--profile", "--devices"],
    );
    assert!(!profile_dir.exists(), "nothing written");
    // bf16 products: recorded as such, and a finite loss.
    let bf16_output = dir.path().join("bench-bf16.json");
    let mut bf16_args = args.to_vec();
    bf16_args.extend(["--precision", "bf16", "--objectives", "standard,dense"]);
    *bf16_args
        .iter_mut()
        .find(|a| a.ends_with("bench.json"))
        .unwrap() = bf16_output.to_str().unwrap();
    assert_success(&lookahead(&bf16_args, cache.path()));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bf16_output).unwrap()).unwrap();
    assert_eq!(report["precision"], "bf16");
    for row in report["rows"].as_array().unwrap() {
        assert!(row["last_lm_loss"].as_f64().unwrap().is_finite(), "{row}");
    }
    // TF32 is libtorch's CUDA switch: flex refuses it, naming the setting.
    fails_with(
        &lookahead(&["bench", "--precision", "tf32"], cache.path()),
        2,
        &["precision", "tf32"],
    );
}

#[test]
fn check_backend_compares_with_flex_and_reports_every_comparison() {
    let cache = tempfile::tempdir().unwrap();
    let out = lookahead(&["check-backend", "--backend", "flex"], cache.path());
    assert_success(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("flex matches flex: 71 comparisons"), "{text}");
    // With the bf16 training: two more, which pass on flex.
    let checks = json(&lookahead(
        &[
            "check-backend",
            "--backend",
            "flex",
            "--json",
            "--bf16-training",
        ],
        cache.path(),
    ));
    let checks = checks.as_array().expect("a list of comparisons");
    assert_eq!(checks.len(), 73);
    let logits = checks.iter().find(|c| c["what"] == "logits").unwrap();
    assert_eq!(logits["worst"].as_f64(), Some(0.0), "{logits}");
    let bf16 = &checks[72];
    assert_eq!(bf16["what"], "bf16 training reaches f32's eval loss");
    let worst = bf16["worst"].as_f64().unwrap();
    assert!(worst > 0.0 && worst <= 1.0, "{bf16}");
    // A backend this build lacks is a usage error.
    if !compiled("cuda") {
        let out = lookahead(&["check-backend", "--backend", "cuda"], cache.path());
        fails_with(&out, 2, &["cuda"]);
    }
}

/// A short experiment of both models on a backend other than flex, for real: the results
/// file names the backend and holds finite losses that went down.
#[allow(dead_code)] // used only in builds with a GPU or libtorch backend
fn both_models_train_on(backend: &str) {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A short warm-up, so six steps move the loss.
    let config = dir.path().join("short.toml");
    std::fs::write(&config, "warmup_steps = 1\nlearning_rate = 0.01\n").unwrap();
    let args = [
        "experiment",
        "--backend",
        backend,
        "--config",
        config.to_str().unwrap(),
        "--training-steps",
        "6",
        "--eval-interval",
        "3",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--seeds",
        "1",
        "--no-tui",
        "--results-dir",
        dir.path().to_str().unwrap(),
    ];
    let out = lookahead(&args, cache.path());
    assert_success(&out);
    let file = results_file(dir.path());
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(results["backend"], backend);
    for model in ["standard_model_results", "confidence_model_results"] {
        let history = results[model]["1"]["loss_history"].as_array().unwrap();
        assert_eq!(history.len(), 2, "{model}");
        let eval: Vec<f64> = history
            .iter()
            .map(|h| h["eval_loss"].as_f64().unwrap())
            .collect();
        assert!(eval.iter().all(|l| l.is_finite()), "{model}: {eval:?}");
        assert!(
            eval[1] < eval[0],
            "{model} on {backend}: eval loss {eval:?}"
        );
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn both_models_train_on_wgpu() {
    both_models_train_on("wgpu");
}

#[cfg(feature = "tch")]
#[test]
fn both_models_train_on_tch_cpu() {
    both_models_train_on("tch-cpu");
}

/// A tiny experiment's flags writing into `dir`, evaluating every 2 steps.
fn tiny_experiment<'a>(dir: &'a str, steps: &'a str, seeds: &'a str) -> Vec<&'a str> {
    vec![
        "experiment",
        "--training-steps",
        steps,
        "--eval-interval",
        if steps == "400" { "100" } else { "2" },
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--seeds",
        seeds,
        "--no-tui",
        "--results-dir",
        dir,
    ]
}

fn results_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with("_results.json"))
        .collect();
    files.sort();
    files
}

#[test]
fn experiments_started_together_never_share_files() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let results_dir = dir.path().to_str().unwrap();
    let args = tiny_experiment(results_dir, "2", "1");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_lookahead"))
            .args(&args)
            .env("LOOKAHEAD_CACHE", cache.path())
            .output()
    };
    // Started in the same second (they take far longer than the gap between them).
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(spawn);
        let b = s.spawn(spawn);
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    assert_success(&a);
    assert_success(&b);
    let files = results_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let stamp = |p: &PathBuf| p.file_name().unwrap().to_string_lossy()[..16].to_string();
    let ids: Vec<String> = files
        .iter()
        .map(|f| json_file(f)["id"].as_str().unwrap().to_string())
        .collect();
    assert_ne!(ids[0], ids[1]);
    for (file, id) in files.iter().zip(&ids) {
        assert!(dir.path().join(format!("{id}_runs")).is_dir());
        assert_eq!(json_file(file)["status"], "complete");
        let _ = stamp(file);
    }
}

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Runs `args` and sends `signal` once the run has reached a step (its first checkpoint).
fn interrupted(args: &[&str], cache: &Path, checkpoints_under: &Path, signal: i32) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lookahead"))
        .args(args)
        .env("LOOKAHEAD_CACHE", cache)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let started = || {
        walk(checkpoints_under)
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == "latest"))
    };
    while !started() {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!("ended first: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    child.wait_with_output().unwrap()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for path in entries.flatten().map(|e| e.path()) {
            if path.is_dir() {
                out.extend(walk(&path));
            }
            out.push(path);
        }
    }
    out
}

#[test]
fn sigint_saves_the_step_and_a_resumed_train_ends_with_the_uninterrupted_weights() {
    let cache = tempfile::tempdir().unwrap();
    let (full, stopped) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = |dir: &Path| {
        [
            "train",
            "--model",
            "confidence",
            "--training-steps",
            "300",
            "--eval-interval",
            "100",
            "--save-interval",
            "1",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--seeds",
            "3",
            "--no-tui",
            "--results-dir",
            dir.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    assert_success(&lookahead(&refs(&args(full.path())), cache.path()));

    let out = interrupted(
        &refs(&args(stopped.path())),
        cache.path(),
        stopped.path(),
        libc::SIGINT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("of 300 steps") && stderr.contains("--resume"),
        "{stderr}"
    );
    let run = "train/confidence-dense-seed3";
    let history = json_file(&stopped.path().join(run).join("history.json"));
    assert_eq!(history["status"], "interrupted");
    let trained = history["report"]["steps_trained"].as_u64().unwrap();
    assert!(trained < 300, "{trained}");

    let mut resume = args(stopped.path());
    resume.push("--resume".into());
    assert_success(&lookahead(&refs(&resume), cache.path()));
    // Equal weights give equal evaluations, to the last digit.
    let history = json_file(&stopped.path().join(run).join("history.json"));
    let reference = json_file(&full.path().join(run).join("history.json"));
    assert_eq!(history["final_metrics"], reference["final_metrics"]);
    assert_eq!(history["status"], "complete");
    assert_eq!(history["report"]["steps_trained"], 300);
}

#[test]
fn a_terminated_experiment_says_so_and_resumes_its_own_runs() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let results_dir = dir.path().to_str().unwrap();
    let mut args = tiny_experiment(results_dir, "400", "5,6");
    args.extend(["--save-interval", "1"]);
    let out = interrupted(&args, cache.path(), dir.path(), libc::SIGTERM);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(
        stderr.contains("incomplete") && stderr.contains("--resume"),
        "{stderr}"
    );

    let files = results_files(dir.path());
    assert_eq!(files.len(), 1);
    let results = json_file(&files[0]);
    assert_eq!(results["status"], "incomplete");
    let standard = &results["standard_model_results"]["5"];
    assert_eq!(standard["status"], "interrupted");
    assert!(standard["steps_trained"].as_u64().unwrap() < 400);
    assert_eq!(results["summary"]["seeds"].as_array().unwrap().len(), 0);
    assert!(
        results["summary"]["excluded_seeds"]["5"]
            .as_str()
            .unwrap()
            .contains("interrupted")
    );
    let loaded = lookahead(
        &["results", "load", files[0].to_str().unwrap()],
        cache.path(),
    );
    assert_success(&loaded);
    let text = String::from_utf8_lossy(&loaded.stdout);
    assert!(
        text.contains("INCOMPLETE") && text.contains("seed 5"),
        "{text}"
    );

    // --resume continues this experiment (same id), not a new one.
    let mut resume = args.clone();
    resume.push("--resume");
    assert_success(&lookahead(&resume, cache.path()));
    let files = results_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let results = json_file(&files[0]);
    assert_eq!(results["status"], "complete");
    for model in ["standard_model_results", "confidence_model_results"] {
        for seed in ["5", "6"] {
            assert_eq!(results[model][seed]["status"], "complete");
            assert_eq!(results[model][seed]["steps_trained"], 400);
        }
    }
    assert_eq!(results["summary"]["seeds"].as_array().unwrap().len(), 2);

    // Nothing left to resume.
    fails_with(
        &lookahead(&resume, cache.path()),
        2,
        &["--resume", "no incomplete experiment"],
    );
}

#[test]
fn unusable_places_and_flags_are_one_line_errors_with_exit_2() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    for place in [file.to_str().unwrap(), "/proc/lookahead-results"] {
        let out = lookahead(&tiny_experiment(place, "2", "1"), cache.path());
        fails_with(&out, 2, &["--results-dir", place]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        let out = lookahead(
            &[
                "train",
                "--model",
                "standard",
                "--results-dir",
                place,
                "--no-tui",
            ],
            cache.path(),
        );
        fails_with(&out, 2, &[place]);
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
    fails_with(
        &lookahead(&["data", "--seq-len", "0"], cache.path()),
        2,
        &["--seq-len", "at least 1"],
    );
    fails_with(
        &lookahead(
            &tiny_experiment(dir.path().to_str().unwrap(), "2", "1,1"),
            cache.path(),
        ),
        2,
        &["seeds", "twice"],
    );
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "training_steps = 2\nseeds = [1,\n").unwrap();
    fails_with(
        &lookahead(
            &["experiment", "--config", config.to_str().unwrap()],
            cache.path(),
        ),
        2,
        &["bad.toml", "line"],
    );
    // A fresh train never replaces an earlier run's checkpoints.
    let train = [
        "train",
        "--model",
        "standard",
        "--training-steps",
        "2",
        "--eval-interval",
        "2",
        "--seq-len",
        "16",
        "--no-tui",
        "--results-dir",
        dir.path().to_str().unwrap(),
    ];
    assert_success(&lookahead(&train, cache.path()));
    fails_with(
        &lookahead(&train, cache.path()),
        2,
        &["--resume", "earlier run"],
    );
    let mut other = train.to_vec();
    other.extend(["--batch-size", "3", "--resume"]);
    fails_with(&lookahead(&other, cache.path()), 2, &["batch_size is 3"]);
}

#[test]
fn help_describes_every_flag_and_bench_has_no_training_only_flags() {
    let cache = tempfile::tempdir().unwrap();
    let help = |command: &str| {
        String::from_utf8_lossy(&lookahead(&[command, "--help"], cache.path()).stdout).into_owned()
    };
    let experiment = help("experiment");
    for flag in [
        "--training-steps",
        "--batch-size",
        "--seq-len",
        "--eval-interval",
        "--results-dir",
        "--confidence-alpha",
        "--conf-head",
        "--objective",
    ] {
        let line = experiment
            .lines()
            .skip_while(|l| !l.contains(flag))
            .nth(1)
            .unwrap_or_default();
        assert!(line.trim().len() > 10, "{flag} undescribed:\n{experiment}");
    }
    assert!(experiment.contains("quick 400"), "{experiment}");
    let bench = help("bench");
    for flag in ["--resume", "--no-tui", "--save-interval"] {
        assert!(!bench.contains(flag), "bench shows {flag}");
    }
}

/// A 4-step run of `model` into `dir`; its run directory.
fn tiny_train(model: &str, dir: &Path, cache: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec![
        "train",
        "--model",
        model,
        "--preset",
        "quick",
        "--training-steps",
        "4",
        "--eval-interval",
        "4",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--no-tui",
        "--results-dir",
        dir.to_str().unwrap(),
    ];
    args.extend(extra);
    assert_success(&lookahead(&args, cache));
    let objective = if model == "standard" {
        "standard"
    } else {
        "dense"
    };
    dir.join("train")
        .join(format!("{model}-{objective}-seed42"))
}

fn stdout(output: &Output) -> String {
    assert_success(output);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_run_exports_to_safetensors_and_samples_from_the_run_its_checkpoint_and_the_export() {
    let cache = tempfile::tempdir().unwrap();
    let results = tempfile::tempdir().unwrap();
    let run = tiny_train("confidence", results.path(), cache.path(), &[]);
    let out = lookahead(&["export", run.to_str().unwrap()], cache.path());
    assert!(stdout(&out).contains("at step 4"));
    let export = run.join("model.safetensors");
    let set = run.join("checkpoints").join("step-0000004");
    let sample = |source: &Path, extra: &[&str]| {
        let mut args = vec!["sample", source.to_str().unwrap(), "--max-new-tokens", "24"];
        if !extra.contains(&"--prompt") {
            args.extend(["--prompt", "abc"]);
        }
        args.extend(extra);
        lookahead(&args, cache.path())
    };
    // The same seed gives the same text from the run, its checkpoint and its export.
    let text = stdout(&sample(&run, &["--seed", "3"]));
    let generated = text.strip_suffix('\n').expect("a final newline");
    assert!(
        generated.starts_with("abc") && generated.chars().count() == 3 + 24,
        "{text}"
    );
    assert_eq!(text, stdout(&sample(&set, &["--seed", "3"])));
    assert_eq!(text, stdout(&sample(&export, &["--seed", "3"])));
    assert_ne!(text, stdout(&sample(&export, &["--seed", "4"])));
    // Temperature 0 is greedy: the seed no longer matters.
    let greedy = stdout(&sample(&export, &["--temperature", "0", "--seed", "1"]));
    assert_eq!(
        greedy,
        stdout(&sample(&export, &["--temperature", "0", "--seed", "2"]))
    );
    // --json: one object per token, with the predicted future loss; the texts make the text.
    let lines = stdout(&sample(&export, &["--seed", "3", "--json"]));
    let tokens: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(tokens.len(), 24);
    assert!(
        tokens
            .iter()
            .all(|t| t["predicted_loss"].as_f64().unwrap().is_finite())
    );
    let joined: String = tokens.iter().map(|t| t["text"].as_str().unwrap()).collect();
    assert_eq!(format!("abc{joined}"), generated);
    // Characters outside the vocabulary, bad settings and foreign files are clear errors.
    fails_with(
        &sample(&export, &["--prompt", "abcé"]),
        2,
        &["--prompt", "'é'"],
    );
    fails_with(&sample(&export, &["--top-p", "0"]), 2, &["--top-p"]);
    let truncated = results.path().join("truncated.safetensors");
    let bytes = std::fs::read(&export).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &sample(&truncated, &[]),
        2,
        &["truncated.safetensors", "SafeTensors"],
    );
    let foreign = results.path().join("notes.txt");
    std::fs::write(&foreign, "not weights").unwrap();
    fails_with(&sample(&foreign, &[]), 2, &["notes.txt", "SafeTensors"]);
    fails_with(&sample(results.path(), &[]), 2, &["model.json"]);
    // Another model's run into the same directory is refused and leaves the card as it was.
    let card = std::fs::read(run.join("model.json")).unwrap();
    let again = lookahead(
        &[
            "train",
            "--model",
            "confidence",
            "--training-steps",
            "2",
            "--seq-len",
            "48",
            "--no-tui",
            "--results-dir",
            results.path().to_str().unwrap(),
        ],
        cache.path(),
    );
    fails_with(
        &again,
        2,
        &["checkpoints of another model", "context_length"],
    );
    assert_eq!(std::fs::read(run.join("model.json")).unwrap(), card);
}

#[test]
fn train_starts_from_an_export_of_the_same_model_only() {
    let cache = tempfile::tempdir().unwrap();
    let results = tempfile::tempdir().unwrap();
    let first = tiny_train("standard", results.path(), cache.path(), &[]);
    let export = first.join("model.safetensors");
    assert_success(&lookahead(
        &["export", first.to_str().unwrap()],
        cache.path(),
    ));
    let again = tempfile::tempdir().unwrap();
    let init = ["--init-from", export.to_str().unwrap()];
    let out = lookahead(
        &[
            "train",
            "--model",
            "standard",
            "--preset",
            "quick",
            "--training-steps",
            "2",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--no-tui",
            "--results-dir",
            again.path().to_str().unwrap(),
            init[0],
            init[1],
        ],
        cache.path(),
    );
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("starting from the weights"));
    let other = tempfile::tempdir().unwrap();
    let mismatch = |model: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            model,
            "--preset",
            "quick",
            "--training-steps",
            "2",
            "--batch-size",
            "4",
            "--no-tui",
            "--results-dir",
            other.path().to_str().unwrap(),
            init[0],
            init[1],
        ];
        if !extra.contains(&"--seq-len") {
            args.extend(["--seq-len", "32"]);
        }
        args.extend(extra);
        lookahead(&args, cache.path())
    };
    fails_with(
        &mismatch("confidence", &[]),
        2,
        &["--init-from", "model confidence here, standard there"],
    );
    fails_with(
        &mismatch("standard", &["--seq-len", "48"]),
        2,
        &["seq_len) 48 here, 32 there"],
    );
    fails_with(
        &mismatch("standard", &["--tokenizer", "byte"]),
        2,
        &["tokenizer"],
    );
}

#[test]
fn report_merges_seeds_from_several_files_once_and_refuses_other_configurations() {
    let cache = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let run = |name: &str, seeds: &str, extra: &[&str]| {
        let dir = root.path().join(name);
        let dir_str = dir.to_str().unwrap().to_string();
        let mut args = tiny_experiment(&dir_str, "2", seeds);
        args.extend(extra);
        assert_success(&lookahead(&args, cache.path()));
        results_file(&dir)
    };
    let a = run("a", "1", &[]);
    let b = run("b", "1,2", &[]);
    let c = run("c", "3", &["--confidence-alpha", "0.5"]);
    let report = |files: &[&Path]| {
        let mut args = vec!["report"];
        args.extend(files.iter().map(|f| f.to_str().unwrap()));
        lookahead(&args, cache.path())
    };
    let merged = report(&[&a, &b]);
    assert_success(&merged);
    let stderr = String::from_utf8_lossy(&merged.stderr);
    assert!(
        stderr.contains("seed 1's standard run") && stderr.contains("counted once"),
        "{stderr}"
    );
    let html = String::from_utf8_lossy(&merged.stdout);
    let report_path = html.lines().last().unwrap().trim_start_matches("report: ");
    let text = std::fs::read_to_string(report_path).unwrap();
    assert!(text.contains("<p>2 seeds;"), "two seeds, not three");
    fails_with(
        &report(&[&a, &c]),
        2,
        &[
            "cannot share a report",
            "config key `confidence_alpha`",
            "1.0",
            "0.5",
        ],
    );
}

#[test]
fn data_parallel_and_gradient_checkpointing_flags_train_or_name_the_problem() {
    let cache = tempfile::tempdir().unwrap();
    let results = tempfile::tempdir().unwrap();
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            "confidence",
            "--training-steps",
            "2",
            "--seq-len",
            "16",
            "--no-tui",
            "--results-dir",
            results.path().to_str().unwrap(),
        ];
        args.extend(extra);
        lookahead(&args, cache.path())
    };
    let out = train(&[
        "--batch-size",
        "4",
        "--devices",
        "0,1",
        "--gradient-checkpointing",
    ]);
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("workers share its cores"));
    fails_with(
        &train(&["--batch-size", "3", "--devices", "0,1"]),
        2,
        &["batch_size 3", "2 devices", "--devices"],
    );
    fails_with(&train(&["--devices", "0,0"]), 2, &["--devices", "twice"]);
    // One device named with the flag trains exactly what the flag's absence trains.
    let final_metrics = |extra: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "train",
            "--model",
            "confidence",
            "--objective",
            "dense",
            "--training-steps",
            "3",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--no-tui",
            "--results-dir",
            dir.path().to_str().unwrap(),
        ];
        args.extend(extra);
        assert_success(&lookahead(&args, cache.path()));
        json_file(
            &dir.path()
                .join("train/confidence-dense-seed42/history.json"),
        )["final_metrics"]
            .clone()
    };
    assert_eq!(final_metrics(&[]), final_metrics(&["--devices", "0"]));
    // bench times the same steps split across two workers: the same losses, up to rounding.
    let bench = |extra: &[&str]| {
        let file = results.path().join(format!("bench{}.json", extra.len()));
        let mut args = vec![
            "bench",
            "--objectives",
            "standard,dense",
            "--steps",
            "2",
            "--warmup-steps",
            "1",
            "--seq-len",
            "16",
            "--batch-size",
            "4",
            "--output",
            file.to_str().unwrap(),
        ];
        args.extend(extra);
        assert_success(&lookahead(&args, cache.path()));
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(&file).unwrap()).unwrap()
    };
    let (one, two) = (bench(&[]), bench(&["--devices", "0,1"]));
    assert_eq!(
        (one["workers"].as_u64(), two["workers"].as_u64()),
        (Some(1), Some(2))
    );
    for (a, b) in one["rows"]
        .as_array()
        .unwrap()
        .iter()
        .zip(two["rows"].as_array().unwrap())
    {
        let (a, b) = (
            a["last_lm_loss"].as_f64().unwrap(),
            b["last_lm_loss"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    fails_with(
        &train(&["--device", "0", "--devices", "0,1"]),
        2,
        &["--device and --devices"],
    );
}
