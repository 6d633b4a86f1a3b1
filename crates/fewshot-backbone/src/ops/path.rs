//! Which implementation the ops take, and the f64 guard of the portable path.
//!
//! On the CPU the ops run on [`crate::kernels`]; on every other device they
//! take the portable path, [`super::candle_path`]. No machine here has a GPU,
//! so the portable path must be testable on the CPU: the environment variable
//! [`ENV_VAR`] (`kernels`, the default, or `portable`) sets it for a whole
//! process (CI runs the gradient tests once each way), and [`with_path`] for
//! one closure on the calling thread (the tests that compare the two paths
//! in one process).
//!
//! Candle's Metal backend has no f64, so nothing on the portable path may
//! need it: [`with_f64_forbidden`] makes every op of [`crate::ops`] refuse
//! f64 inputs on the calling thread, which is how the learners' tests show
//! that a training step and an evaluation run without it. Values are read
//! back to the host with [`to_host_f64`], which copies before it widens.

use std::cell::Cell;
use std::str::FromStr;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use crate::error::{BackboneError, Result};

/// The environment variable that picks the path for a whole process.
pub const ENV_VAR: &str = "FEWSHOT_OPS_PATH";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpsPath {
    /// The CPU kernels where they apply (CPU tensors of f32 and f64),
    /// the portable path elsewhere.
    #[default]
    Kernels,
    /// candle's own ops everywhere, as on a GPU.
    Portable,
}

impl FromStr for OpsPath {
    type Err = BackboneError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kernels" => Ok(Self::Kernels),
            "portable" => Ok(Self::Portable),
            _ => Err(invalid_path(s)),
        }
    }
}

fn invalid_path(value: &str) -> BackboneError {
    BackboneError::InvalidConfig {
        field: "FEWSHOT_OPS_PATH",
        value: value.to_string(),
        reason: "expected `kernels` (the default) or `portable`".to_string(),
    }
}

/// The path [`ENV_VAR`] asks for (read once per process), or the error that
/// names its bad value. The `fewshot` binary calls this first thing, so a
/// typo stops it; a library user who never calls it gets the kernels path.
pub fn configured() -> Result<OpsPath> {
    // The bad value, if any, rather than the error: errors are not Clone.
    static CONFIGURED: OnceLock<std::result::Result<OpsPath, String>> = OnceLock::new();
    let parsed = CONFIGURED.get_or_init(|| match std::env::var_os(ENV_VAR) {
        None => Ok(OpsPath::Kernels),
        Some(value) => {
            let value = value.to_string_lossy().into_owned();
            value.parse().map_err(|_| value)
        }
    });
    parsed.clone().map_err(|value| invalid_path(&value))
}

thread_local! {
    static OVERRIDE: Cell<Option<OpsPath>> = const { Cell::new(None) };
    static F64_FORBIDDEN: Cell<bool> = const { Cell::new(false) };
}

/// The path the ops take now on this thread: [`with_path`]'s, else
/// [`configured`]'s (the kernels path when the variable is invalid).
pub fn current() -> OpsPath {
    OVERRIDE
        .with(Cell::get)
        .unwrap_or_else(|| configured().unwrap_or_default())
}

/// Runs `f` with the ops on `path` on this thread, then restores the one
/// before (also when `f` panics).
pub fn with_path<R>(path: OpsPath, f: impl FnOnce() -> R) -> R {
    let _restore = Restore::new(&OVERRIDE, Some(path));
    f()
}

/// Runs `f` with every op refusing f64 inputs on this thread.
pub fn with_f64_forbidden<R>(f: impl FnOnce() -> R) -> R {
    let _restore = Restore::new(&F64_FORBIDDEN, true);
    f()
}

/// This thread's [`with_path`] and [`with_f64_forbidden`] settings, to carry
/// into the threads a parallel loop runs its work on (thread-locals do not
/// follow the work to rayon's workers by themselves).
#[derive(Debug, Clone, Copy)]
pub struct ThreadSettings {
    path: Option<OpsPath>,
    f64_forbidden: bool,
}

impl ThreadSettings {
    pub fn capture() -> Self {
        Self {
            path: OVERRIDE.with(Cell::get),
            f64_forbidden: F64_FORBIDDEN.with(Cell::get),
        }
    }

    /// Runs `f` on the calling thread with the captured settings.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let _path = Restore::new(&OVERRIDE, self.path);
        let _f64 = Restore::new(&F64_FORBIDDEN, self.f64_forbidden);
        f()
    }
}

/// The error for an f64 input under [`with_f64_forbidden`].
pub(crate) fn check_dtype(op: &'static str, x: &Tensor) -> Result<()> {
    if x.dtype() == DType::F64 && F64_FORBIDDEN.with(Cell::get) {
        return Err(BackboneError::InvalidConfig {
            field: "dtype",
            value: format!("f64 input to {op}"),
            reason: "f64 is forbidden here: the portable path must run on devices without \
                     f64 (candle's Metal backend has none)"
                .to_string(),
        });
    }
    Ok(())
}

/// A one-element tensor's value as f64, copied to the host before it is
/// widened, so that no f64 tensor is ever made on the device.
pub fn to_host_f64(tensor: &Tensor) -> Result<f64> {
    let host = tensor.to_device(&Device::Cpu)?;
    Ok(host.to_dtype(DType::F64)?.reshape(())?.to_scalar::<f64>()?)
}

/// All of a tensor's values as f64 in row-major order, widened on the host.
pub fn to_host_vec_f64(tensor: &Tensor) -> Result<Vec<f64>> {
    let host = tensor.to_device(&Device::Cpu)?;
    Ok(host.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Puts a thread-local back as it was when dropped.
struct Restore<T: Copy + 'static> {
    key: &'static std::thread::LocalKey<Cell<T>>,
    before: T,
}

impl<T: Copy + 'static> Restore<T> {
    fn new(key: &'static std::thread::LocalKey<Cell<T>>, value: T) -> Self {
        let before = key.with(|cell| cell.replace(value));
        Self { key, before }
    }
}

impl<T: Copy + 'static> Drop for Restore<T> {
    fn drop(&mut self) {
        self.key.with(|cell| cell.set(self.before));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_ci_sets_is_valid() {
        // CI runs the tests with FEWSHOT_OPS_PATH=portable; a typo there
        // must fail here rather than quietly test the kernels path twice.
        configured().unwrap();
    }

    #[test]
    fn parses_both_paths_and_names_a_bad_value() {
        assert_eq!("kernels".parse::<OpsPath>().unwrap(), OpsPath::Kernels);
        assert_eq!("portable".parse::<OpsPath>().unwrap(), OpsPath::Portable);
        let message = "gpu".parse::<OpsPath>().unwrap_err().to_string();
        assert!(
            message.contains("`gpu`") && message.contains("portable"),
            "{message}"
        );
    }

    #[test]
    fn with_path_overrides_on_this_thread_and_restores() {
        let before = current();
        let inside = with_path(OpsPath::Portable, || {
            let nested = with_path(OpsPath::Kernels, current);
            (current(), nested)
        });
        assert_eq!(inside, (OpsPath::Portable, OpsPath::Kernels));
        assert_eq!(current(), before);
        let caught = std::panic::catch_unwind(|| with_path(OpsPath::Portable, || panic!("boom")));
        assert!(caught.is_err());
        assert_eq!(current(), before);
    }

    #[test]
    fn forbidding_f64_refuses_f64_inputs_only() {
        let f64_input = Tensor::new(&[1f64, 2.], &Device::Cpu).unwrap();
        let f32_input = f64_input.to_dtype(DType::F32).unwrap();
        assert!(check_dtype("relu", &f64_input).is_ok());
        with_f64_forbidden(|| {
            let message = check_dtype("relu", &f64_input).unwrap_err().to_string();
            assert!(message.contains("f64 input to relu"), "{message}");
            assert!(check_dtype("relu", &f32_input).is_ok());
        });
        assert!(check_dtype("relu", &f64_input).is_ok());
    }

    #[test]
    fn captured_settings_follow_work_to_other_threads() {
        let settings = with_path(OpsPath::Portable, || {
            with_f64_forbidden(ThreadSettings::capture)
        });
        let on_other_thread = std::thread::spawn(move || {
            let f64_input = Tensor::new(&[1f64], &Device::Cpu).unwrap();
            let inside = settings.run(|| (current(), check_dtype("relu", &f64_input).is_err()));
            (inside, current() == configured().unwrap_or_default())
        })
        .join()
        .unwrap();
        assert_eq!(on_other_thread, ((OpsPath::Portable, true), true));
    }

    #[test]
    fn host_readback_keeps_f64_precision() {
        let x = Tensor::new(&[[1.0f64 + 1e-12]], &Device::Cpu).unwrap();
        assert_eq!(to_host_f64(&x).unwrap(), 1.0 + 1e-12);
        let y = Tensor::new(&[0.5f32, -2.0], &Device::Cpu).unwrap();
        assert_eq!(to_host_vec_f64(&y).unwrap(), vec![0.5, -2.0]);
    }
}
