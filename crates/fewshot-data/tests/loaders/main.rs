//! The loaders on small datasets generated in temporary folders.

mod cifar100;
mod cub;
mod fixtures;
mod folder;
mod mini_imagenet;
mod omniglot;
