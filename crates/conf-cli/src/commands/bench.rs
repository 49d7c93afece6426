//! `lookahead bench`: ms/step, tokens/s, FLOP rate and peak memory of each objective's training
//! step on one backend, at a preset's shape.

use anyhow::anyhow;
use conf_data::write_atomic;
use conf_train::ObjectiveKind;
use conf_train::bench::{BenchSettings, StepTiming, time_objectives};
use conf_train::profile::{ProfileRequest, ProfileSummary};
use conf_train::training::Execution;
use serde::Serialize;

use crate::Failure;
use crate::cli::BenchArgs;

#[derive(Debug, Serialize)]
struct BenchRow {
    objective: ObjectiveKind,
    parameters: usize,
    #[serde(flatten)]
    timing: StepTiming,
    /// ms/step over the standard step's, when standard is timed too.
    relative_to_standard: Option<f64>,
    flops_per_token: f64,
    /// Achieved model FLOP rate (6N + attention, plus the no-gradient passes).
    tflops: f64,
    /// `tflops` over the device's dense peak, when known.
    mfu: Option<f64>,
    /// The steps run under libtorch's profiler (`--profile`).
    profile: Option<ProfileSummary>,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    backend: String,
    device: String,
    d_model: usize,
    n_layers: usize,
    n_heads: usize,
    seq_len: usize,
    batch_size: usize,
    gradient_checkpointing: bool,
    /// Data-parallel workers splitting each step's batch (1: none).
    workers: usize,
    /// Timed steps each objective ran before the next took its turn.
    turn_steps: usize,
    vocab_size: usize,
    /// Worker threads: `RAYON_NUM_THREADS` when set (the CPU backends' pool), else the cores.
    threads: usize,
    /// The matrix products' precision and the device's dense peak for it (TFLOP/s), if known.
    precision: &'static str,
    peak_tflops: Option<f64>,
    rows: Vec<BenchRow>,
    /// Peak resident memory of this process, all objectives together.
    peak_host_mib: Option<f64>,
    /// GPU memory this process holds at the end (the backends keep their pools).
    gpu_mib: Option<f64>,
}

pub fn run(args: BenchArgs) -> Result<(), Failure> {
    for (flag, value) in [
        ("--steps", args.steps),
        ("--turn-steps", args.turn_steps),
        ("--profile-steps", args.profile_steps),
    ] {
        if value == 0 {
            return Err(Failure::BadInput(anyhow!("{flag} must be at least 1")));
        }
    }
    let config = super::config(&args.common, None, None)?;
    let (device, devices) = super::open_devices(&args.common.target, args.devices.as_deref())?;
    let profile = match &args.profile {
        Some(_) if args.devices.is_some() => {
            // The profiler records the calling thread; data-parallel workers run on their own.
            return Err(Failure::BadInput(anyhow!(
                "--profile records one thread's steps: not with --devices"
            )));
        }
        Some(dir) => {
            conf_model::profiler::available(&device)
                .map_err(|e| Failure::BadInput(anyhow!("--profile: {e}")))?;
            std::fs::create_dir_all(dir).map_err(|e| anyhow!("{}: {e}", dir.display()))?;
            Some(ProfileRequest {
                dir: dir.clone(),
                steps: args.profile_steps,
            })
        }
        None => None,
    };
    let (corpus, split) = super::load_corpus_and_split(&config, &args.common.corpus)?;
    let model = config.model(corpus.vocab_size());
    let settings = BenchSettings {
        warmup_steps: args.warmup_steps,
        timed_steps: args.steps,
        batch_size: config.batch_size,
        seq_len: config.seq_len,
        seed: config.seeds[0],
        optimizer: config.optimizer(),
        execution: Execution {
            gradient_checkpointing: config.gradient_checkpointing,
            devices,
        },
        precision: config.precision,
        turn_steps: args.turn_steps,
        profile,
    };
    settings
        .execution
        .check_batch_size(config.batch_size)
        .map_err(|e| Failure::BadInput(anyhow!(e)))?;
    let peak_tflops = args.common.peak_tflops(config.precision);
    let timings = time_objectives(
        &args.objectives,
        &model,
        config.confidence(),
        &corpus,
        &split,
        &settings,
        &device,
    );
    let mut rows: Vec<BenchRow> = Vec::new();
    for (&objective, timed) in args.objectives.iter().zip(timings) {
        let tflops = timed.flops_per_token * timed.timing.tokens_per_second / 1e12;
        let row = BenchRow {
            objective,
            parameters: timed.parameters,
            relative_to_standard: None,
            flops_per_token: timed.flops_per_token,
            tflops,
            mfu: crate::peak::mfu(tflops, peak_tflops),
            timing: timed.timing,
            profile: timed.profile,
        };
        eprintln!(
            "{:<9} {:>9.1} ms/step {:>10.0} tokens/s {:>8.3} TFLOP/s  (loss {:.3})",
            objective.name(),
            row.timing.ms_per_step,
            row.timing.tokens_per_second,
            row.tflops,
            row.timing.last_lm_loss
        );
        rows.push(row);
    }
    let standard_ms = rows
        .iter()
        .find(|r| r.objective == ObjectiveKind::Standard)
        .map(|r| r.timing.ms_per_step);
    for row in &mut rows {
        row.relative_to_standard = standard_ms.map(|s| row.timing.ms_per_step / s);
    }
    let report = BenchReport {
        backend: args.common.target.backend.name().to_string(),
        device: format!("{device:?}"),
        d_model: config.d_model,
        n_layers: config.n_layers,
        n_heads: config.n_heads,
        seq_len: config.seq_len,
        batch_size: config.batch_size,
        gradient_checkpointing: config.gradient_checkpointing,
        workers: settings.execution.devices.len().max(1),
        turn_steps: settings.turn_steps,
        vocab_size: corpus.vocab_size(),
        threads: std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        precision: config.precision.name(),
        peak_tflops,
        rows,
        peak_host_mib: peak_host_mib(),
        gpu_mib: gpu_mib(),
    };
    print_table(&report);
    if let Some(path) = &args.output {
        let json = serde_json::to_vec_pretty(&report)?;
        write_atomic(path, &json).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        println!("written {}", path.display());
    }
    Ok(())
}

fn print_table(report: &BenchReport) {
    println!(
        "backend {} ({}), d {} × {} layers, {} heads, L {}, batch {}, {} threads, {} worker(s)",
        report.backend,
        report.device,
        report.d_model,
        report.n_layers,
        report.n_heads,
        report.seq_len,
        report.batch_size,
        report.threads,
        report.workers
    );
    println!(
        "| objective | ms/step | tokens/s | × standard | TFLOP/s | MFU ({}) |\n|---|---:|---:|---:|---:|---:|",
        report.precision
    );
    for row in &report.rows {
        println!(
            "| {} | {:.1} | {:.0} | {} | {:.3} | {} |",
            row.objective.name(),
            row.timing.ms_per_step,
            row.timing.tokens_per_second,
            row.relative_to_standard
                .map_or("–".into(), |r| format!("{r:.2}")),
            row.tflops,
            row.mfu
                .map_or("n/a".into(), |m| format!("{:.1}%", 100.0 * m))
        );
    }
    let mib = |m: Option<f64>| m.map_or("n/a".into(), |m| format!("{m:.0} MiB"));
    println!(
        "peak host memory {}, GPU memory held {}",
        mib(report.peak_host_mib),
        mib(report.gpu_mib)
    );
    for row in &report.rows {
        if let Some(profile) = &row.profile {
            print_profile(row.objective.name(), profile);
        }
    }
}

/// A profile's figures per step and its heaviest kernels and host operations.
fn print_profile(objective: &str, p: &ProfileSummary) {
    println!(
        "\n{objective}, profiled over {} steps ({}), per step: {:.2} ms wall, {:.0} host operations, {:.0} kernel launches, {:.0} GPU kernels, GPU busy {:.2} ms ({:.0}%)",
        p.steps,
        p.trace.display(),
        p.wall_ms,
        p.host_operations,
        p.kernel_launches,
        p.gpu_kernels,
        p.gpu_busy_ms,
        100.0 * p.gpu_busy_share
    );
    for (what, rows) in [
        ("GPU kernel", &p.top_kernels),
        ("host operation", &p.top_host_operations),
    ] {
        if rows.is_empty() {
            continue;
        }
        println!("| {what} | calls/step | ms/step |\n|---|---:|---:|");
        for row in rows {
            let name: String = row.name.chars().take(90).collect();
            println!("| {name} | {:.1} | {:.3} |", row.calls, row.ms);
        }
    }
}

/// VmHWM of /proc/self/status (Linux).
fn peak_host_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// This process's GPU memory as nvidia-smi reports it, where there is an NVIDIA driver.
fn gpu_mib() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    let pid = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let (p, used) = line.split_once(',')?;
            (p.trim() == pid).then(|| used.trim().parse().ok())?
        })
}
