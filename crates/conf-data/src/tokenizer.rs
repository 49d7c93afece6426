//! Tokenizers behind one trait: `char` (vocabulary from the corpus), `byte` (256) and `gpt2`
//! (tiktoken's `r50k_base`, whose ranks ship inside the crate, so it works offline).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::DataError;

/// Maps text to token ids and back.
pub trait Tokenizer: Send + Sync {
    /// Number of distinct token ids; every id is `< vocab_size()`.
    fn vocab_size(&self) -> usize;
    fn encode(&self, text: &str) -> Result<Vec<u32>, DataError>;
    /// Decodes ids; ids that do not form valid UTF-8 on their own (split multi-byte characters)
    /// decode lossily, as for any byte-level tokenizer.
    fn decode(&self, ids: &[u32]) -> String;
}

/// The tokenizer names accepted by `--tokenizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    Char,
    Byte,
    Gpt2,
}

impl TokenizerKind {
    pub const NAMES: &'static str = "char, byte, gpt2";

    pub fn name(self) -> &'static str {
        match self {
            Self::Char => "char",
            Self::Byte => "byte",
            Self::Gpt2 => "gpt2",
        }
    }
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TokenizerKind {
    type Err = DataError;

    fn from_str(name: &str) -> Result<Self, DataError> {
        match name {
            "char" => Ok(Self::Char),
            "byte" => Ok(Self::Byte),
            "gpt2" => Ok(Self::Gpt2),
            other => Err(DataError::UnknownTokenizer {
                name: other.to_string(),
            }),
        }
    }
}

/// A tokenizer in serialisable form: what a results file or a token cache records so that the
/// exact same mapping can be rebuilt later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TokenizerSpec {
    Char { vocabulary: Vec<char> },
    Byte,
    Gpt2,
}

impl TokenizerSpec {
    pub fn kind(&self) -> TokenizerKind {
        match self {
            Self::Char { .. } => TokenizerKind::Char,
            Self::Byte => TokenizerKind::Byte,
            Self::Gpt2 => TokenizerKind::Gpt2,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Char { vocabulary } => vocabulary.len(),
            Self::Byte => 256,
            Self::Gpt2 => GPT2_VOCAB_SIZE,
        }
    }

    pub fn build(&self) -> Box<dyn Tokenizer> {
        match self {
            Self::Char { vocabulary } => Box::new(CharTokenizer::new(vocabulary.clone())),
            Self::Byte => Box::new(ByteTokenizer),
            Self::Gpt2 => Box::new(Gpt2Tokenizer::new()),
        }
    }
}

/// One id per distinct character, ids in sorted character order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharTokenizer {
    vocabulary: Vec<char>,
    // Dense lookup for the ASCII range, which covers most corpora; the rest is a binary search.
    ascii_ids: [u32; 128],
}

impl CharTokenizer {
    /// `vocabulary[i]` is the character of id `i`.
    pub fn new(vocabulary: Vec<char>) -> Self {
        let mut ascii_ids = [u32::MAX; 128];
        for (id, &ch) in vocabulary.iter().enumerate() {
            if ch.is_ascii() {
                ascii_ids[ch as usize] = id as u32;
            }
        }
        Self {
            vocabulary,
            ascii_ids,
        }
    }

    /// The sorted set of characters that occur in `text`.
    pub fn fit(text: &str) -> Self {
        let set: BTreeSet<char> = text.chars().collect();
        Self::new(set.into_iter().collect())
    }

    pub fn vocabulary(&self) -> &[char] {
        &self.vocabulary
    }

    fn id(&self, ch: char) -> Option<u32> {
        if ch.is_ascii() {
            let id = self.ascii_ids[ch as usize];
            return (id != u32::MAX).then_some(id);
        }
        self.vocabulary
            .iter()
            .position(|&c| c == ch)
            .map(|i| i as u32)
    }
}

impl Tokenizer for CharTokenizer {
    fn vocab_size(&self) -> usize {
        self.vocabulary.len()
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        text.chars()
            .map(|ch| {
                self.id(ch).ok_or(DataError::CharNotInVocabulary {
                    ch,
                    vocab: self.vocabulary.len(),
                })
            })
            .collect()
    }

    fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&id| {
                self.vocabulary
                    .get(id as usize)
                    .copied()
                    .unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect()
    }
}

/// Raw UTF-8 bytes: 256 ids, nothing to fit.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl Tokenizer for ByteTokenizer {
    fn vocab_size(&self) -> usize {
        256
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().map(|&id| id.min(255) as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

pub const GPT2_VOCAB_SIZE: usize = 50257;

/// GPT-2's byte-level BPE (`r50k_base`, 50257 ids including `<|endoftext|>`).
pub struct Gpt2Tokenizer {
    bpe: &'static tiktoken_rs::CoreBPE,
}

impl Gpt2Tokenizer {
    pub fn new() -> Self {
        Self {
            bpe: tiktoken_rs::r50k_base_singleton(),
        }
    }
}

impl Default for Gpt2Tokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokenizer for Gpt2Tokenizer {
    fn vocab_size(&self) -> usize {
        GPT2_VOCAB_SIZE
    }

    /// Plain text: special-token strings such as `<|endoftext|>` are encoded as ordinary text.
    fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        Ok(self.bpe.encode_ordinary(text))
    }

    fn decode(&self, ids: &[u32]) -> String {
        let valid: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| (id as usize) < GPT2_VOCAB_SIZE)
            .collect();
        let bytes = self.bpe.decode_bytes(&valid).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "First Citizen:\nBefore we proceed any further, hear me speak.\nÆsop — naïve café ✓";

    #[test]
    fn char_tokenizer_round_trips_and_sorts_its_vocabulary() {
        let tok = CharTokenizer::fit(TEXT);
        let ids = tok.encode(TEXT).unwrap();
        assert_eq!(ids.len(), TEXT.chars().count());
        assert_eq!(tok.decode(&ids), TEXT);
        let vocab = tok.vocabulary();
        assert!(vocab.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(tok.encode("\n").unwrap(), vec![0]); // '\n' is the smallest char here
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
    }

    #[test]
    fn char_tokenizer_rejects_an_unseen_character_naming_it() {
        let tok = CharTokenizer::fit("abc");
        let err = tok.encode("abz").unwrap_err().to_string();
        assert!(err.contains("'z'") && err.contains("3"), "{err}");
    }

    #[test]
    fn char_tokenizer_spec_survives_json() {
        let spec = TokenizerSpec::Char {
            vocabulary: CharTokenizer::fit(TEXT).vocabulary().to_vec(),
        };
        let json = serde_json::to_string(&spec).unwrap();
        let back: TokenizerSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        assert_eq!(
            back.build().decode(&back.build().encode(TEXT).unwrap()),
            TEXT
        );
    }

    #[test]
    fn byte_tokenizer_round_trips_multibyte_text() {
        let ids = ByteTokenizer.encode(TEXT).unwrap();
        assert_eq!(ids.len(), TEXT.len());
        assert!(ids.len() > TEXT.chars().count());
        assert_eq!(ByteTokenizer.decode(&ids), TEXT);
        assert!(ids.iter().all(|&id| id < 256));
    }

    #[test]
    fn gpt2_tokenizer_matches_known_ids_and_round_trips() {
        let tok = Gpt2Tokenizer::new();
        assert_eq!(tok.vocab_size(), 50257);
        // GPT-2's published ids for "Hello world".
        assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
        let ids = tok.encode(TEXT).unwrap();
        assert_eq!(tok.decode(&ids), TEXT);
        assert!(ids.len() < TEXT.len());
    }

    #[test]
    fn unknown_tokenizer_name_lists_the_valid_ones() {
        let err = "bpe".parse::<TokenizerKind>().unwrap_err().to_string();
        assert!(
            err.contains("bpe") && err.contains("char, byte, gpt2"),
            "{err}"
        );
    }
}
