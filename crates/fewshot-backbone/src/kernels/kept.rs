//! Values an op's forward computed and its backward needs again, kept so
//! that the backward does not compute them a second time.
//!
//! The backward needs them as a tensor of the autograd graph (second-order
//! MAML differentiates through it), so the first backward wraps the kept
//! values in an op whose forward hands them over and whose backward is that
//! of the op that would have computed them; later backward passes through
//! the same op (MAML's outer pass after its inner ones) reuse that tensor.

use std::sync::{Mutex, MutexGuard};

use candle_core::{bail, CpuStorage, Result, Tensor};

/// One kept tensor: values from the forward, a tensor from the first backward on.
pub(super) struct KeptTensor {
    name: &'static str,
    values: Mutex<Option<CpuStorage>>,
    tensor: Mutex<Option<Tensor>>,
}

impl KeptTensor {
    /// Nothing kept yet; `name` names the values in the error should the
    /// backward find none.
    pub(super) fn new(name: &'static str) -> Self {
        Self {
            name,
            values: Mutex::new(None),
            tensor: Mutex::new(None),
        }
    }

    pub(super) fn keep(&self, values: CpuStorage) {
        *lock(&self.values) = Some(values);
    }

    /// The kept values as a tensor of the graph: `wrap(values)` on the first
    /// call, the same tensor after.
    pub(super) fn tensor(&self, wrap: impl FnOnce(CpuStorage) -> Result<Tensor>) -> Result<Tensor> {
        let mut tensor = lock(&self.tensor);
        if let Some(tensor) = tensor.as_ref() {
            return Ok(tensor.clone());
        }
        let Some(values) = lock(&self.values).take() else {
            bail!("{}: the forward kept no values for the backward", self.name);
        };
        let wrapped = wrap(values)?;
        *tensor = Some(wrapped.clone());
        Ok(wrapped)
    }
}

/// The values kept for a wrapping op's forward to hand over, once.
pub(super) struct HandOver {
    name: &'static str,
    values: Mutex<Option<CpuStorage>>,
}

impl HandOver {
    pub(super) fn new(name: &'static str, values: CpuStorage) -> Self {
        Self {
            name,
            values: Mutex::new(Some(values)),
        }
    }

    pub(super) fn take(&self) -> Result<CpuStorage> {
        match lock(&self.values).take() {
            Some(values) => Ok(values),
            None => bail!("{}: the kept values were handed over already", self.name),
        }
    }
}

/// A lock that a panic elsewhere cannot poison for good: what it guards
/// is replaced whole, never left half-written.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
