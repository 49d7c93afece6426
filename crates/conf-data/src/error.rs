use std::path::PathBuf;

use thiserror::Error;

/// Every way preparing data can fail; each message names the file, flag or field involved and
/// the numbers found against those needed.
#[derive(Debug, Error)]
pub enum DataError {
    #[error("--tokenizer: unknown tokenizer '{name}' (expected one of: char, byte, gpt2)")]
    UnknownTokenizer { name: String },
    #[error(
        "--dataset: '{name}' is neither a built-in dataset (synthetic, tinyshakespeare, tinystories) nor an existing file or directory"
    )]
    UnknownDataset { name: String },
    #[error(
        "--tokenizer: the synthetic corpus has its own {vocab}-symbol vocabulary and only works with the 'char' tokenizer, not '{tokenizer}'"
    )]
    SyntheticTokenizer { tokenizer: String, vocab: usize },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: file is empty")]
    EmptyFile { path: PathBuf },
    #[error("{path}: directory holds no .txt files")]
    EmptyDirectory { path: PathBuf },
    #[error("{path}: invalid UTF-8 at byte {offset} (line {line}, column {column})")]
    InvalidUtf8 {
        path: PathBuf,
        offset: usize,
        line: usize,
        column: usize,
    },
    #[error("{path}:{line}: {message}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    TokenMeta { path: PathBuf, message: String },
    #[error("{path}: {len} bytes is not a whole number of {width}-byte token ids")]
    RaggedBin {
        path: PathBuf,
        len: usize,
        width: usize,
    },
    #[error("{path}: token id {id} at position {position} is out of range for vocab_size {vocab}")]
    TokenOutOfRange {
        path: PathBuf,
        id: u32,
        position: usize,
        vocab: usize,
    },
    #[error("character {ch:?} is not in the tokenizer's {vocab}-character vocabulary")]
    CharNotInVocabulary { ch: char, vocab: usize },
    #[error(
        "{source_name}: the {split} split has {found} tokens but a window needs {needed} (seq_len {seq_len} + 2); use a longer corpus, a smaller --seq-len or another val_fraction"
    )]
    SplitTooShort {
        source_name: String,
        split: &'static str,
        found: usize,
        needed: usize,
        seq_len: usize,
    },
    #[error("val_fraction must lie in (0, 1), got {value}")]
    ValFraction { value: f64 },
    #[error(
        "download of {url} failed: {message}; without network access, put a copy at DIR/{file_name} and pass --data-dir DIR (or set LOOKAHEAD_DATA)"
    )]
    Download {
        url: String,
        file_name: String,
        message: String,
    },
    #[error(
        "{path}: sha256 {found} does not match the expected {expected}; the file was removed, run again to download it afresh"
    )]
    Checksum {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
