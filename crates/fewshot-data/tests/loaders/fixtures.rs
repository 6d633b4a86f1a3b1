//! Small datasets written to temporary folders in the layouts the loaders read.

use std::path::Path;

/// A `size x size` grey PNG: white background, black (0) square of side
/// `ink` in the top-left corner, like Omniglot's black strokes on white.
pub fn write_grey_png(path: &Path, size: u32, ink: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let image = image::GrayImage::from_fn(size, size, |x, y| {
        image::Luma([if x < ink && y < ink { 0 } else { 255 }])
    });
    image.save(path).unwrap();
}

/// A `size x size` RGB image of one colour (PNG or JPEG by extension).
pub fn write_rgb(path: &Path, size: u32, colour: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(size, size, image::Rgb(colour))
        .save(path)
        .unwrap();
}

/// The Omniglot layout with 10x10 PNGs: background alphabets Alpha (3
/// characters) and Beta (2), evaluation alphabet Gamma (2), 4 drawings
/// each; drawing k has a (k+1)x(k+1) ink square. Vinyals split files
/// included.
pub fn write_omniglot(root: &Path) {
    let sets = [
        ("images_background", &[("Alpha", 3), ("Beta", 2)][..]),
        ("images_evaluation", &[("Gamma", 2)][..]),
    ];
    for (set, alphabets) in sets {
        for &(alphabet, characters) in alphabets {
            for c in 1..=characters {
                let dir = root
                    .join(set)
                    .join(alphabet)
                    .join(format!("character{c:02}"));
                for k in 0..4u32 {
                    write_grey_png(&dir.join(format!("0{c}00_{:02}.png", k + 1)), 10, k + 1);
                }
            }
        }
    }
    let splits = root.join("splits").join("vinyals");
    std::fs::create_dir_all(&splits).unwrap();
    let lines = |ids: &[&str]| -> String {
        ids.iter()
            .flat_map(|id| ["000", "090", "180", "270"].map(|r| format!("{id}/rot{r}\n")))
            .collect()
    };
    let train = lines(&["Alpha/character01", "Alpha/character02", "Beta/character01"]);
    std::fs::write(splits.join("train.txt"), train).unwrap();
    std::fs::write(splits.join("val.txt"), lines(&["Alpha/character03"])).unwrap();
    let test = lines(&["Beta/character02", "Gamma/character01", "Gamma/character02"]);
    std::fs::write(splits.join("test.txt"), test).unwrap();
}

/// The Ravi & Larochelle miniImageNet layout with 12x12 JPEGs: 3 train
/// classes, 2 val, 2 test, 5 images each; the CSVs at the root, or under
/// `splits/` when `csv_in_splits`.
pub fn write_mini_imagenet(root: &Path, csv_in_splits: bool) {
    let csv_dir = if csv_in_splits {
        root.join("splits")
    } else {
        root.to_path_buf()
    };
    std::fs::create_dir_all(&csv_dir).unwrap();
    let mut class = 0u8;
    for (split, classes) in [("train", 3), ("val", 2), ("test", 2)] {
        let mut csv = String::from("filename,label\n");
        for _ in 0..classes {
            let label = format!("n{:08}", 1000 + u32::from(class));
            for i in 0..5 {
                let name = format!("{label}{i:08}.jpg");
                write_rgb(&root.join("images").join(&name), 12, [class * 30, 100, 200]);
                csv.push_str(&format!("{name},{label}\n"));
            }
            class += 1;
        }
        std::fs::write(csv_dir.join(format!("{split}.csv")), csv).unwrap();
    }
}

/// A class folder: `classes` sub-folders `class_k` with `images` 8x8 PNGs
/// (and one JPEG) each, plus a stray text file that must be ignored.
pub fn write_class_folder(dir: &Path, classes: usize, images: usize) {
    for k in 0..classes {
        let class_dir = dir.join(format!("class_{k}"));
        for i in 0..images {
            let ext = if i == 0 { "jpg" } else { "png" };
            write_rgb(
                &class_dir.join(format!("img{i}.{ext}")),
                8,
                [k as u8 * 40, i as u8, 0],
            );
        }
        std::fs::write(class_dir.join("notes.txt"), b"not an image").unwrap();
    }
}

/// CIFAR-100's binary layout with the real label names (from the split
/// lists, so that every listed class exists): fine class k in superclass
/// k / 5, with `per_file` images in each of train.bin and test.bin. Pixel
/// bytes: red k, green the image's index within its class, blue 200.
pub fn write_cifar100(root: &Path, per_file: usize) {
    std::fs::create_dir_all(root).unwrap();
    let (fine, coarse) = (split_lists("cifar-fs"), split_lists("fc100"));
    std::fs::write(root.join("fine_label_names.txt"), fine.join("\n") + "\n").unwrap();
    std::fs::write(
        root.join("coarse_label_names.txt"),
        coarse.join("\n") + "\n",
    )
    .unwrap();
    for (file, first) in [("train.bin", 0), ("test.bin", per_file)] {
        let mut bytes = Vec::new();
        for image in first..first + per_file {
            for k in 0..fine.len() {
                bytes.extend([(k / 5) as u8, k as u8]);
                bytes.extend([k as u8; 1024]);
                bytes.extend([image as u8; 1024]);
                bytes.extend([200u8; 1024]);
            }
        }
        std::fs::write(root.join(file), bytes).unwrap();
    }
}

/// CUB-200-2011's layout with every species of the split lists and
/// `per_species` 20x10 JPEGs each: the left half red, the right half blue,
/// the bounding box the right half (so a cropped image is all blue).
pub fn write_cub(root: &Path, per_species: usize) {
    let species = split_lists("cub");
    let (mut images, mut boxes) = (String::new(), String::new());
    let mut id = 0;
    for name in &species {
        for k in 0..per_species {
            id += 1;
            let rel = format!("{name}/{name}_{k}.jpg");
            let path = root.join("images").join(&rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image::RgbImage::from_fn(20, 10, |x, _| {
                image::Rgb(if x < 10 { [255, 0, 0] } else { [0, 0, 255] })
            })
            .save(&path)
            .unwrap();
            images += &format!("{id} {rel}\n");
            boxes += &format!("{id} 10.0 0.0 10.0 10.0\n");
        }
    }
    std::fs::write(root.join("images.txt"), images).unwrap();
    std::fs::write(root.join("bounding_boxes.txt"), boxes).unwrap();
}

/// Every name of the crate's `splits/<dir>/` lists, train, val, then test.
fn split_lists(dir: &str) -> Vec<String> {
    ["train", "val", "test"]
        .iter()
        .flat_map(|split| {
            let path = format!("{}/splits/{dir}/{split}.txt", env!("CARGO_MANIFEST_DIR"));
            std::fs::read_to_string(path)
                .unwrap()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}
