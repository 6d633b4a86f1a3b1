use fewshot_data::cub::{self, CubOptions};
use fewshot_data::{CacheOptions, CacheStatus, DataError};

use crate::fixtures::write_cub;

fn options(crop: bool, cache: CacheOptions) -> CubOptions {
    CubOptions {
        image_size: 8,
        crop,
        cache,
    }
}

#[test]
fn species_split_100_50_50_and_images_are_cut_to_their_boxes() {
    let dir = tempfile::tempdir().unwrap();
    write_cub(dir.path(), 2);
    let (data, _) = cub::load(dir.path(), &options(true, CacheOptions::disabled())).unwrap();
    assert_eq!(data.class_counts(), [100, 50, 50]);
    assert_eq!(data.store.len(), 400);
    assert_eq!(data.store.shape(), (3, 8, 8));
    assert_eq!(data.train.classes[0].name, "001.Black_footed_Albatross");
    // Cropped to the blue half: no red left (JPEG blurs a little).
    let image = data.store.image(0);
    assert!(
        image[..64].iter().all(|&red| red < 40),
        "{:?}",
        &image[..64]
    );
    assert!(image[128..].iter().all(|&blue| blue > 215));

    let (whole, _) = cub::load(dir.path(), &options(false, CacheOptions::disabled())).unwrap();
    assert!(whole.store.image(0)[..64].iter().any(|&red| red > 200));
}

#[test]
fn the_cache_is_read_again_and_follows_the_boxes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    write_cub(dir.path(), 1);
    let with_cache = options(true, CacheOptions::in_dir(cache.path()));
    let (first, status) = cub::load(dir.path(), &with_cache).unwrap();
    assert_eq!(status, CacheStatus::Miss);
    let (second, status) = cub::load(dir.path(), &with_cache).unwrap();
    assert_eq!(status, CacheStatus::Hit);
    assert_eq!(first.store.pixels(), second.store.pixels());
    // Another box for one image: the cache is not used.
    let boxes = dir.path().join("bounding_boxes.txt");
    let text = std::fs::read_to_string(&boxes).unwrap();
    std::fs::write(&boxes, text.replacen("1 10.0 0.0", "1 0.0 0.0", 1)).unwrap();
    let (_, status) = cub::load(dir.path(), &with_cache).unwrap();
    assert_eq!(status, CacheStatus::Miss);
}

#[test]
fn missing_and_malformed_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let no_cache = options(true, CacheOptions::disabled());
    let err = cub::load(&dir.path().join("nowhere"), &no_cache).unwrap_err();
    assert!(matches!(err, DataError::MissingDataset { .. }), "{err}");
    assert!(err.to_string().contains("CUB_200_2011.tgz"), "{err}");

    write_cub(dir.path(), 1);
    let boxes = dir.path().join("bounding_boxes.txt");
    std::fs::write(&boxes, "1 0 0 ten 10\n").unwrap();
    let err = cub::load(dir.path(), &no_cache).unwrap_err();
    assert!(err.to_string().contains("bounding_boxes.txt:1"), "{err}");
    std::fs::write(&boxes, "1 0 0 10 10\n").unwrap();
    let err = cub::load(dir.path(), &no_cache).unwrap_err();
    assert!(err.to_string().contains("image 2"), "{err}");

    let list = dir.path().join("images.txt");
    let text = std::fs::read_to_string(&list).unwrap();
    std::fs::write(&list, text.replace("001.Black_footed_Albatross/", "")).unwrap();
    let err = cub::load(dir.path(), &options(false, CacheOptions::disabled())).unwrap_err();
    assert!(err.to_string().contains("images.txt:1"), "{err}");
}
