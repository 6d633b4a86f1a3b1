//! The real Omniglot, when it is on this machine: found through
//! `$FEWSHOT_DATA_DIR/omniglot` or the workspace's `../shared/datasets`.
//! Without it these tests print why they are skipped and pass.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use fewshot_data::{CacheOptions, EpisodeSampler, EpisodeSpec, Omniglot, OmniglotOptions};

fn omniglot_dir() -> PathBuf {
    match std::env::var_os("FEWSHOT_DATA_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("omniglot"),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets/omniglot"),
    }
}

/// Decoded once per test binary; the tests share it.
fn omniglot() -> Option<&'static Omniglot> {
    static LOADED: OnceLock<Option<Omniglot>> = OnceLock::new();
    let loaded = LOADED.get_or_init(|| {
        let dir = omniglot_dir();
        if !dir.join("images_background").is_dir() {
            return None;
        }
        // No cache: tests must not write to the user's cache folder.
        let options = OmniglotOptions {
            image_size: 28,
            cache: CacheOptions::disabled(),
            ..Default::default()
        };
        Some(Omniglot::load(&dir, &options).expect("the real Omniglot loads"))
    });
    if loaded.is_none() {
        println!(
            "skipped: Omniglot not found at {}",
            omniglot_dir().display()
        );
    }
    loaded.as_ref()
}

#[test]
fn has_the_published_counts() {
    let Some(omniglot) = omniglot() else { return };
    assert_eq!(omniglot.characters.len(), 1623);
    assert_eq!(omniglot.store.len(), 32460);
    assert_eq!(omniglot.num_alphabets(), 50);
    assert!(omniglot.characters.iter().all(|c| c.images.len() == 20));
    let lake = omniglot.lake();
    assert_eq!(
        (lake.train.classes.len(), lake.test.classes.len()),
        (964, 659)
    );
    assert_eq!((lake.train.groups(), lake.test.groups()), (30, 20));

    // Five background alphabets held out: whole alphabets, none lost, and
    // the evaluation set untouched; with rotation classes, four per character.
    let held = omniglot.lake_with_validation(5, 0).unwrap();
    assert_eq!((held.train.groups(), held.val.groups()), (25, 5));
    assert_eq!(held.train.classes.len() + held.val.classes.len(), 964);
    assert_eq!(held.test, lake.test);
    let rotated = held.train.with_rotation_classes().unwrap();
    assert_eq!(rotated.classes.len(), 4 * held.train.classes.len());
}

#[test]
fn strokes_are_ink_on_black() {
    let Some(omniglot) = omniglot() else { return };
    // Strokes cover a small part of each drawing: after inversion the
    // mean is low, and the border is background.
    let pixels = omniglot.store.pixels();
    let mean = pixels.iter().map(|&v| f64::from(v)).sum::<f64>() / pixels.len() as f64;
    assert!((5.0..80.0).contains(&mean), "mean pixel {mean}");
    assert_eq!(omniglot.store.image(0)[0], 0);
}

#[test]
fn vinyals_and_maml_splits_have_the_published_sizes() {
    let Some(omniglot) = omniglot() else { return };
    let vinyals = omniglot.vinyals().unwrap();
    assert_eq!(vinyals.class_counts(), [4112, 688, 1692]);
    let maml = omniglot.maml(0);
    assert_eq!(maml.class_counts(), [1100, 100, 423]);
    let all: HashSet<&str> = [&maml.train, &maml.val, &maml.test]
        .iter()
        .flat_map(|s| s.classes.iter().map(|c| c.name.as_str()))
        .collect();
    assert_eq!(all.len(), 1623);
}

#[test]
fn samples_the_usual_episodes() {
    let Some(omniglot) = omniglot() else { return };
    let vinyals = omniglot.vinyals().unwrap();
    let spec = EpisodeSpec {
        ways: 20,
        shots: 5,
        queries: 15,
        same_group: false,
    };
    let sampler =
        EpisodeSampler::new(vinyals.store.clone(), vinyals.test.clone(), spec, 0).unwrap();
    let episode = sampler.episode(0);
    assert_eq!(episode.support.len(), 20 * 5 * 28 * 28);
    assert_eq!(episode.query.len(), 20 * 15 * 28 * 28);

    let lake = omniglot.lake();
    let within = EpisodeSpec {
        same_group: true,
        ..spec
    };
    let sampler = EpisodeSampler::new(lake.store.clone(), lake.test.clone(), within, 0).unwrap();
    for episode in sampler.episodes(0, 10) {
        let groups: HashSet<&str> = episode
            .classes
            .iter()
            .map(|c| lake.test.classes[c.class_index].group.as_str())
            .collect();
        assert_eq!(groups.len(), 1);
    }
}
