//! A cache of decoded images, so that only the first load of a dataset pays
//! for decoding and resizing tens of thousands of files.
//!
//! The file name carries a 64-bit key computed from everything the pixels
//! depend on: the dataset kind, [`FORMAT_VERSION`], the [`Preprocess`]
//! options, and the relative path, byte size and modification time of every
//! source image. Any change gives a new key, so a stale cache is never read;
//! old files are simply left behind (delete the cache folder to reclaim space).
//!
//! File layout, little-endian: magic `FEWSHOT\0`, format version (u32),
//! channels, height, width (u32 each), image count (u64), key (u64),
//! checksum of the pixels (u64), then the pixels exactly as in the
//! [`ImageStore`]. A file that does not match is logged and rebuilt.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::preprocess::{decode_files, decode_regions, CropBox, Preprocess};
use crate::store::ImageStore;

/// Bump whenever decoding changes the pixels it produces (filter, colour
/// conversion, layout), so caches written by older versions are not read.
pub const FORMAT_VERSION: u32 = 1;

const MAGIC: &[u8; 8] = b"FEWSHOT\0";
const HEADER_LEN: usize = 48;

/// Environment variable naming the cache folder.
pub const CACHE_DIR_ENV: &str = "FEWSHOT_CACHE_DIR";

/// Whether and where to cache decoded images.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheOptions {
    pub enabled: bool,
    /// Overrides `$FEWSHOT_CACHE_DIR`, `$XDG_CACHE_HOME/fewshot` and
    /// `$HOME/.cache/fewshot`, tried in that order.
    pub dir: Option<PathBuf>,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            enabled: true,
            dir: None,
        }
    }
}

impl CacheOptions {
    pub fn disabled() -> Self {
        CacheOptions {
            enabled: false,
            dir: None,
        }
    }

    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        CacheOptions {
            enabled: true,
            dir: Some(dir.into()),
        }
    }

    /// The folder to use, or `None` when caching is off or no folder can be found.
    pub fn resolve_dir(&self) -> Option<PathBuf> {
        if !self.enabled {
            return None;
        }
        let env = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        self.dir
            .clone()
            .or_else(|| env(CACHE_DIR_ENV))
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("fewshot")))
            .or_else(|| env("HOME").map(|d| d.join(".cache").join("fewshot")))
    }
}

/// What a load did with the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// Caching was off (or no cache folder could be found): decoded from the files.
    Disabled,
    /// Read from a valid cache file; no image was decoded.
    Hit,
    /// No valid cache file: decoded from the files, then written to the cache.
    Miss,
}

/// One source image and what identifies its content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceFile {
    pub path: PathBuf,
    /// Path relative to the dataset root, so moving the dataset keeps the cache valid.
    pub rel: String,
    pub len: u64,
    /// Modification time in nanoseconds since 1970 (0 if unavailable).
    pub mtime_ns: u128,
}

impl SourceFile {
    /// Reads size and modification time of `path`, which lies under `root`.
    pub fn stat(root: &Path, path: PathBuf) -> Result<SourceFile> {
        let meta = std::fs::metadata(&path).map_err(|e| DataError::io(&path, e))?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let rel = rel.to_string_lossy().replace('\\', "/");
        Ok(SourceFile {
            path,
            rel,
            len: meta.len(),
            mtime_ns,
        })
    }
}

/// FNV-1a, 64 bit: tiny, and unlike std's hasher its output is fixed forever.
pub(crate) struct Fnv1a(pub(crate) u64);

impl Fnv1a {
    const PRIME: u64 = 0x0000_0100_0000_01B3;

    pub(crate) fn new() -> Self {
        Fnv1a(0xCBF2_9CE4_8422_2325)
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(Self::PRIME);
        }
    }

    /// Length first, so that ("ab", "c") and ("a", "bc") hash differently.
    pub(crate) fn str(&mut self, s: &str) {
        self.bytes(&(s.len() as u64).to_le_bytes());
        self.bytes(s.as_bytes());
    }
}

/// The cache key of a dataset decoded with `pre` from `sources` (in order).
pub fn cache_key(kind: &str, pre: &Preprocess, sources: &[SourceFile]) -> u64 {
    let mut h = Fnv1a::new();
    h.str(kind);
    h.bytes(&FORMAT_VERSION.to_le_bytes());
    for v in [
        pre.size,
        pre.channels,
        usize::from(pre.invert),
        pre.resampling as usize,
        sources.len(),
    ] {
        h.bytes(&(v as u64).to_le_bytes());
    }
    for source in sources {
        h.str(&source.rel);
        h.bytes(&source.len.to_le_bytes());
        h.bytes(&source.mtime_ns.to_le_bytes());
    }
    h.0
}

/// FNV-1a over 64-bit words rather than bytes: eight times fewer steps, and
/// enough to notice a damaged file.
fn checksum(pixels: &[u8]) -> u64 {
    let mut h = Fnv1a::new().0;
    let mut words = pixels.chunks_exact(8);
    for word in &mut words {
        let mut w = [0; 8];
        w.copy_from_slice(word);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(Fnv1a::PRIME);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(Fnv1a::PRIME);
    }
    h
}

/// [`load_or_build`] whose build decodes the sources' own files with `pre`,
/// image `i` first cut to `crops[i]` where crops are given: what every
/// loader of image files does.
pub(crate) fn load_or_decode(
    kind: &str,
    options: &CacheOptions,
    pre: &Preprocess,
    sources: &[SourceFile],
    crops: Option<&[Option<CropBox>]>,
) -> Result<(ImageStore, CacheStatus)> {
    load_or_build(kind, options, pre, sources, || {
        let paths: Vec<PathBuf> = sources.iter().map(|s| s.path.clone()).collect();
        match crops {
            Some(crops) => decode_regions(&paths, crops, pre),
            None => decode_files(&paths, pre),
        }
    })
}

/// The cached images of `sources` decoded with `pre` if a valid cache file
/// exists; otherwise `build()`, whose result is then written to the cache.
/// Cache problems never fail the load: they are logged and the data rebuilt.
pub fn load_or_build(
    kind: &str,
    options: &CacheOptions,
    pre: &Preprocess,
    sources: &[SourceFile],
    build: impl FnOnce() -> Result<ImageStore>,
) -> Result<(ImageStore, CacheStatus)> {
    let Some(dir) = options.resolve_dir() else {
        return Ok((build()?, CacheStatus::Disabled));
    };
    let key = cache_key(kind, pre, sources);
    let path = dir.join(format!("{kind}-{key:016x}.bin"));
    let expected = Header {
        shape: (pre.channels, pre.size, pre.size),
        count: sources.len(),
        key,
    };
    match read(&path, &expected) {
        Ok(Some(store)) => {
            tracing::info!(path = %path.display(), images = store.len(), "read {kind} from cache");
            return Ok((store, CacheStatus::Hit));
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("{e}; decoding the images again"),
    }
    let store = build()?;
    match write(&path, key, &store) {
        Ok(()) => tracing::info!(path = %path.display(), "wrote {kind} cache"),
        Err(e) => tracing::warn!("{e}; continuing without a cache"),
    }
    Ok((store, CacheStatus::Miss))
}

/// What a cache file must contain to be used.
struct Header {
    shape: (usize, usize, usize),
    count: usize,
    key: u64,
}

/// `Ok(None)` if there is no cache file; an error if there is one we cannot use.
fn read(path: &Path, expected: &Header) -> Result<Option<ImageStore>> {
    let bad = |message: String| DataError::Cache {
        path: path.to_path_buf(),
        message,
    };
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    let (c, h, w) = expected.shape;
    let pixel_len = expected.count * c * h * w;
    let file_len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    if file_len != (HEADER_LEN + pixel_len) as u64 {
        return Err(bad(format!(
            "{file_len} bytes, expected {} (truncated or written by another version)",
            HEADER_LEN + pixel_len
        )));
    }
    let mut header = [0u8; HEADER_LEN];
    file.read_exact(&mut header)
        .map_err(|e| bad(e.to_string()))?;
    let mut want = Vec::with_capacity(40);
    want.extend_from_slice(MAGIC);
    want.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    for v in [c, h, w] {
        want.extend_from_slice(&(v as u32).to_le_bytes());
    }
    want.extend_from_slice(&(expected.count as u64).to_le_bytes());
    want.extend_from_slice(&expected.key.to_le_bytes());
    if header[..40] != want[..] {
        return Err(bad(
            "header does not match the expected format, shape or key".into(),
        ));
    }
    let mut pixels = vec![0u8; pixel_len];
    file.read_exact(&mut pixels)
        .map_err(|e| bad(e.to_string()))?;
    let mut stored_sum = [0u8; 8];
    stored_sum.copy_from_slice(&header[40..]);
    if checksum(&pixels) != u64::from_le_bytes(stored_sum) {
        return Err(bad("checksum mismatch (damaged file)".into()));
    }
    ImageStore::new(c, h, w, pixels).map(Some)
}

/// Writes to a temporary file in the same folder, then renames it into
/// place, so that readers (other processes too) never see a partial file.
fn write(path: &Path, key: u64, store: &ImageStore) -> Result<()> {
    let bad = |message: String| DataError::Cache {
        path: path.to_path_buf(),
        message,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create folder: {e}")))?;

    let (c, h, w) = store.shape();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    for v in [c, h, w] {
        let v = u32::try_from(v).map_err(|_| bad(format!("dimension {v} too large")))?;
        header.extend_from_slice(&v.to_le_bytes());
    }
    header.extend_from_slice(&(store.len() as u64).to_le_bytes());
    header.extend_from_slice(&key.to_le_bytes());
    header.extend_from_slice(&checksum(store.pixels()).to_le_bytes());

    // Unique per process and moment, so concurrent writers do not collide.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = path
        .file_name()
        .map_or("cache".into(), |n| n.to_string_lossy());
    let tmp = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let result = File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(&header)?;
            file.write_all(store.pixels())
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        // Best effort: the temporary file may not even exist.
        let _ = std::fs::remove_file(&tmp);
        return Err(bad(e.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::Resampling;

    fn pre() -> Preprocess {
        Preprocess {
            size: 2,
            channels: 1,
            invert: false,
            resampling: Resampling::Area,
        }
    }

    fn source(rel: &str, len: u64, mtime_ns: u128) -> SourceFile {
        SourceFile {
            path: PathBuf::from(rel),
            rel: rel.into(),
            len,
            mtime_ns,
        }
    }

    #[test]
    fn fnv1a_matches_the_published_test_vector() {
        let mut h = Fnv1a::new();
        h.bytes(b"a");
        assert_eq!(h.0, 0xAF63_DC4C_8601_EC8C);
    }

    #[test]
    fn key_changes_with_every_input() {
        let sources = vec![source("a/1.png", 10, 5), source("a/2.png", 11, 6)];
        let base = cache_key("omniglot", &pre(), &sources);
        assert_eq!(base, cache_key("omniglot", &pre(), &sources.clone()));
        assert_ne!(base, cache_key("mini-imagenet", &pre(), &sources));
        let bigger = Preprocess { size: 3, ..pre() };
        assert_ne!(base, cache_key("omniglot", &bigger, &sources));
        let inverted = Preprocess {
            invert: true,
            ..pre()
        };
        assert_ne!(base, cache_key("omniglot", &inverted, &sources));
        let nearest = Preprocess {
            resampling: Resampling::Nearest,
            ..pre()
        };
        assert_ne!(base, cache_key("omniglot", &nearest, &sources));
        for changed in [
            source("a/1.png", 12, 5),
            source("a/1.png", 10, 7),
            source("a/3.png", 10, 5),
        ] {
            let mut other = sources.clone();
            other[0] = changed;
            assert_ne!(base, cache_key("omniglot", &pre(), &other));
        }
        assert_ne!(base, cache_key("omniglot", &pre(), &sources[..1]));
    }

    #[test]
    fn second_load_hits_and_damaged_files_are_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let options = CacheOptions::in_dir(dir.path());
        let sources = vec![source("x.png", 1, 1), source("y.png", 2, 2)];
        let store = || ImageStore::new(1, 2, 2, (0..8).collect());

        let (first, status) = load_or_build("t", &options, &pre(), &sources, store).unwrap();
        assert_eq!(status, CacheStatus::Miss);
        let (second, status) = load_or_build("t", &options, &pre(), &sources, || {
            panic!("must not decode on a cache hit")
        })
        .unwrap();
        assert_eq!(status, CacheStatus::Hit);
        assert_eq!(first, second);

        // Damage one pixel, then cut the file short: both are rebuilt.
        let key = cache_key("t", &pre(), &sources);
        let path = dir.path().join(format!("t-{key:016x}.bin"));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (_, status) = load_or_build("t", &options, &pre(), &sources, store).unwrap();
        assert_eq!(status, CacheStatus::Miss);
        std::fs::write(&path, &bytes[..20]).unwrap();
        let (again, status) = load_or_build("t", &options, &pre(), &sources, store).unwrap();
        assert_eq!(status, CacheStatus::Miss);
        assert_eq!(again, first);
        let (_, status) = load_or_build("t", &options, &pre(), &sources, store).unwrap();
        assert_eq!(status, CacheStatus::Hit);

        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn disabled_cache_always_builds() {
        let sources = vec![source("x.png", 1, 1)];
        let store = || ImageStore::new(1, 2, 2, vec![0; 4]);
        let (_, status) =
            load_or_build("t", &CacheOptions::disabled(), &pre(), &sources, store).unwrap();
        assert_eq!(status, CacheStatus::Disabled);
        assert_eq!(CacheOptions::disabled().resolve_dir(), None);
        assert_eq!(
            CacheOptions::in_dir("/c").resolve_dir(),
            Some(PathBuf::from("/c"))
        );
    }
}
