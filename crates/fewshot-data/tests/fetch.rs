//! `fetch` against a hub served on loopback: a small dataset repository in
//! the hub's URL layout (`/datasets/<owner>/<name>/resolve/<revision>/<path>`,
//! HEAD and ranged GET), with switches to cut a connection or corrupt a file.
#![cfg(feature = "download")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use fewshot_data::fetch::{fetch, sha256_of, FetchEvent, FetchOptions, Manifest};
use fewshot_data::DataError;

/// What the fake hub serves and what it was asked.
#[derive(Default)]
struct HubState {
    /// Repository path -> bytes.
    files: HashMap<String, Vec<u8>>,
    /// Cut the body of this many next GETs after half of it.
    cut_next_gets: usize,
    /// Ranged GETs served, as (path, first byte).
    gets: Vec<(String, u64)>,
}

struct FakeHub {
    endpoint: String,
    state: Arc<Mutex<HubState>>,
}

impl FakeHub {
    fn start(files: HashMap<String, Vec<u8>>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(HubState {
            files,
            ..Default::default()
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        FakeHub { endpoint, state }
    }
}

/// Answers the requests of one connection.
fn serve(stream: TcpStream, state: &Mutex<HubState>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut range: Option<(u64, u64)> = None;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("range: bytes=") {
                let (start, end) = value.split_once('-').unwrap();
                range = Some((start.parse().unwrap(), end.parse().unwrap()));
            }
        }
        let mut parts = request_line.split_whitespace();
        let (method, target) = (parts.next().unwrap(), parts.next().unwrap().to_string());
        let prefix = "/datasets/test-owner/omniglot-mini/resolve/rev1/";
        let body = target
            .strip_prefix(prefix)
            .and_then(|path| state.lock().unwrap().files.get(path).cloned());
        let Some(body) = body else {
            let _ = out.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nX-Error-Code: EntryNotFound\r\n\r\n",
            );
            continue;
        };
        let path = target[prefix.len()..].to_string();
        if method == "HEAD" {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            let _ = out.write_all(head.as_bytes());
            continue;
        }
        let (start, end) = range.unwrap_or((0, body.len() as u64 - 1));
        let slice = &body[start as usize..=end as usize];
        let cut = {
            let mut state = state.lock().unwrap();
            state.gets.push((path, start));
            let cut = state.cut_next_gets > 0;
            state.cut_next_gets = state.cut_next_gets.saturating_sub(1);
            cut
        };
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{}\r\n\r\n",
            slice.len(),
            body.len()
        );
        let _ = out.write_all(head.as_bytes());
        if cut {
            // Half the promised bytes, then the connection drops.
            let _ = out.write_all(&slice[..slice.len() / 2]);
            let _ = out.flush();
            return;
        }
        let _ = out.write_all(slice);
    }
}

/// A tar archive holding `images_background/<Alphabet>/character01/*.png`.
fn archive() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (i, name) in ["0101_01.png", "0101_02.png"].iter().enumerate() {
        let pixels = image::GrayImage::from_pixel(4, 4, image::Luma([i as u8 * 200]));
        let mut png = std::io::Cursor::new(Vec::new());
        pixels.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let png = png.into_inner();
        let mut header = tar::Header::new_gnu();
        header.set_size(png.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        let path = format!("images_background/Alphabet_A/character01/{name}");
        builder
            .append_data(&mut header, path, png.as_slice())
            .unwrap();
    }
    builder.into_inner().unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, bytes).unwrap();
    sha256_of(&path).unwrap()
}

/// The fixture repository and its manifest.
fn repository() -> (HashMap<String, Vec<u8>>, Manifest) {
    let tar = archive();
    let split = b"Alphabet_A/character01/rot000\n".to_vec();
    let manifest = format!(
        r#"{{"dataset": "omniglot", "repo": "test-owner/omniglot-mini", "revision": "rev1",
            "files": [
              {{"path": "images_background.tar", "size": {}, "sha256": "{}", "unpack": "tar"}},
              {{"path": "splits/vinyals/train.txt", "size": {}, "sha256": "{}", "unpack": "file"}}
            ]}}"#,
        tar.len(),
        sha256(&tar),
        split.len(),
        sha256(&split)
    );
    let files = HashMap::from([
        ("images_background.tar".to_string(), tar),
        ("splits/vinyals/train.txt".to_string(), split),
    ]);
    (files, Manifest::parse(&manifest, "test manifest").unwrap())
}

fn options(hub: &FakeHub, range_bytes: u64) -> FetchOptions {
    FetchOptions {
        endpoint: Some(hub.endpoint.clone()),
        range_bytes,
    }
}

fn assert_laid_out(dataset: &Path) {
    let png = dataset.join("images_background/Alphabet_A/character01/0101_02.png");
    let image = image::open(&png).unwrap().into_luma8();
    assert_eq!(image.get_pixel(0, 0).0, [200]);
    let split = std::fs::read_to_string(dataset.join("splits/vinyals/train.txt")).unwrap();
    assert_eq!(split, "Alphabet_A/character01/rot000\n");
}

#[test]
fn downloads_checks_and_lays_out_a_dataset_in_one_rename() {
    let (files, manifest) = repository();
    let hub = FakeHub::start(files);
    let root = tempfile::tempdir().unwrap();
    let mut events = Vec::new();
    let dataset = fetch(&manifest, root.path(), &options(&hub, 1000), &mut |e| {
        events.push(format!("{e:?}"))
    })
    .unwrap();
    assert_eq!(dataset, root.path().join("omniglot"));
    assert_laid_out(&dataset);
    // Nothing but the dataset is left: no staging folder, no part files.
    let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
    assert_eq!(left.len(), 1);
    assert!(events.iter().any(|e| e.contains("Verified")), "{events:?}");
    // Ranges of 1000 bytes: the archive took several requests.
    let gets = hub.state.lock().unwrap().gets.clone();
    let archive_gets = gets.iter().filter(|(p, _)| p.ends_with(".tar")).count();
    assert!(archive_gets > 2, "{gets:?}");

    // A second fetch refuses to overwrite the dataset.
    let err = fetch(&manifest, root.path(), &options(&hub, 1000), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn a_cut_connection_resumes_where_it_stopped_and_nothing_half_done_is_visible() {
    let (files, manifest) = repository();
    let size = files["images_background.tar"].len() as u64;
    let hub = FakeHub::start(files);
    let root = tempfile::tempdir().unwrap();
    let range = 1024;
    // The third range of the archive is cut.
    let mut served = 0;
    let err = fetch(
        &manifest,
        root.path(),
        &options(&hub, range),
        &mut |event| {
            if let FetchEvent::Downloading { done, .. } = event {
                served = done;
                if done == 2 * range {
                    hub.state.lock().unwrap().cut_next_gets = 1;
                }
            }
        },
    )
    .unwrap_err();
    assert!(matches!(err, DataError::Download { .. }), "{err}");
    assert!(err.to_string().contains("images_background.tar"), "{err}");
    assert_eq!(served, 2 * range);
    // The loader's folder does not exist; the two whole ranges are kept.
    assert!(!root.path().join("omniglot").exists());
    let part = root
        .path()
        .join(".omniglot.fetch/downloads/images_background.tar.part");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 2 * range);

    hub.state.lock().unwrap().gets.clear();
    let dataset = fetch(&manifest, root.path(), &options(&hub, range), &mut |_| {}).unwrap();
    assert_laid_out(&dataset);
    let gets = hub.state.lock().unwrap().gets.clone();
    let archive_starts: Vec<u64> = gets
        .iter()
        .filter(|(p, _)| p.ends_with(".tar"))
        .map(|(_, start)| *start)
        .collect();
    // Resumed at the first byte not on disk, never from 0.
    assert_eq!(archive_starts[0], 2 * range, "{gets:?}");
    assert_eq!(
        archive_starts.len() as u64,
        (size - 2 * range).div_ceil(range)
    );
}

#[test]
fn a_corrupt_file_is_refused_deleted_and_named() {
    let (mut files, manifest) = repository();
    let tar = files.get_mut("images_background.tar").unwrap();
    tar[600] ^= 0xff;
    let hub = FakeHub::start(files);
    let root = tempfile::tempdir().unwrap();
    let err = fetch(&manifest, root.path(), &options(&hub, 1 << 20), &mut |_| {}).unwrap_err();
    let DataError::Checksum { file, expected, .. } = &err else {
        panic!("expected a checksum error, got {err}");
    };
    assert_eq!(file, "test-owner/omniglot-mini/images_background.tar");
    assert_eq!(expected, &manifest.files[0].sha256);
    assert!(err.to_string().contains("fetch again"), "{err}");
    assert!(!root.path().join("omniglot").exists());
    let downloads = root.path().join(".omniglot.fetch/downloads");
    assert!(!downloads.join("images_background.tar.part").exists());
    assert!(!downloads.join("images_background.tar").exists());
}

#[test]
fn a_file_missing_from_the_hub_is_named() {
    let (mut files, manifest) = repository();
    files.remove("splits/vinyals/train.txt");
    let hub = FakeHub::start(files);
    let root = tempfile::tempdir().unwrap();
    let err = fetch(&manifest, root.path(), &options(&hub, 1 << 20), &mut |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("splits/vinyals/train.txt"),
        "{err}"
    );
    assert!(!root.path().join("omniglot").exists());
}
