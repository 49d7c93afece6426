//! Loading a corpus by name or path into token ids, with a token cache so a second run starts
//! instantly.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::download::{RemoteCorpus, sha256_hex};
use crate::synthetic::{HiddenMarkovSource, SyntheticConfig};
use crate::tokenizer::{CharTokenizer, TokenizerKind, TokenizerSpec};
use crate::tokens::{TokenDtype, TokenStore, encode_bin};
use crate::{DataError, write_atomic};

/// What to load: `--dataset`, `--tokenizer`, `--data-dir`, and where caches live.
#[derive(Debug, Clone)]
pub struct CorpusRequest {
    /// `synthetic`, `tinyshakespeare`, `tinystories`, or a path to a `.txt` file, a directory
    /// of `.txt` files, a `.jsonl` file with a `text` field, or a pre-tokenized `.bin`.
    pub dataset: String,
    /// `None` picks the corpus's natural tokenizer: `char` for text, the stored one for `.bin`.
    pub tokenizer: Option<TokenizerKind>,
    pub data_dir: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub synthetic: SyntheticConfig,
}

impl CorpusRequest {
    pub fn new(dataset: impl Into<String>, cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            dataset: dataset.into(),
            tokenizer: None,
            data_dir: None,
            cache_dir: cache_dir.into(),
            synthetic: SyntheticConfig::default(),
        }
    }
}

/// A tokenized corpus.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The dataset as the user named it.
    pub source: String,
    pub tokens: Arc<TokenStore>,
    pub tokenizer: TokenizerSpec,
    /// The exact source, for the synthetic corpus only.
    pub oracle: Option<HiddenMarkovSource>,
}

impl Corpus {
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// The JSON beside every token `.bin`: how to read it and how to decode it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenMeta {
    pub tokenizer: TokenizerSpec,
    pub vocab_size: usize,
    pub dtype: TokenDtype,
    #[serde(default)]
    pub token_count: Option<usize>,
    /// sha256 of the text the tokens came from (set by the cache).
    #[serde(default)]
    pub source_sha256: Option<String>,
}

/// Separates documents of a directory or a `.jsonl` file.
const DOCUMENT_SEPARATOR: &str = "\n\n";
/// Texts above this size show a tokenization progress bar.
const PROGRESS_BYTES: usize = 4 << 20;

pub fn load_corpus(request: &CorpusRequest) -> Result<Corpus, DataError> {
    let name = request.dataset.as_str();
    if name == "synthetic" {
        return synthetic_corpus(request);
    }
    let path = match RemoteCorpus::by_name(name) {
        Some(remote) => remote.locate_or_fetch(request.data_dir.as_deref(), &request.cache_dir)?,
        None => {
            let path = PathBuf::from(name);
            if !path.exists() {
                return Err(DataError::UnknownDataset { name: name.into() });
            }
            path
        }
    };
    let (tokens, tokenizer) = if path.extension().is_some_and(|e| e == "bin") {
        load_bin(&path, request.tokenizer)?
    } else {
        let text = read_text_source(&path)?;
        let kind = request.tokenizer.unwrap_or(TokenizerKind::Char);
        tokenize_cached(&text, kind, &request.cache_dir)?
    };
    Ok(Corpus {
        source: name.to_string(),
        tokens: Arc::new(tokens),
        tokenizer,
        oracle: None,
    })
}

fn synthetic_corpus(request: &CorpusRequest) -> Result<Corpus, DataError> {
    let source = HiddenMarkovSource::new(request.synthetic);
    if let Some(kind) = request.tokenizer.filter(|&k| k != TokenizerKind::Char) {
        return Err(DataError::SyntheticTokenizer {
            tokenizer: kind.to_string(),
            vocab: source.vocab_size(),
        });
    }
    Ok(Corpus {
        source: "synthetic".into(),
        tokens: Arc::new(TokenStore::Owned(source.generate())),
        tokenizer: TokenizerSpec::Char {
            vocabulary: source.vocabulary(),
        },
        oracle: Some(source),
    })
}

/// Reads a `.txt` file, every `.txt` file of a directory (in name order) or the `text` fields
/// of a `.jsonl` file.
fn read_text_source(path: &Path) -> Result<String, DataError> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(path)
            .map_err(|e| DataError::io(path, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "txt"))
            .collect();
        if files.is_empty() {
            return Err(DataError::EmptyDirectory { path: path.into() });
        }
        files.sort();
        let texts = files
            .iter()
            .map(|f| read_utf8(f))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(texts.join(DOCUMENT_SEPARATOR));
    }
    let text = read_utf8(path)?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        return jsonl_texts(path, &text);
    }
    Ok(text)
}

fn read_utf8(path: &Path) -> Result<String, DataError> {
    let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.is_empty() {
        return Err(DataError::EmptyFile { path: path.into() });
    }
    String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..offset];
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        DataError::InvalidUtf8 {
            path: path.into(),
            offset,
            line: before.iter().filter(|&&b| b == b'\n').count() + 1,
            column: offset - line_start + 1,
        }
    })
}

fn jsonl_texts(path: &Path, content: &str) -> Result<String, DataError> {
    let mut texts = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let error = |message: String| DataError::Jsonl {
            path: path.into(),
            line: i + 1,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| error(format!("not valid JSON: {e}")))?;
        match value.get("text") {
            Some(serde_json::Value::String(text)) => texts.push(text.clone()),
            Some(_) => return Err(error("field \"text\" is not a string".into())),
            None => return Err(error("no \"text\" field".into())),
        }
    }
    if texts.is_empty() {
        return Err(DataError::EmptyFile { path: path.into() });
    }
    Ok(texts.join(DOCUMENT_SEPARATOR))
}

/// The meta file that describes `x.bin` is `x.json`.
pub fn meta_path(bin: &Path) -> PathBuf {
    bin.with_extension("json")
}

fn load_bin(
    path: &Path,
    tokenizer: Option<TokenizerKind>,
) -> Result<(TokenStore, TokenizerSpec), DataError> {
    let meta_file = meta_path(path);
    let meta_error = |message: String| DataError::TokenMeta {
        path: meta_file.clone(),
        message,
    };
    let text = fs::read_to_string(&meta_file).map_err(|e| {
        meta_error(format!(
            "cannot read the meta file that must describe {} ({e}); it holds {{\"dtype\": \"u16\"|\"u32\", \"vocab_size\": N, \"tokenizer\": {{\"kind\": \"char\"|\"byte\"|\"gpt2\", ...}}}}",
            path.display()
        ))
    })?;
    let meta: TokenMeta =
        serde_json::from_str(&text).map_err(|e| meta_error(format!("invalid meta: {e}")))?;
    if meta.vocab_size != meta.tokenizer.vocab_size() {
        return Err(meta_error(format!(
            "vocab_size {} does not match the {} tokenizer's {}",
            meta.vocab_size,
            meta.tokenizer.kind(),
            meta.tokenizer.vocab_size()
        )));
    }
    if let Some(kind) = tokenizer.filter(|&k| k != meta.tokenizer.kind()) {
        return Err(meta_error(format!(
            "--tokenizer {kind} does not match the {} tokenizer these tokens were made with",
            meta.tokenizer.kind()
        )));
    }
    let store = TokenStore::map_file(path, meta.dtype, meta.vocab_size)?;
    Ok((store, meta.tokenizer))
}

/// Tokenizes `text`, or maps the cached tokens of an identical earlier text.
fn tokenize_cached(
    text: &str,
    kind: TokenizerKind,
    cache_dir: &Path,
) -> Result<(TokenStore, TokenizerSpec), DataError> {
    let hash = sha256_hex(text.as_bytes());
    let bin = cache_dir
        .join("tokens")
        .join(format!("{}-{kind}.bin", &hash[..16]));
    let meta_file = meta_path(&bin);
    // The meta file is written last, so its presence marks a complete cache entry.
    if let Ok(meta_text) = fs::read_to_string(&meta_file)
        && let Ok(meta) = serde_json::from_str::<TokenMeta>(&meta_text)
        && meta.source_sha256.as_deref() == Some(hash.as_str())
        && let Ok(store) = TokenStore::map_file(&bin, meta.dtype, meta.vocab_size)
    {
        tracing::debug!(cache = %bin.display(), "using cached tokens");
        return Ok((store, meta.tokenizer));
    }

    let spec = match kind {
        TokenizerKind::Char => TokenizerSpec::Char {
            vocabulary: CharTokenizer::fit(text).vocabulary().to_vec(),
        },
        TokenizerKind::Byte => TokenizerSpec::Byte,
        TokenizerKind::Gpt2 => TokenizerSpec::Gpt2,
    };
    let tokens = encode_with_progress(text, &spec)?;
    let meta = TokenMeta {
        vocab_size: spec.vocab_size(),
        dtype: TokenDtype::for_vocab(spec.vocab_size()),
        token_count: Some(tokens.len()),
        source_sha256: Some(hash),
        tokenizer: spec.clone(),
    };
    let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
    // A cache that cannot be written only costs time on the next run.
    if let Err(e) = write_atomic(&bin, &encode_bin(&tokens, meta.dtype))
        .and_then(|()| write_atomic(&meta_file, &json))
    {
        tracing::warn!(cache = %bin.display(), "could not write the token cache: {e}");
    }
    Ok((TokenStore::Owned(tokens), spec))
}

/// Encodes in chunks so a progress bar can follow. Chunks end just before a newline that
/// precedes a non-space character: GPT-2's pre-tokenizer makes that newline a piece of its own
/// (a whitespace run before a word keeps its last character apart), so no token spans the cut
/// and the ids equal those of encoding the text whole.
fn encode_with_progress(text: &str, spec: &TokenizerSpec) -> Result<Vec<u32>, DataError> {
    let tokenizer = spec.build();
    let bar = if text.len() > PROGRESS_BYTES {
        let bar = ProgressBar::new(text.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("tokenizing {bar:40} {bytes}/{total_bytes} ({eta})")
                .expect("static template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut tokens = Vec::with_capacity(text.len() / 2);
    let mut rest = text;
    while !rest.is_empty() {
        let end = chunk_end(rest, 1 << 20);
        tokens.extend(tokenizer.encode(&rest[..end])?);
        bar.inc(end as u64);
        rest = &rest[end..];
    }
    bar.finish_and_clear();
    Ok(tokens)
}

fn chunk_end(text: &str, target: usize) -> usize {
    if text.len() <= target {
        return text.len();
    }
    let bytes = text.as_bytes();
    (target..bytes.len() - 1)
        .find(|&i| bytes[i] == b'\n' && !bytes[i + 1].is_ascii_whitespace())
        .unwrap_or(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_gpt2_encoding_equals_whole_text_encoding() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/tinyshakespeare.txt"),
        )
        .unwrap();
        let text = &text[..300_000];
        let whole = TokenizerSpec::Gpt2.build().encode(text).unwrap();
        let tokenizer = TokenizerSpec::Gpt2.build();
        let mut chunked = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let end = chunk_end(rest, 10_000);
            chunked.extend(tokenizer.encode(&rest[..end]).unwrap());
            rest = &rest[end..];
        }
        assert_eq!(chunked.len(), whole.len());
        assert!(chunked == whole, "chunked ids differ from whole-text ids");
    }
}
