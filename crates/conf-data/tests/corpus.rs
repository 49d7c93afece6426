//! Loading corpora: named, local files, token caches, and every bad input.

use std::fs;
use std::path::{Path, PathBuf};

use conf_data::*;

fn shakespeare() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/tinyshakespeare.txt")
}

fn request(dataset: &str, cache: &Path) -> CorpusRequest {
    CorpusRequest::new(dataset, cache)
}

#[test]
fn tinyshakespeare_by_name_from_the_data_dir_has_65_characters() {
    let cache = tempfile::tempdir().unwrap();
    let mut req = request("tinyshakespeare", cache.path());
    req.data_dir = shakespeare().parent().map(Path::to_path_buf);
    let corpus = load_corpus(&req).unwrap();
    assert_eq!(corpus.vocab_size(), 65);
    assert_eq!(corpus.len(), 1_115_394);
    let head = corpus.tokenizer.build().decode(&corpus.tokens.slice(0..14));
    assert_eq!(head, "First Citizen:");
}

#[test]
fn a_second_load_maps_the_cached_tokens_and_gives_the_same_ids() {
    let cache = tempfile::tempdir().unwrap();
    let mut req = request(shakespeare().to_str().unwrap(), cache.path());
    req.tokenizer = Some(TokenizerKind::Gpt2);
    let first = load_corpus(&req).unwrap();
    assert!(matches!(*first.tokens, TokenStore::Owned(_)));
    let second = load_corpus(&req).unwrap();
    assert!(matches!(*second.tokens, TokenStore::Mapped { .. }));
    assert_eq!(first.len(), second.len());
    assert_eq!(
        first.tokens.slice(0..first.len()),
        second.tokens.slice(0..second.len())
    );
    assert_eq!(second.tokenizer, TokenizerSpec::Gpt2);
}

#[test]
fn directory_and_jsonl_sources_join_their_documents() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    fs::create_dir(&docs).unwrap();
    fs::write(docs.join("b.txt"), "second").unwrap();
    fs::write(docs.join("a.txt"), "first").unwrap();
    fs::write(docs.join("skip.md"), "ignored").unwrap();
    let jsonl = dir.path().join("docs.jsonl");
    fs::write(
        &jsonl,
        "{\"text\": \"first\"}\n\n{\"text\": \"second\", \"id\": 2}\n",
    )
    .unwrap();
    for source in [docs, jsonl] {
        let mut req = request(source.to_str().unwrap(), dir.path());
        req.tokenizer = Some(TokenizerKind::Byte);
        let corpus = load_corpus(&req).unwrap();
        let text = corpus
            .tokenizer
            .build()
            .decode(&corpus.tokens.slice(0..corpus.len()));
        assert_eq!(text, "first\n\nsecond");
    }
}

#[test]
fn a_bin_with_its_meta_is_memory_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("ids.bin");
    let ids: Vec<u32> = (0..1000).map(|i| (i * 37) % 50257).collect();
    fs::write(&bin, encode_bin(&ids, TokenDtype::U16)).unwrap();
    fs::write(
        meta_path(&bin),
        r#"{"dtype": "u16", "vocab_size": 50257, "tokenizer": {"kind": "gpt2"}}"#,
    )
    .unwrap();
    let corpus = load_corpus(&request(bin.to_str().unwrap(), dir.path())).unwrap();
    assert!(matches!(*corpus.tokens, TokenStore::Mapped { .. }));
    assert_eq!(corpus.tokens.slice(0..1000), ids);
    assert_eq!(corpus.vocab_size(), 50257);
}

fn error_of(dataset: &str, dir: &Path) -> String {
    load_corpus(&request(dataset, dir)).unwrap_err().to_string()
}

#[test]
fn a_token_id_outside_the_vocabulary_is_reported_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("ids.bin");
    fs::write(&bin, encode_bin(&[1, 2, 300, 4], TokenDtype::U32)).unwrap();
    fs::write(
        meta_path(&bin),
        r#"{"dtype": "u32", "vocab_size": 256, "tokenizer": {"kind": "byte"}}"#,
    )
    .unwrap();
    let err = error_of(bin.to_str().unwrap(), dir.path());
    assert!(
        err.contains("ids.bin")
            && err.contains("300")
            && err.contains("position 2")
            && err.contains("256"),
        "{err}"
    );
}

#[test]
fn a_bin_without_meta_or_with_ragged_length_is_rejected_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("ids.bin");
    fs::write(&bin, [1u8, 0, 2]).unwrap();
    let err = error_of(bin.to_str().unwrap(), dir.path());
    assert!(err.contains("ids.json") && err.contains("dtype"), "{err}");
    fs::write(
        meta_path(&bin),
        r#"{"dtype": "u16", "vocab_size": 256, "tokenizer": {"kind": "byte"}}"#,
    )
    .unwrap();
    let err = error_of(bin.to_str().unwrap(), dir.path());
    assert!(
        err.contains("ids.bin") && err.contains("3 bytes") && err.contains("2-byte"),
        "{err}"
    );
}

#[test]
fn missing_empty_and_non_utf8_files_name_the_file_and_place() {
    let dir = tempfile::tempdir().unwrap();
    let missing = error_of("no/such/corpus.txt", dir.path());
    assert!(
        missing.contains("--dataset") && missing.contains("no/such/corpus.txt"),
        "{missing}"
    );

    let empty = dir.path().join("empty.txt");
    fs::write(&empty, "").unwrap();
    let err = error_of(empty.to_str().unwrap(), dir.path());
    assert!(err.contains("empty.txt") && err.contains("empty"), "{err}");

    let bad = dir.path().join("bad.txt");
    fs::write(&bad, b"line one\nab\xffcd").unwrap();
    let err = error_of(bad.to_str().unwrap(), dir.path());
    assert!(
        err.contains("bad.txt")
            && err.contains("byte 11")
            && err.contains("line 2")
            && err.contains("column 3"),
        "{err}"
    );

    let jsonl = dir.path().join("bad.jsonl");
    fs::write(&jsonl, "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n").unwrap();
    let err = error_of(jsonl.to_str().unwrap(), dir.path());
    assert!(
        err.contains("bad.jsonl:2") && err.contains("\"text\""),
        "{err}"
    );

    let empty_dir = dir.path().join("nothing");
    fs::create_dir(&empty_dir).unwrap();
    let err = error_of(empty_dir.to_str().unwrap(), dir.path());
    assert!(err.contains("nothing") && err.contains(".txt"), "{err}");
}

#[test]
fn the_synthetic_corpus_only_takes_its_own_character_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = request("synthetic", dir.path());
    let corpus = load_corpus(&req).unwrap();
    assert_eq!(corpus.vocab_size(), 32);
    assert!(corpus.oracle.is_some());
    req.tokenizer = Some(TokenizerKind::Gpt2);
    let err = load_corpus(&req).unwrap_err().to_string();
    assert!(
        err.contains("--tokenizer") && err.contains("gpt2") && err.contains("32"),
        "{err}"
    );
}
