//! Every parser of outside input under random and damaged input: a TOML config, a results
//! file, a `.jsonl` corpus, a token `.bin` with its meta, a checkpoint's files. Each must
//! answer with an error, never a panic.

use std::path::Path;

use conf_cli::config::ConfidenceExperimentConfig;
use conf_data::{CorpusRequest, load_corpus, meta_path};
use proptest::prelude::*;

fn quick() -> ConfidenceExperimentConfig {
    conf_cli::presets::preset("quick").unwrap()
}

/// Runs `f` and fails the property, instead of aborting, if it panics.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| TestCaseError::fail(format!("{what} panicked")))
}

/// A value of a TOML type, as text.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        "[a-z\"\\[\\]{}=,. 0-9-]{0,12}".prop_map(|v| v.to_string()),
        Just("[1, 2, 2]".to_string()),
        Just("\"probe\"".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("true".to_string()),
    ]
}

fn config_key() -> impl Strategy<Value = String> {
    let keys: Vec<String> = toml::Table::try_from(quick())
        .unwrap()
        .keys()
        .cloned()
        .chain(["tokenizer".into(), "unknown".into(), "".into()])
        .collect();
    proptest::sample::select(keys)
}

/// A small valid results file, written by a tiny experiment once per test run.
fn results_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lookahead"))
            .args([
                "experiment",
                "--training-steps",
                "2",
                "--eval-interval",
                "2",
                "--seq-len",
                "8",
                "--batch-size",
                "2",
                "--seeds",
                "1",
                "--no-tui",
                "--results-dir",
            ])
            .arg(dir.path())
            .env("LOOKAHEAD_CACHE", dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with("_results.json"))
            .unwrap();
        std::fs::read_to_string(file).unwrap()
    })
}

/// `text` with the bytes in `cut` removed and `insert` put at its start.
fn damaged(text: &str, cut: std::ops::Range<usize>, insert: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let (start, end) = (cut.start.min(bytes.len()), cut.end.min(bytes.len()));
    let (start, end) = (start.min(end), end.max(start));
    let mut out = bytes[..start].to_vec();
    out.extend(insert.as_bytes());
    out.extend(&bytes[end..]);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_text_as_a_config_file_is_an_answer_not_a_panic(text in "\\PC{0,80}") {
        no_panic("with_toml", || quick().with_toml(&text, Path::new("fuzz.toml")))?.ok();
    }

    #[test]
    fn any_key_with_any_value_is_accepted_or_named(
        lines in proptest::collection::vec((config_key(), toml_value()), 1..6)
    ) {
        let text: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        if let Ok(config) = no_panic("with_toml", || quick().with_toml(&text, Path::new("f.toml")))? {
            no_panic("validate", || config.validate())?.ok();
        }
    }

    #[test]
    fn a_damaged_results_file_is_rejected_naming_it(
        start in 0usize..20_000, len in 0usize..200, insert in "\\PC{0,8}"
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x_results.json");
        std::fs::write(&path, damaged(results_text(), start..start + len, &insert)).unwrap();
        if let Err(e) = no_panic("results::load", || conf_cli::results::load(&path))? {
            prop_assert!(e.to_string().contains("x_results.json"), "{e}");
        }
    }

    #[test]
    fn any_jsonl_corpus_loads_or_is_an_error(lines in proptest::collection::vec("\\PC{0,30}", 0..8)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        let request = CorpusRequest::new(path.to_str().unwrap(), dir.path());
        no_panic("load_corpus(.jsonl)", || load_corpus(&request))?.ok();
    }

    #[test]
    fn any_token_bin_and_meta_load_or_are_an_error(
        bin in proptest::collection::vec(any::<u8>(), 0..64),
        meta in prop_oneof![
            "\\PC{0,40}",
            (any::<u8>(), any::<u8>()).prop_map(|(v, c)| format!(
                "{{\"tokenizer\": {{\"kind\": \"byte\"}}, \"vocab_size\": {v}, \"count\": {c}, \"dtype\": \"u16\"}}"
            )),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        std::fs::write(&path, &bin).unwrap();
        std::fs::write(meta_path(&path), &meta).unwrap();
        let request = CorpusRequest::new(path.to_str().unwrap(), dir.path());
        no_panic("load_corpus(.bin)", || load_corpus(&request))?.ok();
    }

    #[test]
    fn a_damaged_checkpoint_is_an_error(
        state in "\\PC{0,60}",
        model in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let set = dir.path().join("step-0000001");
        std::fs::create_dir_all(&set).unwrap();
        std::fs::write(dir.path().join("latest"), "step-0000001").unwrap();
        std::fs::write(set.join("state.json"), &state).unwrap();
        std::fs::write(set.join("model.bpk"), &model).unwrap();
        std::fs::write(set.join("optimizer.bpk"), &model).unwrap();
        let restored = no_panic("checkpoint::restore", || conf_train::checkpoint::restore(dir.path()))?;
        prop_assert!(restored.is_err());
    }
}
