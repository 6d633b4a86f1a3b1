//! Whether this build continues a stopped run bit for bit. A run's last
//! checkpoint carries what its next training step computes (the loss and a
//! hash of the state it leaves); `--resume` recomputes that step before going
//! on, so a change of code, data, CPU or thread count that would make the
//! resumed run drift from an uninterrupted one is found at once, not after
//! hours of training.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use fewshot_backbone::{EpisodeTensors, Learner, ParamSet};

/// The checkpoint metadata key of the probe.
pub const METADATA_KEY: &str = "next_step_probe";

/// The outcome of one training step from a given state, as this build
/// computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextStepProbe {
    loss_bits: u64,
    state_hash: u64,
}

impl NextStepProbe {
    /// Takes the step on `fresh` (a learner just built from the run's config,
    /// never the one being trained, so probing changes nothing) after loading
    /// `state` into it: exactly what a resumed run does first.
    pub fn compute(
        fresh: &mut dyn Learner,
        state: &ParamSet,
        batch: &[EpisodeTensors],
    ) -> Result<Self> {
        fresh.load_state(state)?;
        let stats = fresh.meta_train(batch)?;
        Ok(Self {
            loss_bits: stats.loss.to_bits(),
            state_hash: hash_state(&fresh.state()?)?,
        })
    }

    pub fn loss(&self) -> f64 {
        f64::from_bits(self.loss_bits)
    }

    pub fn to_metadata(self) -> String {
        format!("{:016x}:{:016x}", self.loss_bits, self.state_hash)
    }

    pub fn from_metadata(text: &str) -> Result<Self> {
        let parse = |hex: &str| u64::from_str_radix(hex, 16);
        let (loss, state) = text.split_once(':').with_context(|| {
            format!("metadata `{METADATA_KEY}` is {text:?}, expected LOSS:STATE in hex")
        })?;
        Ok(Self {
            loss_bits: parse(loss)
                .with_context(|| format!("metadata `{METADATA_KEY}`: {text:?}"))?,
            state_hash: parse(state)
                .with_context(|| format!("metadata `{METADATA_KEY}`: {text:?}"))?,
        })
    }

    /// An error saying how the two builds differ, unless they agree.
    pub fn check_against(self, recorded: Self, checkpoint: &std::path::Path) -> Result<()> {
        if self == recorded {
            return Ok(());
        }
        let what = if self.loss_bits != recorded.loss_bits {
            format!(
                "its next step's loss is {:e} here and was {:e} when it was written",
                self.loss(),
                recorded.loss()
            )
        } else {
            "its next step's loss agrees, but the weights after it do not".to_string()
        };
        bail!(
            "{}: this build does not continue the run bit for bit: {what}. The code, the data, \
             the CPU or the thread count (RAYON_NUM_THREADS) differ from those that wrote it. \
             Resume where it was written, or pass --resume-anyway to go on with this build \
             (the rest of the run then differs from an uninterrupted one in the last digits)",
            checkpoint.display()
        )
    }
}

/// FNV-1a over every tensor's name and value bits, in the set's order: its
/// own code, so the hash never changes with the toolchain.
fn hash_state(state: &ParamSet) -> Result<u64> {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &byte in bytes {
            hash = (hash ^ u64::from(byte)).wrapping_mul(PRIME);
        }
    };
    for (name, tensor) in state.iter() {
        eat(name.as_bytes());
        for word in value_bits(tensor)? {
            eat(&word.to_le_bytes());
        }
    }
    Ok(hash)
}

/// A tensor's values as bit patterns, exact for every dtype a state holds.
fn value_bits(tensor: &Tensor) -> Result<Vec<u64>> {
    let flat = tensor.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match flat.dtype() {
        DType::F64 => flat.to_vec1::<f64>()?.iter().map(|v| v.to_bits()).collect(),
        DType::U32 => flat.to_vec1::<u32>()?.into_iter().map(u64::from).collect(),
        DType::I64 => flat
            .to_vec1::<i64>()?
            .into_iter()
            .map(|v| v as u64)
            .collect(),
        DType::U8 => flat.to_vec1::<u8>()?.into_iter().map(u64::from).collect(),
        // f32 as is; half precisions widen to f32 exactly.
        _ => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| u64::from(v.to_bits()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(values: &[f32]) -> ParamSet {
        let mut set = ParamSet::new();
        let t = Tensor::from_slice(values, values.len(), &Device::Cpu).unwrap();
        set.insert("w", t).unwrap();
        set
    }

    #[test]
    fn the_hash_sees_the_last_bit_and_the_names() {
        let a = hash_state(&set(&[1.0, 2.0])).unwrap();
        let b = hash_state(&set(&[1.0, f32::from_bits(2.0f32.to_bits() + 1)])).unwrap();
        assert_ne!(a, b);
        assert_eq!(a, hash_state(&set(&[1.0, 2.0])).unwrap());
        let mut renamed = ParamSet::new();
        renamed
            .insert(
                "v",
                Tensor::from_slice(&[1.0f32, 2.0], 2, &Device::Cpu).unwrap(),
            )
            .unwrap();
        assert_ne!(a, hash_state(&renamed).unwrap());
    }

    #[test]
    fn metadata_round_trips_and_bad_text_is_named() {
        let probe = NextStepProbe {
            loss_bits: 1.25f64.to_bits(),
            state_hash: 0xdead_beef,
        };
        assert_eq!(
            NextStepProbe::from_metadata(&probe.to_metadata()).unwrap(),
            probe
        );
        let err = NextStepProbe::from_metadata("nonsense").unwrap_err();
        assert!(format!("{err:#}").contains(METADATA_KEY), "{err:#}");
    }

    #[test]
    fn a_mismatch_says_what_differs_and_how_to_go_on() {
        let here = NextStepProbe {
            loss_bits: 1.0f64.to_bits(),
            state_hash: 1,
        };
        let path = std::path::Path::new("run/last.safetensors");
        assert!(here.check_against(here, path).is_ok());
        let loss = here
            .check_against(
                NextStepProbe {
                    loss_bits: 2.0f64.to_bits(),
                    ..here
                },
                path,
            )
            .unwrap_err()
            .to_string();
        assert!(loss.contains("run/last.safetensors") && loss.contains("--resume-anyway"));
        assert!(loss.contains("loss is 1e0 here and was 2e0"), "{loss}");
        let weights = here
            .check_against(
                NextStepProbe {
                    state_hash: 2,
                    ..here
                },
                path,
            )
            .unwrap_err()
            .to_string();
        assert!(weights.contains("weights after it do not"), "{weights}");
    }
}
