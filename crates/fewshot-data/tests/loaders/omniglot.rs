use std::path::Path;
use std::time::{Duration, SystemTime};

use fewshot_data::{
    CacheOptions, CacheStatus, DataError, Omniglot, OmniglotOptions, OmniglotSet, Rotation,
};

use crate::fixtures::{write_grey_png, write_omniglot};

fn options(image_size: usize, cache: CacheOptions) -> OmniglotOptions {
    OmniglotOptions {
        image_size,
        cache,
        ..Default::default()
    }
}

fn load(root: &Path) -> Omniglot {
    Omniglot::load(root, &options(10, CacheOptions::disabled())).unwrap()
}

#[test]
fn loads_characters_in_order_and_inverts() {
    let dir = tempfile::tempdir().unwrap();
    write_omniglot(dir.path());
    let omniglot = load(dir.path());
    assert_eq!(omniglot.characters.len(), 7);
    assert_eq!(omniglot.store.len(), 28);
    assert_eq!(omniglot.store.shape(), (1, 10, 10));
    assert_eq!(omniglot.num_alphabets(), 3);
    assert_eq!(omniglot.cache, CacheStatus::Disabled);

    let ids: Vec<String> = omniglot.characters.iter().map(|c| c.id()).collect();
    assert_eq!(ids[0], "Alpha/character01");
    assert_eq!(ids[4], "Beta/character02");
    assert_eq!(ids[6], "Gamma/character02");
    assert_eq!(omniglot.characters[5].set, OmniglotSet::Evaluation);
    assert_eq!(omniglot.characters[1].images, [4, 5, 6, 7]);

    // Drawing 3 (file _03) has a 3x3 black square: ink 255 after inversion.
    let image = omniglot.store.image(2);
    let ink: Vec<usize> = (0..100).filter(|&i| image[i] == 255).collect();
    assert_eq!(ink, [0, 1, 2, 10, 11, 12, 20, 21, 22]);
    assert!(image.iter().all(|&v| v == 0 || v == 255));
}

#[test]
fn resizes_to_the_requested_size() {
    let dir = tempfile::tempdir().unwrap();
    write_omniglot(dir.path());
    let omniglot = Omniglot::load(dir.path(), &options(5, CacheOptions::disabled())).unwrap();
    assert_eq!(omniglot.store.shape(), (1, 5, 5));
    // The biggest square (4x4 of 10x10) still shows in the top-left corner.
    let image = omniglot.store.image(3);
    assert!(image[0] > 128 && image[24] < 20, "{image:?}");
}

#[test]
fn splits_follow_the_three_conventions() {
    let dir = tempfile::tempdir().unwrap();
    write_omniglot(dir.path());
    let omniglot = load(dir.path());

    let vinyals = omniglot.vinyals().unwrap();
    assert_eq!(vinyals.class_counts(), [12, 4, 12]);
    let class = &vinyals.train.classes[1];
    assert_eq!(class.name, "Alpha/character01/rot090");
    assert_eq!(class.rotation, Rotation::R90);
    assert_eq!(class.group, "Alpha");
    assert_eq!(class.images, [0, 1, 2, 3]);
    assert!(!vinyals.train.random_rotation);
    assert_eq!(vinyals.test.groups(), 2);

    let maml = omniglot.maml(1);
    // 7 characters in MAML's proportions 1100 : 100 : 423.
    assert_eq!(maml.class_counts(), [5, 0, 2]);
    assert!(maml.train.random_rotation && maml.test.random_rotation);
    let mut names: Vec<&str> = [&maml.train, &maml.test]
        .iter()
        .flat_map(|s| s.classes.iter().map(|c| c.name.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 7);
    assert_eq!(omniglot.maml(1).train, maml.train);

    let lake = omniglot.lake();
    assert_eq!(lake.train.classes.len(), 5);
    assert!(lake.val.classes.is_empty());
    assert_eq!(lake.test.classes.len(), 2);
    assert_eq!(lake.test.classes[0].group, "Gamma");

    // Whole background alphabets held out for validation, seeded.
    let held = omniglot.lake_with_validation(1, 7).unwrap();
    assert_eq!(held.val.groups(), 1);
    assert_eq!(held.train.groups(), 1);
    assert_ne!(held.val.classes[0].group, held.train.classes[0].group);
    assert_eq!(held.train.classes.len() + held.val.classes.len(), 5);
    assert_eq!(held.test, lake.test);
    let alphabets = |seed| {
        omniglot.lake_with_validation(1, seed).unwrap().val.classes[0]
            .group
            .clone()
    };
    assert_eq!(alphabets(7), held.val.classes[0].group);
    assert!((0..20).any(|seed| alphabets(seed) != alphabets(7)));
    assert_eq!(
        omniglot.lake_with_validation(0, 7).unwrap().train,
        lake.train
    );
    let err = omniglot.lake_with_validation(2, 7).unwrap_err().to_string();
    assert!(err.contains("validation_alphabets"), "{err}");
}

#[test]
fn corrupt_png_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_omniglot(dir.path());
    let bad = dir
        .path()
        .join("images_background/Beta/character02/0200_03.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\ngarbage").unwrap();
    let err = Omniglot::load(dir.path(), &options(10, CacheOptions::disabled())).unwrap_err();
    assert!(matches!(err, DataError::Image { .. }), "{err}");
    assert!(
        err.to_string().contains("Beta/character02/0200_03.png"),
        "{err}"
    );
}

#[test]
fn malformed_or_unknown_split_lines_give_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write_omniglot(dir.path());
    let omniglot = load(dir.path());
    let val = dir.path().join("splits/vinyals/val.txt");
    for (text, message) in [
        (
            "Alpha/character03/rot000\nAlpha/character03/rot045\n",
            "rot045",
        ),
        (
            "Alpha/character03/rot000\nAlpha/character09/rot000\n",
            "character09",
        ),
        ("Alpha/character03/rot000\nnonsense\n", "nonsense"),
    ] {
        std::fs::write(&val, text).unwrap();
        let err = omniglot.vinyals().unwrap_err();
        assert!(matches!(err, DataError::SplitLine { line: 2, .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("val.txt:2:") && text.contains(message),
            "{text}"
        );
    }
}

#[test]
fn missing_data_explains_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("omniglot");
    let err = Omniglot::load(&root, &OmniglotOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::MissingDataset { .. }), "{err}");
    assert!(err.to_string().contains("images_background.zip"), "{err}");

    // Only half of the data unzipped.
    write_grey_png(&root.join("images_background/A/character01/1.png"), 10, 2);
    let err = Omniglot::load(&root, &OmniglotOptions::default()).unwrap_err();
    assert!(err.to_string().contains("images_evaluation"), "{err}");

    // No split files.
    write_omniglot(&root);
    std::fs::remove_dir_all(root.join("splits")).unwrap();
    let err = load(&root).vinyals().unwrap_err();
    assert!(matches!(err, DataError::MissingDataset { .. }), "{err}");
    assert!(err.to_string().contains("prototypical-networks"), "{err}");
}

#[test]
fn cache_is_read_on_the_second_load_and_invalidated_by_changes() {
    let data = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    write_omniglot(data.path());
    let opts = options(10, CacheOptions::in_dir(cache.path()));

    let first = Omniglot::load(data.path(), &opts).unwrap();
    assert_eq!(first.cache, CacheStatus::Miss);
    let second = Omniglot::load(data.path(), &opts).unwrap();
    assert_eq!(second.cache, CacheStatus::Hit);
    assert_eq!(first.store, second.store);
    assert_eq!(first.characters, second.characters);

    // Redraw one image: same size, new content and modification time.
    let changed = data
        .path()
        .join("images_evaluation/Gamma/character01/0100_01.png");
    write_grey_png(&changed, 10, 6);
    let later = SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&changed)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let third = Omniglot::load(data.path(), &opts).unwrap();
    assert_eq!(third.cache, CacheStatus::Miss);
    let index = third.characters[5].images[0] as usize;
    assert_eq!(third.store.image(index)[55], 255);
    assert_ne!(third.store, first.store);
    assert_eq!(
        Omniglot::load(data.path(), &opts).unwrap().cache,
        CacheStatus::Hit
    );

    // A different image size is a different cache entry.
    let small = Omniglot::load(data.path(), &options(5, opts.cache.clone())).unwrap();
    assert_eq!(small.cache, CacheStatus::Miss);
    assert_eq!(small.store.shape(), (1, 5, 5));

    // Nothing was written into the dataset folder.
    let stray: Vec<_> = std::fs::read_dir(data.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(stray.len(), 3, "{stray:?}");
}
