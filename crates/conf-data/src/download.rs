//! Named corpora fetched once into a cache directory: resumable (HTTP range requests on a
//! `.part` file), checksummed, with a progress bar.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::DataError;

/// A corpus that can be fetched by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteCorpus {
    pub name: &'static str,
    pub url: &'static str,
    pub file_name: &'static str,
    /// Pinned sha256. Without one, the digest of the first complete download is recorded in
    /// `FILE.sha256` and every later use is checked against it.
    pub sha256: Option<&'static str>,
}

pub const TINYSHAKESPEARE: RemoteCorpus = RemoteCorpus {
    name: "tinyshakespeare",
    url: "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    file_name: "tinyshakespeare.txt",
    sha256: Some("86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
};

/// The TinyStories validation file (~19 MB, ~22k stories): large enough for the model sizes
/// here, small enough to fetch in seconds.
pub const TINYSTORIES: RemoteCorpus = RemoteCorpus {
    name: "tinystories",
    url: "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt",
    file_name: "tinystories.txt",
    sha256: None,
};

pub const REMOTE_CORPORA: [RemoteCorpus; 2] = [TINYSHAKESPEARE, TINYSTORIES];

impl RemoteCorpus {
    pub fn by_name(name: &str) -> Option<Self> {
        REMOTE_CORPORA.into_iter().find(|c| c.name == name)
    }

    /// Looks in `data_dir` (as `FILE` or `NAME/input.txt`), then in `cache_dir`, and downloads
    /// into `cache_dir` only when neither has it.
    pub fn locate_or_fetch(
        &self,
        data_dir: Option<&Path>,
        cache_dir: &Path,
    ) -> Result<PathBuf, DataError> {
        if let Some(dir) = data_dir {
            for candidate in [
                dir.join(self.file_name),
                dir.join(self.name).join("input.txt"),
            ] {
                if candidate.is_file() {
                    return Ok(candidate);
                }
            }
        }
        let dest = cache_dir.join("downloads").join(self.file_name);
        if !dest.is_file() {
            self.download(&dest)?;
        }
        self.verify(&dest)?;
        Ok(dest)
    }

    fn download(&self, dest: &Path) -> Result<(), DataError> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let part = dest.with_extension("part");
        let have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        let fail = |message: String| DataError::Download {
            url: self.url.to_string(),
            file_name: self.file_name.to_string(),
            message,
        };
        tracing::info!(
            url = self.url,
            resume_from = have,
            "downloading {}",
            self.name
        );
        let mut request = ureq::get(self.url);
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let response = match request.call() {
            // The part file already holds everything.
            Err(ureq::Error::StatusCode(416)) if have > 0 => {
                fs::rename(&part, dest).map_err(|e| DataError::io(dest, e))?;
                return Ok(());
            }
            other => other.map_err(|e| fail(e.to_string()))?,
        };
        let resumed = response.status().as_u16() == 206;
        let remaining: Option<u64> = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let start = if resumed { have } else { 0 };
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(&part)
            .map_err(|e| DataError::io(&part, e))?;
        let bar = ProgressBar::new(remaining.map(|n| n + start).unwrap_or(0));
        bar.set_style(
            ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} ({bytes_per_sec})")
                .expect("static template"),
        );
        bar.set_message(self.name);
        bar.set_position(start);
        let mut reader = response.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = reader.read(&mut buf).map_err(|e| fail(e.to_string()))?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])
                .map_err(|e| DataError::io(&part, e))?;
            bar.inc(n as u64);
        }
        file.sync_all().map_err(|e| DataError::io(&part, e))?;
        bar.finish_and_clear();
        fs::rename(&part, dest).map_err(|e| DataError::io(dest, e))
    }

    fn verify(&self, path: &Path) -> Result<(), DataError> {
        let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
        let found = sha256_hex(&bytes);
        let record = path.with_extension("sha256");
        let expected = match self.sha256 {
            Some(pinned) => pinned.to_string(),
            None => match fs::read_to_string(&record) {
                Ok(recorded) => recorded.trim().to_string(),
                Err(_) => {
                    crate::write_atomic(&record, found.as_bytes())
                        .map_err(|e| DataError::io(&record, e))?;
                    found.clone()
                }
            },
        };
        if found != expected {
            let _ = fs::remove_file(path);
            return Err(DataError::Checksum {
                path: path.into(),
                found,
                expected,
            });
        }
        Ok(())
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
