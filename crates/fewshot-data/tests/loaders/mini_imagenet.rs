use fewshot_data::mini_imagenet::{load, load_with_status};
use fewshot_data::{CacheOptions, CacheStatus, DataError, MiniImageNetOptions};

use crate::fixtures::write_mini_imagenet;

fn options(image_size: usize, cache: CacheOptions) -> MiniImageNetOptions {
    MiniImageNetOptions { image_size, cache }
}

#[test]
fn loads_the_ravi_larochelle_layout() {
    for csv_in_splits in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_mini_imagenet(dir.path(), csv_in_splits);
        let data = load(dir.path(), &options(6, CacheOptions::disabled())).unwrap();
        assert_eq!(data.store.shape(), (3, 6, 6));
        assert_eq!(data.store.len(), 35);
        assert_eq!(data.class_counts(), [3, 2, 2]);
        assert_eq!(data.val.classes[0].name, "n00001003");
        assert_eq!(data.val.classes[0].images, [15, 16, 17, 18, 19]);
        // Colour [90, 100, 200] (class 3) as three planes, JPEG within a few levels.
        let image = data.store.image(15);
        for (plane, want) in image.chunks(36).zip([90i32, 100, 200]) {
            assert!(
                plane.iter().all(|&v| (i32::from(v) - want).abs() <= 4),
                "{plane:?}"
            );
        }
    }
}

#[test]
fn second_load_reads_the_cache() {
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    write_mini_imagenet(data.path(), false);
    let opts = options(6, CacheOptions::in_dir(cache.path()));
    let (first, status) = load_with_status(data.path(), &opts).unwrap();
    assert_eq!(status, CacheStatus::Miss);
    let (second, status) = load_with_status(data.path(), &opts).unwrap();
    assert_eq!(status, CacheStatus::Hit);
    assert_eq!(first.store, second.store);
    assert_eq!(first.test, second.test);
}

#[test]
fn missing_pieces_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mini-imagenet");
    let err = load(&root, &MiniImageNetOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::MissingDataset { .. }), "{err}");
    assert!(err.to_string().contains("train.csv"), "{err}");

    write_mini_imagenet(&root, false);
    let image = root.join("images/n0000100100000002.jpg");
    std::fs::remove_file(&image).unwrap();
    let err = load(&root, &options(6, CacheOptions::disabled())).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
    assert!(err.to_string().contains("n0000100100000002.jpg"), "{err}");

    std::fs::write(&image, b"not a jpeg").unwrap();
    let err = load(&root, &options(6, CacheOptions::disabled())).unwrap_err();
    assert!(matches!(err, DataError::Image { .. }), "{err}");
    assert!(err.to_string().contains("n0000100100000002.jpg"), "{err}");

    std::fs::remove_file(root.join("test.csv")).unwrap();
    let err = load(&root, &options(6, CacheOptions::disabled())).unwrap_err();
    assert!(matches!(err, DataError::MissingDataset { .. }), "{err}");
    assert!(err.to_string().contains("test.csv"), "{err}");

    std::fs::remove_dir_all(root.join("images")).unwrap();
    let err = load(&root, &options(6, CacheOptions::disabled())).unwrap_err();
    assert!(matches!(err, DataError::MissingDataset { .. }), "{err}");
}

#[test]
fn malformed_csv_row_gives_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write_mini_imagenet(dir.path(), false);
    let val = dir.path().join("val.csv");
    let mut text = std::fs::read_to_string(&val).unwrap();
    text.push_str("only-one-field\n");
    std::fs::write(&val, text).unwrap();
    let err = load(dir.path(), &options(6, CacheOptions::disabled())).unwrap_err();
    assert!(
        matches!(err, DataError::SplitLine { line: 12, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("val.csv:12:"), "{err}");
}
