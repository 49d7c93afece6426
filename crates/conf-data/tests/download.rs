//! Named corpora: local copies, checksums, resumable downloads.

use std::fs;
use std::io::Write;
use std::path::Path;

use conf_data::*;

#[test]
fn a_copy_in_the_data_dir_is_found_and_checked_without_any_download() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    let cache = tempfile::tempdir().unwrap();
    let path = TINYSHAKESPEARE
        .locate_or_fetch(Some(&shared), cache.path())
        .unwrap();
    assert_eq!(path, shared.join("tinyshakespeare.txt"));
    let bytes = fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 1_115_394);
    assert_eq!(sha256_hex(&bytes), TINYSHAKESPEARE.sha256.unwrap());
}

#[test]
fn a_corrupted_cached_download_is_rejected_and_removed() {
    let cache = tempfile::tempdir().unwrap();
    let dest = cache
        .path()
        .join("downloads")
        .join(TINYSHAKESPEARE.file_name);
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::write(&dest, b"not shakespeare").unwrap();
    let err = TINYSHAKESPEARE
        .locate_or_fetch(None, cache.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not match") && err.contains("tinyshakespeare.txt"),
        "{err}"
    );
    assert!(!dest.exists());
}

#[test]
fn an_unpinned_corpus_is_checked_against_its_first_digest() {
    let cache = tempfile::tempdir().unwrap();
    let dest = cache.path().join("downloads").join(TINYSTORIES.file_name);
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::write(&dest, b"Once upon a time").unwrap();
    TINYSTORIES.locate_or_fetch(None, cache.path()).unwrap();
    fs::write(&dest, b"Once upon a tine").unwrap();
    assert!(TINYSTORIES.locate_or_fetch(None, cache.path()).is_err());
}

/// Serves `body` on loopback for `requests` connections, honouring `Range: bytes=N-`.
fn serve(body: &'static [u8], requests: usize) -> (String, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/corpus.txt", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut ranges = Vec::new();
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut start = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    start = v.trim().trim_end_matches('-').parse().unwrap();
                    ranges.push(line.trim().to_ascii_lowercase());
                }
            }
            let part = &body[start..];
            let status = if start > 0 {
                "206 Partial Content"
            } else {
                "200 OK"
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                part.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(part).unwrap();
        }
        ranges
    });
    (url, handle)
}

#[test]
fn a_download_resumes_from_its_part_file_and_is_checked() {
    const BODY: &[u8] = b"To be, or not to be, that is the question.\n";
    let (url, server) = serve(BODY, 1);
    let corpus = RemoteCorpus {
        name: "hamlet",
        url: Box::leak(url.into_boxed_str()),
        file_name: "hamlet.txt",
        sha256: Some(Box::leak(sha256_hex(BODY).into_boxed_str())),
    };
    let cache = tempfile::tempdir().unwrap();
    let part = cache.path().join("downloads/hamlet.part");
    fs::create_dir_all(part.parent().unwrap()).unwrap();
    fs::write(&part, &BODY[..10]).unwrap(); // an interrupted earlier download
    let path = corpus.locate_or_fetch(None, cache.path()).unwrap();
    assert_eq!(fs::read(&path).unwrap(), BODY);
    assert!(!part.exists());
    assert_eq!(server.join().unwrap(), vec!["range: bytes=10-".to_string()]);
    // Found in the cache the second time: no server needed.
    assert_eq!(corpus.locate_or_fetch(None, cache.path()).unwrap(), path);
}
