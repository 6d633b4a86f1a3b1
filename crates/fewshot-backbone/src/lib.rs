//! The shared backbone of the few-shot learners: device selection, the op
//! module every model goes through, conv-4 networks with a functional forward,
//! named parameter sets, checkpoints and warm starts from them, the
//! second-order check, and the [`Learner`] trait that evaluation and the
//! runner drive.

pub mod checkpoint;
pub mod conv4;
pub mod device;
pub mod device_check;
pub mod error;
pub mod kernels;
pub mod learner;
pub mod ops;
pub mod optim;
pub mod params;
pub mod second_order;
pub mod warm_start;

pub use checkpoint::{write_atomic, Checkpoint};
pub use conv4::{Conv4, Conv4Config, Downsample, FeatureHead};
pub use device::DeviceChoice;
pub use error::{BackboneError, Result};
pub use learner::{
    algorithm_section, images_to_tensor, mean_over_episodes, mean_over_episodes_with,
    parse_algorithm_section, EpisodeGradient, EpisodeTensors, Learner, SharedFields, StepStats,
    OPTIMIZER_PREFIX,
};
pub use optim::{load_training_state, training_state, Adam, AdamConfig, StepDecay};
pub use params::{ParamSet, Probes, VarSet};
pub use warm_start::{warm_start, WarmStart};
