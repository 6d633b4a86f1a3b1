//! Device selection: `auto | cpu | cuda[:N] | metal`.
//!
//! Asking for a device this build cannot drive is an error, never a silent
//! fall-back to the CPU: a user who asked for a GPU wants to know.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{BackboneError, Result};

/// A device as written in a config or on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first GPU this build supports, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceChoice {
    type Err = BackboneError;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason: &str| BackboneError::InvalidConfig {
            field: "device",
            value: s.to_string(),
            reason: reason.to_string(),
        };
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "metal" => Ok(Self::Metal),
            _ => match s.strip_prefix("cuda:") {
                Some(ordinal) => ordinal
                    .parse()
                    .map(Self::Cuda)
                    .map_err(|_| invalid("the CUDA ordinal after `cuda:` must be a number")),
                None => Err(invalid("expected auto, cpu, cuda, cuda:N or metal")),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if cfg!(feature = "cuda") {
                    if let Ok(device) = Device::new_cuda(0) {
                        return Ok(device);
                    }
                }
                if cfg!(feature = "metal") {
                    if let Ok(device) = Device::new_metal(0) {
                        return Ok(device);
                    }
                }
                Ok(Device::Cpu)
            }
            Self::Cuda(ordinal) => {
                if !cfg!(feature = "cuda") {
                    return Err(self.unavailable(
                        "this build has no CUDA support; rebuild with `--features cuda`",
                    ));
                }
                Device::new_cuda(ordinal).map_err(|e| self.unavailable(&e.to_string()))
            }
            Self::Metal => {
                if !cfg!(feature = "metal") {
                    return Err(self.unavailable(
                        "this build has no Metal support; rebuild with `--features metal`",
                    ));
                }
                Device::new_metal(0).map_err(|e| self.unavailable(&e.to_string()))
            }
        }
    }

    fn unavailable(self, reason: &str) -> BackboneError {
        BackboneError::DeviceUnavailable {
            requested: self.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// A short name for a device, for logs and reports.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_names_bad_values() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        assert_eq!(
            "metal".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Metal
        );
        let err = "gpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(err.contains("`gpu`"), "{err}");
        let err = "cuda:x".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(err.contains("cuda:x"), "{err}");
    }

    #[test]
    fn cpu_and_auto_open_here() {
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
        // Without GPU features, auto must land on the CPU.
        if !cfg!(any(feature = "cuda", feature = "metal")) {
            assert!(DeviceChoice::Auto.open().unwrap().is_cpu());
        }
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn cuda_without_the_feature_is_a_clear_error() {
        let err = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
        assert!(
            err.contains("cuda:0") && err.contains("--features cuda"),
            "{err}"
        );
    }

    #[test]
    #[cfg(not(feature = "metal"))]
    fn metal_without_the_feature_is_a_clear_error() {
        let err = DeviceChoice::Metal.open().unwrap_err().to_string();
        assert!(err.contains("--features metal"), "{err}");
    }
}
