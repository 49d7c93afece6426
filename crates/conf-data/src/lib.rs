//! Data for the lookahead experiments: tokenizers, corpora (built-in synthetic source with an
//! exact oracle, named downloads, local files), splits, windows and batchers.

mod atomic;
mod corpus;
mod download;
mod error;
pub mod synthetic;
mod tokenizer;
mod tokens;
mod windows;

pub use atomic::write_atomic;
pub use corpus::{Corpus, CorpusRequest, load_corpus, meta_path};
pub use download::{RemoteCorpus, TINYSHAKESPEARE, TINYSTORIES, sha256_hex};
pub use error::DataError;
pub use tokenizer::{Tokenizer, TokenizerKind, TokenizerSpec};
pub use tokens::{TokenDtype, TokenStore, encode_bin};
pub use windows::{EvalWindows, Split, TrainWindows, Window, WindowBatch, WindowBatcher};

/// Where downloads and token caches live unless `--data-dir`/`LOOKAHEAD_CACHE` say otherwise.
pub fn default_cache_dir() -> std::path::PathBuf {
    std::env::var_os("LOOKAHEAD_CACHE")
        .map(Into::into)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|d| std::path::PathBuf::from(d).join("lookahead"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/lookahead"))
        })
        .unwrap_or_else(|| std::path::PathBuf::from(".lookahead-cache"))
}
