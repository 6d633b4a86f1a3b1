use fewshot_data::cifar100::{self, Cifar100Split};
use fewshot_data::DataError;

use crate::fixtures::write_cifar100;

#[test]
fn cifar_fs_splits_classes_64_16_20_with_every_image_of_each() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar100(dir.path(), 2);
    let data = cifar100::load(dir.path(), Cifar100Split::CifarFs, 32).unwrap();
    assert_eq!(data.class_counts(), [64, 16, 20]);
    assert_eq!(data.store.shape(), (3, 32, 32));
    assert_eq!(data.store.len(), 400);
    // Each class holds its train.bin images, then its test.bin ones; the
    // planes are stored as they are (CHW).
    let dolphin = &data.train.classes[0];
    assert_eq!(dolphin.name, "dolphin");
    assert_eq!(dolphin.images.len(), 4);
    let third = data.store.image(dolphin.images[2] as usize);
    assert_eq!((third[0], third[1024], third[2048]), (0, 2, 200));
}

#[test]
fn fc100_splits_superclasses_12_4_4_and_groups_by_them() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar100(dir.path(), 1);
    let data = cifar100::load(dir.path(), Cifar100Split::Fc100, 84).unwrap();
    assert_eq!(data.class_counts(), [60, 20, 20]);
    assert_eq!(data.store.shape(), (3, 84, 84));
    // No superclass in two splits.
    let groups = |s: &fewshot_data::ClassSplit| -> Vec<String> {
        s.classes.iter().map(|c| c.group.clone()).collect()
    };
    let (train, test) = (groups(&data.train), groups(&data.test));
    assert!(test.iter().all(|g| !train.contains(g)), "{test:?}");
    // A flat colour stays flat when resized.
    let image = data.store.image(0);
    assert!(image[84 * 84..2 * 84 * 84].iter().all(|&v| v == 0));
    assert!(image[2 * 84 * 84..].iter().all(|&v| v == 200));
}

#[test]
fn missing_and_corrupt_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = cifar100::load(&dir.path().join("nowhere"), Cifar100Split::CifarFs, 32).unwrap_err();
    assert!(matches!(err, DataError::MissingDataset { .. }), "{err}");
    assert!(err.to_string().contains("cifar-100-binary.tar.gz"), "{err}");

    write_cifar100(dir.path(), 1);
    let train = dir.path().join("train.bin");
    let mut bytes = std::fs::read(&train).unwrap();
    bytes.pop();
    std::fs::write(&train, &bytes).unwrap();
    let err = cifar100::load(dir.path(), Cifar100Split::CifarFs, 32).unwrap_err();
    assert!(err.to_string().contains("train.bin"), "{err}");

    write_cifar100(dir.path(), 1);
    std::fs::write(dir.path().join("fine_label_names.txt"), "apple\n").unwrap();
    let err = cifar100::load(dir.path(), Cifar100Split::CifarFs, 32).unwrap_err();
    assert!(err.to_string().contains("fine_label_names.txt"), "{err}");

    write_cifar100(dir.path(), 1);
    std::fs::remove_file(dir.path().join("test.bin")).unwrap();
    let err = cifar100::load(dir.path(), Cifar100Split::CifarFs, 32).unwrap_err();
    assert!(err.to_string().contains("test.bin"), "{err}");
}
