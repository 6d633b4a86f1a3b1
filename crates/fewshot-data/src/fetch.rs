//! Downloading a dataset from the Hugging Face hub.
//!
//! A [`Manifest`] in this repository names a hub dataset repository, a
//! pinned revision and every file to take from it with its size and SHA-256.
//! [`fetch`] downloads the files in ranges through `hf-hub` (cargo feature
//! `download`; without it, [`fetch`] says how to rebuild), appending to a
//! `.part` file after each range so that a broken download resumes where it
//! stopped; checks each finished file against its checksum (a mismatch
//! deletes it and names the file); unpacks the archives; and only then moves
//! the finished folder to `<root>/<dataset>` in one rename, so a loader
//! never sees half a dataset. Work in progress lives in
//! `<root>/.<dataset>.fetch/`.
//!
//! The hub endpoint is `https://huggingface.co` unless `HF_ENDPOINT` or
//! [`FetchOptions::endpoint`] says otherwise (a mirror, or a test server);
//! `HF_TOKEN` is sent when set.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};

/// Where a dataset's files are on the hub and what they must be.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The folder the dataset's loader reads, e.g. `omniglot`.
    pub dataset: String,
    /// Hub dataset repository, `owner/name`.
    pub repo: String,
    /// A commit (or tag) of `repo`: pinned, so the checksums stay true.
    pub revision: String,
    pub files: Vec<ManifestFile>,
}

/// One file of a [`Manifest`].
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Path in the hub repository.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the file, 64 lowercase hex digits.
    pub sha256: String,
    /// `tar`: an uncompressed tar archive, unpacked into the dataset folder;
    /// `file`: placed as is at `path` in the dataset folder.
    pub unpack: Unpack,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unpack {
    Tar,
    File,
}

impl Manifest {
    /// The manifest that comes with this crate for `dataset`, if any.
    pub fn builtin(dataset: &str) -> Option<Result<Manifest>> {
        let text = match dataset {
            "omniglot" => include_str!("../sources/omniglot.json"),
            _ => return None,
        };
        Some(Manifest::parse(
            text,
            &format!("built-in manifest of {dataset}"),
        ))
    }

    /// Reads a manifest file.
    pub fn from_file(path: &Path) -> Result<Manifest> {
        let text = fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        Manifest::parse(&text, &path.display().to_string())
    }

    /// Parses and checks a manifest; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Manifest> {
        let manifest: Manifest =
            serde_json::from_str(text).map_err(|e| DataError::InvalidSpec {
                field: "manifest",
                value: origin.to_string(),
                reason: e.to_string(),
            })?;
        manifest.validate(origin)?;
        Ok(manifest)
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| DataError::InvalidSpec {
            field: "manifest",
            value: origin.to_string(),
            reason,
        };
        if !is_plain_name(&self.dataset) {
            return Err(bad(format!(
                "dataset {:?} is not a folder name",
                self.dataset
            )));
        }
        if self.repo.split('/').count() != 2 || self.repo.split('/').any(str::is_empty) {
            return Err(bad(format!("repo {:?} is not owner/name", self.repo)));
        }
        if self.files.is_empty() {
            return Err(bad("lists no files".into()));
        }
        for file in &self.files {
            let relative = Path::new(&file.path);
            let plain = relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
            if file.path.is_empty() || !plain {
                return Err(bad(format!(
                    "file path {:?} must be relative, without ..",
                    file.path
                )));
            }
            let hex = file.sha256.len() == 64
                && file
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex {
                return Err(bad(format!(
                    "sha256 of {} is not 64 lowercase hex digits",
                    file.path
                )));
            }
        }
        Ok(())
    }
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\'])
}

/// How [`fetch`] talks to the hub.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// The hub's address; `None` takes `HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Bytes asked for per request, and written to the `.part` file at a time:
    /// what a broken connection can cost. Default 32 MiB.
    pub range_bytes: u64,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            endpoint: None,
            range_bytes: 32 << 20,
        }
    }
}

/// What [`fetch`] reports as it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchEvent<'a> {
    /// `done` of `size` bytes of `file` are on disk (also when resuming).
    Downloading { file: &'a str, done: u64, size: u64 },
    /// `file`, of `size` bytes, matched its checksum.
    Verified { file: &'a str, size: u64 },
    /// `file` is being unpacked into the dataset folder.
    Unpacking { file: &'a str },
}

/// Where [`fetch_from`] gets the bytes of a manifest's files.
pub trait RangeSource {
    /// Bytes `range` of file `path`, exactly `range.end - range.start` of them.
    fn range(&self, path: &str, range: std::ops::Range<u64>) -> Result<Vec<u8>>;

    /// Names the source in errors, e.g. `owner/repo`.
    fn name(&self) -> &str;
}

/// Downloads, checks and unpacks `manifest`'s dataset from the hub into
/// `root/<dataset>`, which must not exist yet; returns that folder.
pub fn fetch(
    manifest: &Manifest,
    root: &Path,
    options: &FetchOptions,
    on_event: &mut dyn FnMut(FetchEvent),
) -> Result<PathBuf> {
    let hub = hub::Hub::connect(manifest, options.endpoint.as_deref())?;
    fetch_from(&hub, manifest, root, options.range_bytes, on_event)
}

/// [`fetch`] from any source of file ranges.
pub fn fetch_from(
    source: &dyn RangeSource,
    manifest: &Manifest,
    root: &Path,
    range_bytes: u64,
    on_event: &mut dyn FnMut(FetchEvent),
) -> Result<PathBuf> {
    let target = root.join(&manifest.dataset);
    if target.exists() {
        return Err(DataError::InvalidSpec {
            field: "dataset folder",
            value: target.display().to_string(),
            reason: "already exists; move or delete it to fetch the dataset again".into(),
        });
    }
    if range_bytes == 0 {
        return Err(DataError::InvalidSpec {
            field: "range_bytes",
            value: "0".into(),
            reason: "must be at least 1".into(),
        });
    }
    let staging = root.join(format!(".{}.fetch", manifest.dataset));
    let downloads = staging.join("downloads");
    fs::create_dir_all(&downloads).map_err(|e| DataError::io(&downloads, e))?;

    for file in &manifest.files {
        download_verified(source, file, &downloads, range_bytes, on_event)?;
    }

    // Unpacked afresh each time: a tree left by a killed unpack is never trusted.
    let tree = staging.join("tree");
    if tree.exists() {
        fs::remove_dir_all(&tree).map_err(|e| DataError::io(&tree, e))?;
    }
    let unpacked = tree.join(&manifest.dataset);
    fs::create_dir_all(&unpacked).map_err(|e| DataError::io(&unpacked, e))?;
    for file in &manifest.files {
        on_event(FetchEvent::Unpacking { file: &file.path });
        let local = downloads.join(&file.path);
        match file.unpack {
            Unpack::Tar => unpack_tar(&local, &unpacked)?,
            Unpack::File => {
                let dest = unpacked.join(&file.path);
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
                }
                fs::copy(&local, &dest).map_err(|e| DataError::io(&dest, e))?;
            }
        }
    }
    fs::rename(&unpacked, &target).map_err(|e| DataError::io(&target, e))?;
    fs::remove_dir_all(&staging).map_err(|e| DataError::io(&staging, e))?;
    Ok(target)
}

/// The hub as a [`RangeSource`]: through `hf-hub` with the `download`
/// feature, else an error that says how to rebuild.
mod hub {
    use super::{Manifest, RangeSource};
    use crate::error::{DataError, Result};

    #[cfg(feature = "download")]
    pub struct Hub {
        repo: hf_hub::HFRepositorySync<hf_hub::RepoTypeDataset>,
        revision: String,
        name: String,
    }

    #[cfg(feature = "download")]
    impl Hub {
        pub fn connect(manifest: &Manifest, endpoint: Option<&str>) -> Result<Hub> {
            let download_error = |message: String| DataError::Download {
                file: manifest.repo.clone(),
                message,
            };
            let mut builder = hf_hub::HFClient::builder();
            if let Some(endpoint) = endpoint {
                builder = builder.endpoint(endpoint);
            }
            let client = builder.build().map_err(|e| download_error(e.to_string()))?;
            let client = hf_hub::HFClientSync::from_inner(client)
                .map_err(|e| download_error(e.to_string()))?;
            let (owner, name) = hf_hub::split_id(&manifest.repo);
            Ok(Hub {
                repo: client.dataset(owner, name),
                revision: manifest.revision.clone(),
                name: manifest.repo.clone(),
            })
        }
    }

    #[cfg(feature = "download")]
    impl RangeSource for Hub {
        fn range(&self, path: &str, range: std::ops::Range<u64>) -> Result<Vec<u8>> {
            let bytes = self
                .repo
                .download_file_to_bytes()
                .filename(path)
                .revision(self.revision.clone())
                .range(range.clone())
                .send()
                .map_err(|e| DataError::Download {
                    file: format!("{}/{path}", self.name),
                    message: format!(
                        "{e} (bytes {}..{}); what came before is kept: fetch again to resume",
                        range.start, range.end
                    ),
                })?;
            Ok(bytes.to_vec())
        }

        fn name(&self) -> &str {
            &self.name
        }
    }

    /// Never built: connecting says how to get a build that downloads.
    #[cfg(not(feature = "download"))]
    pub enum Hub {}

    #[cfg(not(feature = "download"))]
    impl Hub {
        pub fn connect(manifest: &Manifest, _endpoint: Option<&str>) -> Result<Hub> {
            Err(DataError::Download {
                file: manifest.repo.clone(),
                message: "this build cannot download: rebuild with the cargo feature \
                          `download` (`cargo build --release -p bench-runner --features download`)"
                    .into(),
            })
        }
    }

    #[cfg(not(feature = "download"))]
    impl RangeSource for Hub {
        fn range(&self, _path: &str, _range: std::ops::Range<u64>) -> Result<Vec<u8>> {
            match *self {}
        }

        fn name(&self) -> &str {
            match *self {}
        }
    }
}

/// Brings `file` into `downloads/` complete and checked, resuming a `.part`
/// left by an earlier run.
fn download_verified(
    source: &dyn RangeSource,
    file: &ManifestFile,
    downloads: &Path,
    range_bytes: u64,
    on_event: &mut dyn FnMut(FetchEvent),
) -> Result<()> {
    let done_path = downloads.join(&file.path);
    if done_path.is_file() && sha256_of(&done_path)? == file.sha256 {
        on_event(FetchEvent::Verified {
            file: &file.path,
            size: file.size,
        });
        return Ok(());
    }
    let part_path = downloads.join(format!("{}.part", file.path));
    if let Some(parent) = part_path.parent() {
        fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    }
    let mut part = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&part_path)
        .map_err(|e| DataError::io(&part_path, e))?;
    let mut done = part
        .metadata()
        .map_err(|e| DataError::io(&part_path, e))?
        .len();
    if done > file.size {
        // Longer than the file can be: not a prefix of it.
        part.set_len(0).map_err(|e| DataError::io(&part_path, e))?;
        done = 0;
    }
    on_event(FetchEvent::Downloading {
        file: &file.path,
        done,
        size: file.size,
    });
    while done < file.size {
        let end = file.size.min(done + range_bytes);
        let bytes = source.range(&file.path, done..end)?;
        if bytes.len() as u64 != end - done {
            return Err(DataError::Download {
                file: format!("{}/{}", source.name(), file.path),
                message: format!(
                    "asked for bytes {done}..{end}, got {} bytes (a cut connection, or the file \
                     is not what the manifest says); fetch again to resume",
                    bytes.len()
                ),
            });
        }
        part.write_all(&bytes)
            .map_err(|e| DataError::io(&part_path, e))?;
        // On disk before it counts, so a resumed run never trusts lost bytes.
        part.sync_data().map_err(|e| DataError::io(&part_path, e))?;
        done = end;
        on_event(FetchEvent::Downloading {
            file: &file.path,
            done,
            size: file.size,
        });
    }
    drop(part);
    let actual = sha256_of(&part_path)?;
    if actual != file.sha256 {
        fs::remove_file(&part_path).map_err(|e| DataError::io(&part_path, e))?;
        return Err(DataError::Checksum {
            file: format!("{}/{}", source.name(), file.path),
            expected: file.sha256.clone(),
            actual,
        });
    }
    fs::rename(&part_path, &done_path).map_err(|e| DataError::io(&done_path, e))?;
    on_event(FetchEvent::Verified {
        file: &file.path,
        size: file.size,
    });
    Ok(())
}

/// SHA-256 of a file, as lowercase hex.
pub fn sha256_of(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(|e| DataError::io(path, e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Unpacks a tar archive into `dest`; an entry that would land outside
/// `dest` (absolute, or through `..`) is refused.
fn unpack_tar(archive: &Path, dest: &Path) -> Result<()> {
    let file = File::open(archive).map_err(|e| DataError::io(archive, e))?;
    let bad = |message: String| DataError::Download {
        file: archive.display().to_string(),
        message,
    };
    let mut entries = tar::Archive::new(file);
    for entry in entries.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let inside = entry.unpack_in(dest).map_err(|e| bad(e.to_string()))?;
        if !inside {
            let name = entry
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(bad(format!(
                "entry {name:?} points outside the dataset folder"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files served from memory, `short` bytes fewer than asked for when set.
    struct MemorySource {
        files: std::collections::HashMap<String, Vec<u8>>,
        short: usize,
    }

    impl RangeSource for MemorySource {
        fn range(&self, path: &str, range: std::ops::Range<u64>) -> Result<Vec<u8>> {
            let bytes = &self.files[path][range.start as usize..range.end as usize];
            Ok(bytes[..bytes.len() - self.short.min(bytes.len())].to_vec())
        }

        fn name(&self) -> &str {
            "memory/repo"
        }
    }

    fn one_file(content: &[u8]) -> (MemorySource, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), content).unwrap();
        let manifest = format!(
            r#"{{"dataset": "d", "repo": "memory/repo", "revision": "r", "files": [
                {{"path": "notes/a.txt", "size": {}, "sha256": "{}", "unpack": "file"}}]}}"#,
            content.len(),
            sha256_of(&dir.path().join("f")).unwrap()
        );
        let files = [("notes/a.txt".to_string(), content.to_vec())].into();
        (
            MemorySource { files, short: 0 },
            Manifest::parse(&manifest, "m").unwrap(),
        )
    }

    #[test]
    fn fetches_from_any_source_and_refuses_a_short_answer() {
        let (mut source, manifest) = one_file(b"hello, few-shot world");
        let root = tempfile::tempdir().unwrap();
        source.short = 1;
        let err = fetch_from(&source, &manifest, root.path(), 8, &mut |_| {}).unwrap_err();
        assert!(
            err.to_string().contains("memory/repo/notes/a.txt")
                && err.to_string().contains("asked for bytes 0..8, got 7"),
            "{err}"
        );
        source.short = 0;
        let folder = fetch_from(&source, &manifest, root.path(), 8, &mut |_| {}).unwrap();
        let text = std::fs::read_to_string(folder.join("notes/a.txt")).unwrap();
        assert_eq!(text, "hello, few-shot world");
        let err = fetch_from(&source, &manifest, root.path(), 0, &mut |_| {});
        assert!(err.unwrap_err().to_string().contains("already exists"));
    }

    #[test]
    #[cfg(not(feature = "download"))]
    fn without_the_feature_fetch_says_how_to_rebuild() {
        let (_, manifest) = one_file(b"x");
        let root = tempfile::tempdir().unwrap();
        let err = fetch(
            &manifest,
            root.path(),
            &FetchOptions::default(),
            &mut |_| {},
        );
        let err = err.unwrap_err().to_string();
        assert!(err.contains("--features download"), "{err}");
    }

    #[test]
    fn bad_manifests_are_named() {
        for (manifest, needle) in [
            (
                r#"{"dataset": "../x", "repo": "a/b", "revision": "r", "files": []}"#,
                "folder name",
            ),
            (
                r#"{"dataset": "x", "repo": "ab", "revision": "r", "files": []}"#,
                "owner/name",
            ),
            (
                r#"{"dataset": "x", "repo": "a/b", "revision": "r", "files": []}"#,
                "no files",
            ),
            (
                r#"{"dataset": "x", "repo": "a/b", "revision": "r", "files": [
                    {"path": "../evil", "size": 1, "sha256": "00", "unpack": "file"}]}"#,
                "without ..",
            ),
            (
                r#"{"dataset": "x", "repo": "a/b", "revision": "r", "files": [
                    {"path": "f", "size": 1, "sha256": "00", "unpack": "file"}]}"#,
                "64 lowercase hex",
            ),
            (
                r#"{"dataset": "x", "repo": "a/b", "revision": "r", "files": [], "extra": 1}"#,
                "extra",
            ),
        ] {
            let err = Manifest::parse(manifest, "m.json").unwrap_err().to_string();
            assert!(
                err.contains("m.json") && err.contains(needle),
                "{needle}: {err}"
            );
        }
    }

    #[test]
    fn the_builtin_omniglot_manifest_is_valid() {
        let manifest = Manifest::builtin("omniglot").unwrap().unwrap();
        assert_eq!(manifest.dataset, "omniglot");
        let tar_files: Vec<&str> = manifest
            .files
            .iter()
            .filter(|f| f.unpack == Unpack::Tar)
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(
            tar_files,
            ["images_background.tar", "images_evaluation.tar"]
        );
        assert!(Manifest::builtin("no-such-dataset").is_none());
    }
}
