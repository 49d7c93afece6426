//! Token storage: in memory, or a memory-mapped little-endian `.bin` of u16 or u32 ids.

use std::fs::File;
use std::ops::Range;
use std::path::Path;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::DataError;

/// Width of the ids in a `.bin` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    pub fn width(self) -> usize {
        match self {
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }

    /// The narrowest width that holds every id of a vocabulary.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            Self::U16
        } else {
            Self::U32
        }
    }
}

#[derive(Debug)]
pub enum TokenStore {
    Owned(Vec<u32>),
    Mapped { map: Mmap, dtype: TokenDtype },
}

impl TokenStore {
    /// Maps `path` and checks that every id is below `vocab_size`.
    pub fn map_file(path: &Path, dtype: TokenDtype, vocab_size: usize) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        // SAFETY: the file is opened read-only; like every reader of a memory-mapped file we
        // rely on no other process truncating it while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
        if map.is_empty() {
            return Err(DataError::EmptyFile { path: path.into() });
        }
        if map.len() % dtype.width() != 0 {
            return Err(DataError::RaggedBin {
                path: path.into(),
                len: map.len(),
                width: dtype.width(),
            });
        }
        let store = Self::Mapped { map, dtype };
        if let Some(position) = (0..store.len()).find(|&i| store.get(i) as usize >= vocab_size) {
            return Err(DataError::TokenOutOfRange {
                path: path.into(),
                id: store.get(position),
                position,
                vocab: vocab_size,
            });
        }
        Ok(store)
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Owned(tokens) => tokens.len(),
            Self::Mapped { map, dtype } => map.len() / dtype.width(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, index: usize) -> u32 {
        match self {
            Self::Owned(tokens) => tokens[index],
            Self::Mapped { map, dtype } => {
                let w = dtype.width();
                let b = &map[index * w..(index + 1) * w];
                match dtype {
                    TokenDtype::U16 => u16::from_le_bytes([b[0], b[1]]) as u32,
                    TokenDtype::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                }
            }
        }
    }

    pub fn slice(&self, range: Range<usize>) -> Vec<u32> {
        match self {
            Self::Owned(tokens) => tokens[range].to_vec(),
            Self::Mapped { .. } => range.map(|i| self.get(i)).collect(),
        }
    }
}

/// Writes ids as little-endian `dtype` values.
pub fn encode_bin(tokens: &[u32], dtype: TokenDtype) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(tokens.len() * dtype.width());
    for &t in tokens {
        match dtype {
            TokenDtype::U16 => bytes.extend_from_slice(&(t as u16).to_le_bytes()),
            TokenDtype::U32 => bytes.extend_from_slice(&t.to_le_bytes()),
        }
    }
    bytes
}
