//! A run-time check that candle really differentiates through gradients.
//!
//! candle detaches every gradient during backward unless the environment
//! variable `CANDLE_GRAD_DO_NOT_DETACH` is set (read once per thread), and then a
//! gradient of a gradient is silently zero: second-order MAML would quietly
//! train as first-order. Code that needs second order calls
//! [`ensure_available`] and fails loudly instead.

use candle_core::{Device, Var};

use crate::error::{BackboneError, Result};
use crate::ops::path;

/// The environment variable candle reads; set it before the program starts
/// any thread (the `fewshot` binary does so first thing).
pub const ENV_VAR: &str = "CANDLE_GRAD_DO_NOT_DETACH";

/// Checks on the calling thread that d2(x^3)/dx2 at x = 3 comes out as 18.
pub fn ensure_available() -> Result<()> {
    ensure_available_on(&Device::Cpu)
}

/// [`ensure_available`] with `x` on `device`, in f32 (every device has it;
/// 3, 9, 27 and 18 are exact in it).
pub fn ensure_available_on(device: &Device) -> Result<()> {
    let x = Var::new(3f32, device)?;
    let cube = (x.as_tensor() * x.as_tensor())?.mul(x.as_tensor())?;
    let measured = match cube.backward()?.get(x.as_tensor()) {
        Some(first) => match first.backward()?.get(x.as_tensor()) {
            Some(second) => path::to_host_f64(second)?,
            None => 0.0,
        },
        None => 0.0,
    };
    if measured != 18.0 {
        return Err(BackboneError::SecondOrderUnavailable { measured });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn available_under_the_workspace_environment() {
        // `.cargo/config.toml` sets the variable for every cargo command here.
        super::ensure_available().unwrap();
    }
}
