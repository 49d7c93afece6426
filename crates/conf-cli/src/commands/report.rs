//! `lookahead report FILE...`: plots and an HTML/Markdown report next to the first file.

use anyhow::{Context, anyhow};
use std::path::PathBuf;

use crate::Failure;

pub fn run(files: Vec<PathBuf>) -> Result<(), Failure> {
    let first = files
        .first()
        .cloned()
        .ok_or_else(|| Failure::BadInput(anyhow!("report: give at least one results file")))?;
    let loaded = files
        .iter()
        .map(|f| crate::results::load(f).map(|r| (f.clone(), r)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::BadInput(e.into()))?;
    let results = crate::report::merge(loaded).map_err(|e| Failure::BadInput(anyhow!(e)))?;
    let dir = first.parent().map(PathBuf::from).unwrap_or_default();
    let name = first
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .strip_suffix("_results.json")
        .unwrap_or(name.trim_end_matches(".json"));
    // A merged report is named after all its files, so it never replaces a single file's.
    let stem = if files.len() > 1 {
        let mut names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        names.sort();
        let digest = conf_data::sha256_hex(names.join("\n").as_bytes());
        format!("{stem}_merged-{}", &digest[..8])
    } else {
        stem.to_string()
    };
    let html = crate::report::write_report(&results, &dir, &stem)
        .with_context(|| format!("writing the report into {}", dir.display()))?;
    print!("{}", crate::report::summary_markdown(&results));
    println!("report: {}", html.display());
    Ok(())
}
