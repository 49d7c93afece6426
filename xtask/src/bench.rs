//! `cargo xtask bench`: `lookahead bench` on each requested backend and the PyTorch reference
//! (`bench/reference.py`) on the same shapes and thread counts, interleaved round by round
//! (the first to run alternates), then medians, ratios and `results/bench/*.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::backend::{self, Backend, BuildEnv};

/// A benchmark shape: a preset, with the batch size overridden where it says so, and any
/// further `lookahead bench` arguments (the data and tokenizer).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub name: &'static str,
    preset: &'static str,
    batch_size: Option<usize>,
    args: &'static [&'static str],
    /// Timed steps per objective and round unless the plan says otherwise: enough for a
    /// median that is not the host's noise.
    steps: usize,
    /// Timed steps an objective runs before the next takes its turn (`--turn-steps`): turns
    /// of a few hundred milliseconds at most, so that each objective's are spread over the round.
    turn_steps: usize,
}

/// DESIGN §9's shape: the plan preset (d 128, 4 layers, L 128) at batch 16.
pub const PLAN_B16: Shape = Shape {
    name: "plan-b16",
    preset: "plan",
    batch_size: Some(16),
    args: &[],
    steps: 10,
    turn_steps: 2,
};
pub const QUICK: Shape = Shape {
    name: "quick",
    preset: "quick",
    batch_size: None,
    args: &[],
    steps: 60,
    turn_steps: 5,
};
/// The quick shape with GPT-2's 50,257-token vocabulary, where the rows of logits dominate the
/// step. Its text is tinyshakespeare: from `LOOKAHEAD_DATA`, lookahead's cache, or downloaded.
pub const QUICK_GPT2: Shape = Shape {
    name: "quick-gpt2",
    preset: "quick",
    batch_size: None,
    args: &["--tokenizer", "gpt2", "--dataset", "tinyshakespeare"],
    steps: 10,
    turn_steps: 2,
};
pub const GPU: Shape = Shape {
    name: "gpu",
    preset: "gpu",
    batch_size: None,
    args: &[],
    steps: 10,
    turn_steps: 2,
};

/// Every shape `cargo xtask bench --shape` accepts, by name.
pub const SHAPES: [Shape; 4] = [PLAN_B16, QUICK, QUICK_GPT2, GPU];

impl std::str::FromStr for Shape {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        SHAPES.into_iter().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<_> = SHAPES.iter().map(|s| s.name).collect();
            format!("unknown shape '{name}' (one of: {})", names.join(", "))
        })
    }
}

pub struct BenchPlan {
    pub backends: Vec<Backend>,
    /// Data-parallel workers per step on each backend (`lookahead bench --devices`); 1: none.
    pub workers: Vec<usize>,
    pub shapes: Vec<Shape>,
    pub threads: Vec<usize>,
    pub rounds: usize,
    /// Timed steps per objective and round; `None`: each shape's own.
    pub steps: Option<usize>,
    pub warmup_steps: usize,
}

impl BenchPlan {
    fn steps_for(&self, shape: Shape) -> usize {
        self.steps.unwrap_or(shape.steps)
    }

    /// CI's check that everything runs: one short round of the quick shape.
    pub fn smoke(backends: Vec<Backend>) -> Self {
        Self {
            backends,
            workers: vec![1],
            shapes: vec![QUICK],
            threads: vec![2],
            rounds: 1,
            steps: Some(2),
            warmup_steps: 1,
        }
    }
}

/// Who produced a timing: the PyTorch reference, or a backend of `lookahead` with its number
/// of data-parallel workers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    PyTorch,
    Lookahead { backend: Backend, workers: usize },
}

impl Source {
    /// `pytorch`, `flex`, `flex-2workers`: the key of its figures.
    fn name(self) -> String {
        match self {
            Self::PyTorch => "pytorch".into(),
            Self::Lookahead {
                backend,
                workers: 1,
            } => backend.name().into(),
            Self::Lookahead { backend, workers } => format!("{}-{workers}workers", backend.name()),
        }
    }
}

fn sources(plan: &BenchPlan, torch: bool) -> Vec<Source> {
    let lookahead = plan.backends.iter().flat_map(|&backend| {
        plan.workers
            .iter()
            .map(move |&workers| Source::Lookahead { backend, workers })
    });
    torch
        .then_some(Source::PyTorch)
        .into_iter()
        .chain(lookahead)
        .collect()
}

pub fn run(plan: &BenchPlan) -> anyhow::Result<()> {
    let env = BuildEnv::for_backends(&plan.backends)?;
    let binary = crate::build_lookahead(&plan.backends, &env)?;
    let python = backend::torch_python();
    if python.is_none() {
        eprintln!(
            "no Python with PyTorch: timing lookahead alone (cargo xtask setup --backend tch-cpu installs it)"
        );
    }
    let out_dir = crate::workspace_root().join("results/bench");
    std::fs::create_dir_all(&out_dir)?;
    for &shape in &plan.shapes {
        for &threads in &plan.threads {
            // (source, objective) → ms/step of each round; the shape as lookahead reports it.
            let mut ms: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
            let mut reports: BTreeMap<String, Vec<Value>> = BTreeMap::new();
            let mut dims: Option<Value> = None;
            for round in 0..plan.rounds {
                let mut order = sources(plan, python.is_some());
                // Round 0 needs lookahead's shape first; later rounds alternate who starts.
                if round % 2 == 0 {
                    order.rotate_left(usize::from(python.is_some()));
                }
                for source in order {
                    let report = match source {
                        Source::PyTorch => {
                            let dims = dims.as_ref().context("the shape comes from lookahead")?;
                            torch_bench(
                                python.as_ref().expect("pytorch is a source"),
                                dims,
                                shape,
                                threads,
                                plan,
                            )?
                        }
                        Source::Lookahead { backend, workers } => {
                            let report = lookahead_bench(
                                &binary,
                                &env,
                                backend.name(),
                                workers,
                                shape,
                                threads,
                                plan,
                            )?;
                            dims.get_or_insert_with(|| report.clone());
                            report
                        }
                    };
                    let source = source.name();
                    for row in report["rows"].as_array().into_iter().flatten() {
                        let objective = row["objective"].as_str().unwrap_or_default().to_string();
                        let value = row["ms_per_step"].as_f64().unwrap_or(f64::NAN);
                        ms.entry((source.clone(), objective))
                            .or_default()
                            .push(value);
                    }
                    reports.entry(source).or_default().push(report);
                }
            }
            let summary = summarise(&ms);
            print_table(shape, threads, plan.rounds, dims.as_ref(), &summary);
            let path = out_dir.join(format!("{}-threads{threads}.json", shape.name));
            let json = json!({
                "shape": shape.name,
                "threads": threads,
                "rounds": plan.rounds,
                "steps": plan.steps_for(shape),
                "warmup_steps": plan.warmup_steps,
                "turn_steps": shape.turn_steps,
                "medians": summary,
                "reports": reports,
            });
            std::fs::write(&path, serde_json::to_vec_pretty(&json)?)?;
            println!("written {}", path.display());
        }
    }
    Ok(())
}

fn lookahead_bench(
    binary: &Path,
    env: &BuildEnv,
    backend: &str,
    workers: usize,
    shape: Shape,
    threads: usize,
    plan: &BenchPlan,
) -> anyhow::Result<Value> {
    let output = tempfile_path(&format!("lookahead-{backend}-{workers}"));
    let mut command = Command::new(binary);
    command
        .args(["bench", "--backend", backend, "--preset", shape.preset])
        .args(["--steps", &plan.steps_for(shape).to_string()])
        .args(["--warmup-steps", &plan.warmup_steps.to_string()])
        .args(["--turn-steps", &shape.turn_steps.to_string()])
        .arg("--output")
        .arg(&output)
        .envs(env.vars.iter().map(|(k, v)| (k, v)))
        // Burn's CPU backend and its matrix kernels run on rayon's pool; libtorch (tch-cpu)
        // sizes its intra-op pool from OMP_NUM_THREADS, else takes every core.
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("OMP_NUM_THREADS", threads.to_string());
    if let Some(batch) = shape.batch_size {
        command.args(["--batch-size", &batch.to_string()]);
    }
    command.args(shape.args);
    if workers > 1 {
        let devices: Vec<String> = (0..workers).map(|i| i.to_string()).collect();
        command.args(["--devices", &devices.join(",")]);
    }
    let status = command.status().context("running lookahead bench")?;
    if !status.success() {
        bail!("lookahead bench --backend {backend} failed with {status}");
    }
    let text = std::fs::read_to_string(&output)
        .with_context(|| format!("reading {}", output.display()))?;
    let _ = std::fs::remove_file(&output);
    Ok(serde_json::from_str(&text)?)
}

fn torch_bench(
    python: &Path,
    dims: &Value,
    shape: Shape,
    threads: usize,
    plan: &BenchPlan,
) -> anyhow::Result<Value> {
    let arg = |key: &str| dims[key].as_u64().unwrap_or_default().to_string();
    let out = Command::new(python)
        .arg(crate::workspace_root().join("bench/reference.py"))
        .arg("bench")
        .args(["--d-model", &arg("d_model")])
        .args(["--n-layers", &arg("n_layers")])
        .args(["--n-heads", &arg("n_heads")])
        .args(["--seq-len", &arg("seq_len")])
        .args(["--batch-size", &arg("batch_size")])
        .args(["--vocab", &arg("vocab_size")])
        .args(["--threads", &threads.to_string()])
        .args(["--steps", &plan.steps_for(shape).to_string()])
        .args(["--warmup-steps", &plan.warmup_steps.to_string()])
        .args(["--turn-steps", &shape.turn_steps.to_string()])
        .output()
        .context("running bench/reference.py")?;
    if !out.status.success() {
        bail!(
            "bench/reference.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn tempfile_path(stem: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{stem}-{}.json", std::process::id()))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Per source and objective: the median ms/step, its ratio to PyTorch's standard step (of the
/// medians: another process), and the median over the rounds of its ratio to the same round's
/// standard step of the same source (one process, whose objectives took turns).
fn summarise(ms: &BTreeMap<(String, String), Vec<f64>>) -> Value {
    let rounds_of =
        |source: &str, objective: &str| ms.get(&(source.to_string(), objective.to_string()));
    let torch_standard = rounds_of("pytorch", "standard").map(|v| median(v));
    let mut out = serde_json::Map::new();
    for ((source, objective), values) in ms {
        let m = median(values);
        let own = rounds_of(source, "standard").map(|standard| {
            let ratios: Vec<f64> = values.iter().zip(standard).map(|(v, s)| v / s).collect();
            median(&ratios)
        });
        out.entry(source.clone())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object")
            .insert(
                objective.clone(),
                json!({
                    "median_ms": m,
                    "rounds_ms": values,
                    "vs_pytorch_standard": torch_standard.map(|t| m / t),
                    "vs_own_standard": own,
                }),
            );
    }
    Value::Object(out)
}

fn print_table(shape: Shape, threads: usize, rounds: usize, dims: Option<&Value>, summary: &Value) {
    let dim = |key: &str| dims.and_then(|d| d[key].as_u64()).unwrap_or_default();
    println!(
        "\n{}: d {} × {} layers, {} heads, L {}, batch {}, vocab {}; {threads} thread{}, median of {rounds} round{}",
        shape.name,
        dim("d_model"),
        dim("n_layers"),
        dim("n_heads"),
        dim("seq_len"),
        dim("batch_size"),
        dim("vocab_size"),
        if threads == 1 { "" } else { "s" },
        if rounds == 1 { "" } else { "s" },
    );
    println!("| source | objective | ms/step | × PyTorch standard | × own standard |");
    println!("|---|---|---:|---:|---:|");
    let ratio = |v: &Value| v.as_f64().map_or("–".into(), |r| format!("{r:.2}"));
    for (source, objectives) in summary.as_object().into_iter().flatten() {
        for objective in ["standard", "seed", "dense", "teacher"] {
            let Some(row) = objectives.get(objective) else {
                continue;
            };
            println!(
                "| {source} | {objective} | {:.1} | {} | {} |",
                row["median_ms"].as_f64().unwrap_or(f64::NAN),
                ratio(&row["vs_pytorch_standard"]),
                ratio(&row["vs_own_standard"]),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_name_their_backend_and_workers() {
        let named = |backend, workers| Source::Lookahead { backend, workers }.name();
        assert_eq!(named(Backend::Flex, 1), "flex");
        assert_eq!(named(Backend::Flex, 2), "flex-2workers");
        assert_eq!(named(Backend::TchCpu, 1), "tch-cpu");
        assert_eq!(named(Backend::TchCpu, 4), "tch-cpu-4workers");
        let plan = BenchPlan {
            workers: vec![1, 2],
            ..BenchPlan::smoke(vec![Backend::Flex])
        };
        let names: Vec<String> = sources(&plan, true).into_iter().map(Source::name).collect();
        assert_eq!(names, ["pytorch", "flex", "flex-2workers"]);
        let first = Source::Lookahead {
            backend: Backend::Flex,
            workers: 1,
        };
        assert_eq!(sources(&plan, false)[0], first);
    }

    #[test]
    fn medians_and_ratios_are_per_source_against_pytorch_and_its_own_standard() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let mut ms = BTreeMap::new();
        ms.insert(
            ("pytorch".into(), "standard".into()),
            vec![100.0, 120.0, 110.0],
        );
        ms.insert(
            ("pytorch".into(), "dense".into()),
            vec![170.0, 180.0, 220.0],
        );
        ms.insert(
            ("flex".into(), "standard".into()),
            vec![300.0, 330.0, 320.0],
        );
        ms.insert(("flex".into(), "dense".into()), vec![480.0, 528.0, 480.0]);
        let s = summarise(&ms);
        assert_eq!(
            s["flex"]["standard"]["vs_pytorch_standard"],
            json!(320.0 / 110.0)
        );
        assert_eq!(s["flex"]["dense"]["median_ms"], json!(480.0));
        // Each round against its own standard step: 1.6, 1.6, 1.5 (the medians' ratio is 1.5).
        assert_eq!(s["flex"]["dense"]["vs_own_standard"], json!(1.6));
        assert_eq!(s["flex"]["standard"]["vs_own_standard"], json!(1.0));
        assert_eq!(
            s["pytorch"]["dense"]["vs_own_standard"],
            json!(170.0 / 100.0)
        );
    }
}
