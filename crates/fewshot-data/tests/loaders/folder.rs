use fewshot_data::{
    folder_channels, load_class_folder, load_image_files, DataError, ImageFolderDataset,
    Preprocess, Resampling,
};

use crate::fixtures::{write_class_folder, write_grey_png, write_rgb};

const RGB4: Preprocess = Preprocess {
    size: 4,
    channels: 3,
    invert: false,
    resampling: Resampling::Area,
};

#[test]
fn class_folder_is_one_class_per_sub_folder() {
    let dir = tempfile::tempdir().unwrap();
    write_class_folder(dir.path(), 3, 4);
    let (store, split) = load_class_folder(dir.path(), &RGB4).unwrap();
    assert_eq!(store.len(), 12);
    assert_eq!(store.shape(), (3, 4, 4));
    let names: Vec<&str> = split.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["class_0", "class_1", "class_2"]);
    assert_eq!(split.classes[2].images, [8, 9, 10, 11]);
    // Class 2 is red 80: PNG images are exact.
    assert!(store.image(9)[..16].iter().all(|&v| v == 80));

    let grey = Preprocess {
        channels: 1,
        ..RGB4
    };
    let (store, _) = load_class_folder(dir.path(), &grey).unwrap();
    assert_eq!(store.shape(), (1, 4, 4));
}

#[test]
fn empty_folders_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_class_folder(dir.path(), &RGB4).unwrap_err();
    assert!(matches!(err, DataError::EmptyFolder { .. }), "{err}");
    assert!(err.to_string().contains("class folders"), "{err}");

    write_class_folder(dir.path(), 2, 2);
    std::fs::create_dir(dir.path().join("class_9")).unwrap();
    let err = load_class_folder(dir.path(), &RGB4).unwrap_err();
    assert!(matches!(err, DataError::EmptyFolder { .. }), "{err}");
    assert!(err.to_string().contains("class_9"), "{err}");
}

#[test]
fn image_folder_dataset_reads_train_val_test() {
    let dir = tempfile::tempdir().unwrap();
    let err = ImageFolderDataset::load(dir.path(), &RGB4).unwrap_err();
    assert!(err.to_string().contains("train/, val/ or test/"), "{err}");

    write_class_folder(&dir.path().join("train"), 3, 2);
    write_class_folder(&dir.path().join("test"), 2, 5);
    let data = ImageFolderDataset::load(dir.path(), &RGB4).unwrap();
    assert_eq!(data.store.len(), 16);
    assert_eq!(data.train.classes.len(), 3);
    assert!(data.val.classes.is_empty());
    assert_eq!(data.test.classes[1].images, [11, 12, 13, 14, 15]);

    let missing = dir.path().join("nowhere");
    let err = ImageFolderDataset::load(&missing, &RGB4).unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
}

#[test]
fn flat_folder_of_query_images() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_image_files(dir.path(), &RGB4).unwrap_err();
    assert!(matches!(err, DataError::EmptyFolder { .. }), "{err}");
    for (name, red) in [("b.png", 20), ("a.png", 10), ("c.jpeg", 30)] {
        write_rgb(&dir.path().join(name), 6, [red, 0, 0]);
    }
    let (paths, store) = load_image_files(dir.path(), &RGB4).unwrap();
    let names: Vec<_> = paths
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(names, ["a.png", "b.png", "c.jpeg"]);
    assert_eq!(store.image(1)[0], 20);
}

#[test]
fn folder_channels_are_as_the_files_are() {
    let dir = tempfile::tempdir().unwrap();
    let grey = dir.path().join("grey");
    write_grey_png(&grey.join("train/a/0.png"), 4, 1);
    write_grey_png(&grey.join("test/b/0.png"), 4, 2);
    assert_eq!(folder_channels(&grey).unwrap(), 1);
    // One colour image anywhere makes the folder RGB; a class folder
    // without train/val/test is read the same way.
    write_rgb(&grey.join("test/b/1.jpg"), 4, [200, 10, 10]);
    assert_eq!(folder_channels(&grey).unwrap(), 3);
    assert_eq!(folder_channels(&grey.join("test")).unwrap(), 3);
    assert_eq!(folder_channels(&grey.join("train")).unwrap(), 1);

    let err = folder_channels(&dir.path().join("empty")).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    std::fs::write(grey.join("train/a/1.png"), b"not a png").unwrap();
    let err = folder_channels(&grey.join("train")).unwrap_err();
    assert!(err.to_string().contains("1.png"), "{err}");
}
