//! `lookahead report FILE...`: plots (SVG via plotters) and a self-contained HTML report plus
//! a Markdown summary next to the first file. Several files from separate seed runs of the
//! same configuration merge into one report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use conf_data::write_atomic;
use plotters::prelude::*;

use conf_train::stop::RunStatus;

use crate::results::{ExperimentResults, ExperimentStatus, Summary, TrainingResult};

type Series = Vec<(f64, f64)>;

/// Merges the results files of one configuration (seeds aside) into one, recomputing the
/// summary. Files whose configurations differ in anything else are refused, naming the key; a
/// seed found in several files counts once: its complete run, else the first file's.
pub fn merge(files: Vec<(PathBuf, ExperimentResults)>) -> Result<ExperimentResults, String> {
    let mut files = files.into_iter();
    let (first_path, mut merged) = files.next().ok_or("no results file to merge")?;
    let mut sources: BTreeMap<(&'static str, String), PathBuf> = BTreeMap::new();
    for (model, runs) in [
        ("standard", &merged.standard_model_results),
        ("confidence", &merged.confidence_model_results),
    ] {
        for seed in runs.keys() {
            sources.insert((model, seed.clone()), first_path.clone());
        }
    }
    for (path, other) in files {
        if let Some(difference) = config_difference(&merged.config, &other.config) {
            return Err(format!(
                "{} and {} cannot share a report: {difference}; only the seeds (and where outputs went) may differ",
                first_path.display(),
                path.display()
            ));
        }
        if (&other.backend, &other.device) != (&merged.backend, &merged.device) {
            tracing::warn!(
                "{} ran on {} ({}), {} on {} ({}): the report lists the first",
                first_path.display(),
                merged.backend,
                merged.device,
                path.display(),
                other.backend,
                other.device
            );
        }
        for (model, runs, into) in [
            (
                "standard",
                other.standard_model_results,
                &mut merged.standard_model_results,
            ),
            (
                "confidence",
                other.confidence_model_results,
                &mut merged.confidence_model_results,
            ),
        ] {
            for (seed, run) in runs {
                let key = (model, seed.clone());
                match into.get(&seed) {
                    None => {
                        into.insert(seed, run);
                        sources.insert(key, path.clone());
                    }
                    Some(kept) => {
                        let replace =
                            kept.status != RunStatus::Complete && run.status == RunStatus::Complete;
                        let (kept_from, dropped_from) = if replace {
                            (path.clone(), sources[&key].clone())
                        } else {
                            (sources[&key].clone(), path.clone())
                        };
                        tracing::warn!(
                            "seed {seed}'s {model} run is in {} and {}: counted once, from {}",
                            kept_from.display(),
                            dropped_from.display(),
                            kept_from.display()
                        );
                        if replace {
                            into.insert(seed, run);
                            sources.insert(key, path.clone());
                        }
                    }
                }
            }
        }
        merged.config.seeds.extend(other.config.seeds);
    }
    merged.config.seeds.sort_unstable();
    merged.config.seeds.dedup();
    let complete = |runs: &BTreeMap<String, TrainingResult>, seed: &u64| {
        runs.get(&seed.to_string())
            .is_some_and(|r| r.status == RunStatus::Complete)
    };
    merged.status = if merged.config.seeds.iter().all(|s| {
        complete(&merged.standard_model_results, s) && complete(&merged.confidence_model_results, s)
    }) {
        ExperimentStatus::Complete
    } else {
        ExperimentStatus::Incomplete
    };
    merged.training_time = merged.training_time_by_model();
    merged.summary = Summary::new(
        &merged.standard_model_results,
        &merged.confidence_model_results,
    );
    Ok(merged)
}

/// The first configuration key (as written in a config file) in which `b` differs from `a`,
/// the seeds and the output places aside.
fn config_difference(
    a: &crate::config::ConfidenceExperimentConfig,
    b: &crate::config::ConfidenceExperimentConfig,
) -> Option<String> {
    let comparable = |c: &crate::config::ConfidenceExperimentConfig| {
        let mut c = c.without_execution();
        c.seeds.clear();
        c.results_dir = PathBuf::new();
        c.save_interval = 0;
        serde_json::to_value(c).expect("a configuration serialises")
    };
    let (a, b) = (comparable(a), comparable(b));
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return (a != b).then(|| "the configurations differ".into());
    };
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter().find_map(|key| {
        let (x, y) = (a.get(key), b.get(key));
        (x != y).then(|| {
            let show = |v: Option<&serde_json::Value>| v.map_or("absent".into(), |v| v.to_string());
            format!(
                "config key `{key}` is {} in the first, {} in the other",
                show(x),
                show(y)
            )
        })
    })
}

fn svg(
    size: (u32, u32),
    draw: impl FnOnce(
        DrawingArea<SVGBackend, plotters::coord::Shift>,
    ) -> Result<(), Box<dyn std::error::Error + '_>>,
) -> String {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size).into_drawing_area();
        if let Err(e) = draw(root) {
            tracing::warn!("a plot could not be drawn: {e}");
        }
    }
    out
}

fn bounds(
    points: impl Iterator<Item = (f64, f64)> + Clone,
) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for (x, y) in points.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        return (0.0..1.0, 0.0..1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    (x0..x1.max(x0 + 1e-9), (y0 - pad)..(y1 + pad))
}

/// Mean line with a min–max band across seeds, per model; `x_label` writes the x-axis ticks.
fn band_chart(
    title: &str,
    (x_desc, x_label): (&str, fn(&f64) -> String),
    y_desc: &str,
    models: &[(&str, RGBColor, Vec<Series>)],
) -> String {
    let all = models
        .iter()
        .flat_map(|(_, _, runs)| runs.iter().flatten().copied());
    let (xr, yr) = bounds(all);
    svg((720, 420), |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(xr, yr)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .x_labels(6)
            .x_label_formatter(&x_label)
            .y_desc(y_desc)
            .draw()?;
        for (name, color, runs) in models {
            let Some(first) = runs.first() else { continue };
            let at = |i: usize| {
                runs.iter()
                    .filter_map(|r| r.get(i).map(|p| p.1))
                    .collect::<Vec<_>>()
            };
            let xs: Vec<f64> = first.iter().map(|p| p.0).collect();
            let mean: Series = xs
                .iter()
                .enumerate()
                .map(|(i, &x)| (x, at(i).iter().sum::<f64>() / at(i).len() as f64))
                .collect();
            let mut band: Series = xs
                .iter()
                .enumerate()
                .map(|(i, &x)| (x, at(i).iter().cloned().fold(f64::INFINITY, f64::min)))
                .collect();
            band.extend(
                xs.iter()
                    .enumerate()
                    .rev()
                    .map(|(i, &x)| (x, at(i).iter().cloned().fold(f64::NEG_INFINITY, f64::max))),
            );
            chart.draw_series(std::iter::once(Polygon::new(band, color.mix(0.2))))?;
            let color = *color;
            chart
                .draw_series(LineSeries::new(mean, color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
        Ok(())
    })
}

/// A step count as the axis shows it.
fn step_label(x: &f64) -> String {
    format!("{x:.0}")
}

/// A large count with an SI prefix (`3.2T`), so that FLOP ticks stay short.
fn si_label(x: &f64) -> String {
    let magnitude = x.abs();
    let (value, prefix) = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(scale, _)| magnitude >= scale)
        .map_or((*x, ""), |(scale, p)| (x / scale, p));
    format!("{value:.1}{prefix}")
}

fn reliability_chart(runs: &BTreeMap<String, TrainingResult>) -> String {
    let points: Vec<(f64, f64)> = runs
        .values()
        .flat_map(|r| {
            r.calibration_bins
                .iter()
                .flatten()
                .map(|b| (b.mean_predicted, b.mean_actual))
        })
        .collect();
    let (xr, yr) = bounds(points.iter().copied());
    let lo = xr.start.min(yr.start);
    let hi = xr.end.max(yr.end);
    svg((480, 480), |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Reliability: predicted vs actual future loss",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(lo..hi, lo..hi)?;
        chart
            .configure_mesh()
            .x_desc("mean predicted (nats)")
            .y_desc("mean actual (nats)")
            .draw()?;
        chart.draw_series(LineSeries::new(vec![(lo, lo), (hi, hi)], BLACK.mix(0.4)))?;
        for (i, (seed, r)) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let bins: Series = r
                .calibration_bins
                .iter()
                .flatten()
                .map(|b| (b.mean_predicted, b.mean_actual))
                .collect();
            chart
                .draw_series(LineSeries::new(bins.clone(), color))?
                .label(format!("seed {seed}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(bins.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
        Ok(())
    })
}

fn scatter_chart(runs: &BTreeMap<String, TrainingResult>) -> String {
    let points: Vec<(f64, f64)> = runs
        .values()
        .flat_map(|r| {
            let p = r.confidence_predictions.iter().flatten();
            let a = r.actual_future_losses.iter().flatten();
            p.zip(a).map(|(&p, &a)| (p as f64, a as f64))
        })
        .collect();
    let (xr, yr) = bounds(points.iter().copied());
    svg((480, 480), |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Predicted vs actual future loss", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(xr, yr)?;
        chart
            .configure_mesh()
            .x_desc("predicted (nats)")
            .y_desc("actual (nats)")
            .draw()?;
        chart.draw_series(
            points
                .iter()
                .map(|&p| Circle::new(p, 2, BLUE.mix(0.25).filled())),
        )?;
        root.present()?;
        Ok(())
    })
}

/// One bar per model, in the colours every other chart gives them.
fn time_chart(training_time: &BTreeMap<String, f64>) -> String {
    let bars: Vec<(&str, f64, RGBColor)> = [("standard", RED), ("confidence", BLUE)]
        .into_iter()
        .filter_map(|(model, color)| training_time.get(model).map(|&t| (model, t, color)))
        .collect();
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
    svg((480, 300), |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Training time (all seeds)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            // A segmented 0..=n has n + 1 segments: one per bar.
            .build_cartesian_2d((0..bars.len().max(1) - 1).into_segmented(), 0f64..max * 1.1)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len())
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => bars.get(*i).map_or("", |b| b.0).to_string(),
                _ => String::new(),
            })
            .y_desc("seconds")
            .draw()?;
        chart.draw_series(bars.iter().enumerate().map(|(i, &(_, t, color))| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), t),
                ],
                color.filled(),
            );
            bar.set_margin(0, 0, 30, 30);
            bar
        }))?;
        root.present()?;
        Ok(())
    })
}

fn loss_series(
    runs: &BTreeMap<String, TrainingResult>,
    x_of: impl Fn(&TrainingResult, usize) -> f64,
) -> Vec<Series> {
    runs.values()
        .map(|r| {
            r.loss_history
                .iter()
                .map(|p| (x_of(r, p.step), p.eval_loss))
                .collect()
        })
        .collect()
}

/// Writes `{stem}_report.html` and `{stem}_report.md` into `dir`; returns the HTML path.
pub fn write_report(
    results: &ExperimentResults,
    dir: &Path,
    stem: &str,
) -> std::io::Result<PathBuf> {
    let std_runs = &results.standard_model_results;
    let conf_runs = &results.confidence_model_results;
    let tokens_per_step = (results.config.batch_size * results.config.seq_len) as f64;
    let vs_steps = band_chart(
        "Evaluation loss (mean and range over seeds)",
        ("step", step_label),
        "nats/token",
        &[
            ("standard", RED, loss_series(std_runs, |_, s| s as f64)),
            ("confidence", BLUE, loss_series(conf_runs, |_, s| s as f64)),
        ],
    );
    let vs_flops = band_chart(
        "Evaluation loss vs training FLOPs",
        ("FLOPs", si_label),
        "nats/token",
        &[
            (
                "standard",
                RED,
                loss_series(std_runs, |r, s| {
                    r.flops_per_token * tokens_per_step * s as f64
                }),
            ),
            (
                "confidence",
                BLUE,
                loss_series(conf_runs, |r, s| {
                    r.flops_per_token * tokens_per_step * s as f64
                }),
            ),
        ],
    );
    let conf_loss: Vec<Series> = conf_runs
        .values()
        .map(|r| {
            r.confidence_loss_history
                .iter()
                .flatten()
                .map(|p| (p.step as f64, p.value))
                .collect()
        })
        .collect();
    let conf_chart = band_chart(
        "Confidence MSE over training",
        ("step", step_label),
        "nats²",
        &[("confidence", BLUE, conf_loss)],
    );
    let markdown = summary_markdown(results);
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>lookahead report</title>\
         <style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block;margin:0.5em}}</style></head><body>\
         <h1>lookahead report</h1><p>{} seeds; objective {:?}; dataset {}; backend {}; {}; git {}</p>\
         <h2>Summary</h2>{}<h2>Plots</h2><figure>{vs_steps}</figure><figure>{vs_flops}</figure>\
         <figure>{}</figure><figure>{}</figure><figure>{conf_chart}</figure><figure>{}</figure>\
         <h2>Samples (first seed)</h2>{}</body></html>",
        results.config.seeds.len(),
        results.config.objective,
        html_escape(&results.config.dataset),
        results.backend,
        results.timestamp,
        results.git_commit.as_deref().unwrap_or("unknown"),
        markdown_table_to_html(&markdown),
        reliability_chart(conf_runs),
        scatter_chart(conf_runs),
        time_chart(&results.training_time),
        samples_html(results),
    );
    let html_path = dir.join(format!("{stem}_report.html"));
    write_atomic(&html_path, html.as_bytes())?;
    write_atomic(&dir.join(format!("{stem}_report.md")), markdown.as_bytes())?;
    Ok(html_path)
}

/// Each model's sample; the confidence model's tokens are shaded by predicted loss (darker =
/// higher) with the value on hover.
fn samples_html(results: &ExperimentResults) -> String {
    let mut html = String::new();
    for (name, runs) in [
        ("standard", &results.standard_model_results),
        ("confidence", &results.confidence_model_results),
    ] {
        let Some(r) = runs.values().next() else {
            continue;
        };
        let s = &r.sample;
        html += &format!("<p><b>{name}</b>: <code>{}</code>", html_escape(&s.prompt));
        match &s.predicted_loss {
            Some(losses) => {
                let max = losses.iter().cloned().fold(1e-6, f32::max);
                for (token, loss) in s.tokens.iter().zip(losses) {
                    let alpha = (loss / max).clamp(0.0, 1.0) * 0.6;
                    html += &format!(
                        "<code style=\"background:rgba(220,60,60,{alpha:.2})\" title=\"predicted loss {loss:.3}\">{}</code>",
                        html_escape(token)
                    );
                }
            }
            None => html += &format!("<code>{}</code>", html_escape(&s.tokens.concat())),
        }
        html += "</p>";
    }
    html
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The final evaluation, one metric a line, so that it stays on screen after the dashboard
/// closes.
pub fn print_metrics(values: &conf_train::metrics::MetricValues) {
    println!("final evaluation:");
    for (kind, value) in values {
        println!("  {:<20} {value:.4}", kind.name());
    }
}

/// The summary as a Markdown table (also printed to the terminal).
pub fn summary_markdown(results: &ExperimentResults) -> String {
    use conf_train::metrics::MetricKind;
    let s = &results.summary;
    let show = |stats: Option<&crate::stats::SeedStats>| match stats {
        Some(st) => match st.ci95 {
            Some(ci) => format!("{:.4} ± {:.4}", st.mean, ci),
            None => format!("{:.4}", st.mean),
        },
        None => "—".into(),
    };
    let mut out = String::new();
    for caveat in results.caveats() {
        out += &format!("> **{caveat}**\n");
    }
    if !out.is_empty() {
        out += "\n";
    }
    out += "| metric | standard | confidence | confidence − standard (p) |\n|---|---|---|---|\n";
    for kind in [
        MetricKind::LmLoss,
        MetricKind::Perplexity,
        MetricKind::Accuracy,
        MetricKind::TokenEce,
    ] {
        let name = kind.name();
        let diff = s.paired_difference.get(&kind).map_or("—".into(), |d| {
            let p = d.p_value.map_or("n/a".into(), |p| format!("{p:.3}"));
            format!("{} ({p})", show(Some(&d.difference)))
        });
        out += &format!(
            "| {name} | {} | {} | {diff} |\n",
            show(s.standard.get(&kind)),
            show(s.confidence.get(&kind))
        );
    }
    for kind in [
        MetricKind::ConfidenceLoss,
        MetricKind::LossEce,
        MetricKind::Spearman,
        MetricKind::EntropySpearman,
        MetricKind::Auroc,
        MetricKind::EntropyAuroc,
    ] {
        let name = kind.name();
        out += &format!("| {name} | — | {} | — |\n", show(s.confidence.get(&kind)));
    }
    out
}

/// The summary's caveats as warning paragraphs, then its table.
fn markdown_table_to_html(markdown: &str) -> String {
    let mut html = String::new();
    for caveat in markdown.lines().filter_map(|l| l.strip_prefix("> ")) {
        html += &format!(
            "<p style=\"color:#a00;font-weight:bold\">{}</p>",
            html_escape(caveat.trim_matches('*'))
        );
    }
    html += "<table>";
    let table = markdown.lines().filter(|l| l.starts_with('|'));
    for (i, line) in table.enumerate() {
        if i == 1 {
            continue; // the |---| separator
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let tag = if i == 0 { "th" } else { "td" };
        html += "<tr>";
        for cell in cells {
            html += &format!("<{tag}>{}</{tag}>", html_escape(cell));
        }
        html += "</tr>";
    }
    html + "</table>"
}
