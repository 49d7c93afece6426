//! Training steps under libtorch's profiler (`conf_model::profiler`, the tch backends), kept as
//! a Chrome trace and summarised from it: per step, the wall time, the operations the host
//! called, the kernels it launched, how long the GPU was busy, and where that time went.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use conf_model::profiler::LibtorchProfile;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Rows kept in each of the summary's tables.
const TOP_ROWS: usize = 15;

/// Where traces go and how many steps each records (after the timed ones).
#[derive(Debug, Clone)]
pub struct ProfileRequest {
    pub dir: PathBuf,
    pub steps: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{0}")]
    Unavailable(String),
    #[error("{path}: {message}")]
    Trace { path: PathBuf, message: String },
}

/// A profile of `steps` steps, all figures per step (µs as ms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileSummary {
    pub steps: usize,
    /// The Chrome trace this summarises.
    pub trace: PathBuf,
    /// From the first recorded event to the last.
    pub wall_ms: f64,
    /// libtorch operations the host called, outermost only (an operation inside another, as
    /// `aten::addmm` inside `aten::linear`, counts in its caller's time).
    pub host_operations: f64,
    /// Kernel launches the host made (the CUDA runtime's and driver's launch calls).
    pub kernel_launches: f64,
    pub gpu_kernels: f64,
    /// Time the GPU ran at least one kernel, copy or fill.
    pub gpu_busy_ms: f64,
    /// `gpu_busy_ms` over `wall_ms`: well under 1 when the GPU waits for the host.
    pub gpu_busy_share: f64,
    /// The GPU's kernels with the most time, most first.
    pub top_kernels: Vec<ProfileRow>,
    /// The host's outermost operations with the most time, most first.
    pub top_host_operations: Vec<ProfileRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileRow {
    pub name: String,
    pub calls: f64,
    pub ms: f64,
}

/// Runs `steps` calls of `step` under libtorch's profiler on `device`, writes the trace to
/// `trace` (atomically) and returns its summary.
pub fn profile_steps(
    device: &Device,
    steps: usize,
    trace: &Path,
    mut step: impl FnMut(),
) -> Result<ProfileSummary, ProfileError> {
    let failed = |message: String| ProfileError::Trace {
        path: trace.to_path_buf(),
        message,
    };
    let partial = trace.with_extension("json.part");
    let profile = LibtorchProfile::start(device).map_err(ProfileError::Unavailable)?;
    for _ in 0..steps {
        step();
    }
    profile.save(&partial).map_err(failed)?;
    let summary = fs::read(&partial)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
        .and_then(|json| summarize(&json, steps, trace))
        .map_err(failed)?;
    fs::rename(&partial, trace).map_err(|e| failed(e.to_string()))?;
    Ok(summary)
}

/// One complete event of a Chrome trace (`"ph": "X"`): its category, name and span in µs.
struct Span<'a> {
    category: &'a str,
    name: &'a str,
    thread: String,
    start: f64,
    duration: f64,
}

/// The summary of a Kineto Chrome trace recording `steps` steps.
pub fn summarize(trace: &Value, steps: usize, path: &Path) -> Result<ProfileSummary, String> {
    let events = trace["traceEvents"]
        .as_array()
        .ok_or("no traceEvents: not a Chrome trace")?;
    let spans: Vec<Span> = events
        .iter()
        .filter(|e| e["ph"] == "X")
        .filter_map(|e| {
            Some(Span {
                category: e["cat"].as_str()?,
                name: e["name"].as_str()?,
                thread: format!("{}/{}", e["pid"], e["tid"]),
                start: e["ts"].as_f64()?,
                duration: e["dur"].as_f64()?,
            })
        })
        .collect();
    let per_step = 1.0 / steps.max(1) as f64;
    let wall_us = match (
        spans.iter().map(|s| s.start).reduce(f64::min),
        spans.iter().map(|s| s.start + s.duration).reduce(f64::max),
    ) {
        (Some(first), Some(last)) => last - first,
        _ => 0.0,
    };
    let on_gpu = |s: &&Span| matches!(s.category, "kernel" | "gpu_memcpy" | "gpu_memset");
    let kernels: Vec<&Span> = spans.iter().filter(|s| s.category == "kernel").collect();
    let gpu_busy_us = union_length(spans.iter().filter(on_gpu).map(|s| (s.start, s.duration)));
    let host = outermost(spans.iter().filter(|s| s.category == "cpu_op"));
    let launches = spans
        .iter()
        .filter(|s| matches!(s.category, "cuda_runtime" | "cuda_driver"))
        .filter(|s| s.name.contains("LaunchKernel"))
        .count();
    Ok(ProfileSummary {
        steps,
        trace: path.to_path_buf(),
        wall_ms: wall_us * per_step / 1e3,
        host_operations: host.len() as f64 * per_step,
        kernel_launches: launches as f64 * per_step,
        gpu_kernels: kernels.len() as f64 * per_step,
        gpu_busy_ms: gpu_busy_us * per_step / 1e3,
        gpu_busy_share: if wall_us > 0.0 {
            gpu_busy_us / wall_us
        } else {
            0.0
        },
        top_kernels: top_rows(&kernels, per_step),
        top_host_operations: top_rows(&host, per_step),
    })
}

/// The spans no other span of their thread encloses.
fn outermost<'a, 'b>(spans: impl Iterator<Item = &'b Span<'a>>) -> Vec<&'b Span<'a>> {
    let mut by_thread: HashMap<&str, Vec<&Span>> = HashMap::new();
    for span in spans {
        by_thread.entry(&span.thread).or_default().push(span);
    }
    let mut kept = Vec::new();
    for mut thread in by_thread.into_values() {
        // Enclosing spans first where two start together.
        thread.sort_by(|a, b| {
            a.start
                .total_cmp(&b.start)
                .then(b.duration.total_cmp(&a.duration))
        });
        let mut end = f64::NEG_INFINITY;
        for span in thread {
            if span.start >= end {
                end = span.start + span.duration;
                kept.push(span);
            }
        }
    }
    kept
}

/// The total length of the union of `(start, duration)` intervals.
fn union_length(intervals: impl Iterator<Item = (f64, f64)>) -> f64 {
    let mut intervals: Vec<(f64, f64)> = intervals.map(|(s, d)| (s, s + d)).collect();
    intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut current: Option<(f64, f64)> = None;
    for (start, end) in intervals {
        current = match current {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                total += e - s;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    total + current.map_or(0.0, |(s, e)| e - s)
}

/// Spans grouped by name, most total time first, the first [`TOP_ROWS`].
fn top_rows(spans: &[&Span], per_step: f64) -> Vec<ProfileRow> {
    let mut by_name: HashMap<&str, (usize, f64)> = HashMap::new();
    for span in spans {
        let row = by_name.entry(span.name).or_default();
        row.0 += 1;
        row.1 += span.duration;
    }
    let mut rows: Vec<ProfileRow> = by_name
        .into_iter()
        .map(|(name, (calls, us))| ProfileRow {
            name: name.to_string(),
            calls: calls as f64 * per_step,
            ms: us * per_step / 1e3,
        })
        .collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
    rows.truncate(TOP_ROWS);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(cat: &str, name: &str, tid: u32, ts: f64, dur: f64) -> Value {
        json!({"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur})
    }

    #[test]
    fn a_trace_is_summarised_per_step_with_nested_operations_and_overlapping_kernels_once() {
        let trace = json!({"traceEvents": [
            // Step 1 on thread 1: a linear enclosing its addmm, then an AdamW update.
            event("cpu_op", "aten::linear", 1, 0.0, 100.0),
            event("cpu_op", "aten::addmm", 1, 0.0, 80.0),
            event("cpu_op", "aten::_fused_adamw_", 1, 100.0, 50.0),
            event("cuda_runtime", "cudaLaunchKernel", 1, 10.0, 5.0),
            event("cuda_runtime", "cudaMemcpyAsync", 1, 20.0, 5.0),
            // Step 2, another linear; an operation on a second thread is outermost there.
            event("cpu_op", "aten::linear", 1, 200.0, 100.0),
            event("cpu_op", "aten::mm", 2, 210.0, 10.0),
            event("cuda_driver", "cuLaunchKernel", 1, 220.0, 5.0),
            // Kernels overlapping on two streams (busy 30..90 once), a copy, and a fill.
            event("kernel", "gemm", 7, 30.0, 50.0),
            event("kernel", "gemm", 8, 40.0, 50.0),
            event("gpu_memcpy", "Memcpy HtoD", 7, 150.0, 10.0),
            event("gpu_memset", "Memset", 7, 390.0, 10.0),
            // Not complete events: ignored.
            {"ph": "M", "name": "process_name", "pid": 1},
            {"ph": "f", "cat": "ac2g", "name": "flow", "pid": 1, "tid": 1, "ts": 5.0},
        ]});
        let s = summarize(&trace, 2, Path::new("t.json")).unwrap();
        assert_eq!(s.steps, 2);
        assert_eq!(s.wall_ms, 400.0 / 2.0 / 1e3);
        assert_eq!(
            s.host_operations,
            4.0 / 2.0,
            "two linears, adamw, the other thread's mm"
        );
        assert_eq!(
            s.kernel_launches,
            2.0 / 2.0,
            "runtime and driver launches, not copies"
        );
        assert_eq!(s.gpu_kernels, 1.0);
        assert_eq!(s.gpu_busy_ms, (60.0 + 10.0 + 10.0) / 2.0 / 1e3);
        assert_eq!(s.gpu_busy_share, 80.0 / 400.0);
        assert_eq!(
            s.top_kernels,
            [ProfileRow {
                name: "gemm".into(),
                calls: 1.0,
                ms: 0.05
            }]
        );
        let host: Vec<(&str, f64, f64)> = s
            .top_host_operations
            .iter()
            .map(|r| (r.name.as_str(), r.calls, r.ms))
            .collect();
        assert_eq!(
            host,
            [
                ("aten::linear", 1.0, 0.1),
                ("aten::_fused_adamw_", 0.5, 0.025),
                ("aten::mm", 0.5, 0.005)
            ]
        );
    }

    #[test]
    fn what_is_not_a_chrome_trace_is_refused() {
        let error = summarize(&json!({"events": []}), 1, Path::new("t.json")).unwrap_err();
        assert!(error.contains("traceEvents"), "{error}");
    }

    #[test]
    fn the_union_of_intervals_counts_overlaps_once() {
        let length = union_length([(0.0, 10.0), (5.0, 10.0), (20.0, 1.0), (20.5, 0.1)].into_iter());
        assert_eq!(length, 15.0 + 1.0);
        assert_eq!(union_length(std::iter::empty()), 0.0);
    }
}
