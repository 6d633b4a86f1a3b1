//! Named parameter sets: what a functional forward reads, what an inner loop
//! adapts, and what a checkpoint stores.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::error::{BackboneError, Result};

/// Tensors by name, in insertion order. Cheap to clone (tensors are shared).
///
/// A functional forward takes a `ParamSet`, so the same network runs on its
/// slow weights or on weights adapted by an inner loop.
#[derive(Debug, Clone, Default)]
pub struct ParamSet {
    names: Vec<String>,
    tensors: Vec<Tensor>,
}

impl ParamSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor; a name may appear once.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Result<()> {
        let name = name.into();
        if self.position(&name).is_some() {
            return Err(BackboneError::Parameter {
                name,
                problem: "is already in the parameter set".to_string(),
            });
        }
        self.names.push(name);
        self.tensors.push(tensor);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.position(name)
            .map(|i| &self.tensors[i])
            .ok_or_else(|| BackboneError::Parameter {
                name: name.to_string(),
                problem: format!("is missing (the set holds: {})", self.names.join(", ")),
            })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names.iter().map(String::as_str).zip(&self.tensors)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Total number of scalars.
    pub fn num_elements(&self) -> usize {
        self.tensors.iter().map(Tensor::elem_count).sum()
    }

    /// The entries whose name starts with `prefix`, with the prefix removed.
    pub fn strip_prefix(&self, prefix: &str) -> ParamSet {
        let mut out = ParamSet::new();
        for (name, tensor) in self.iter() {
            if let Some(rest) = name.strip_prefix(prefix) {
                out.names.push(rest.to_string());
                out.tensors.push(tensor.clone());
            }
        }
        out
    }

    /// Every entry with `prefix` put in front of its name.
    pub fn with_prefix(&self, prefix: &str) -> ParamSet {
        ParamSet {
            names: self.names.iter().map(|n| format!("{prefix}{n}")).collect(),
            tensors: self.tensors.clone(),
        }
    }

    /// Appends all of `other`; names must not collide.
    pub fn extend(&mut self, other: &ParamSet) -> Result<()> {
        for (name, tensor) in other.iter() {
            self.insert(name, tensor.clone())?;
        }
        Ok(())
    }

    /// The values `saved` holds under `prefix` + each of this set's names,
    /// each checked for this set's shape and cast to its dtype and device:
    /// how a saved state is read back into a live one. Errors name the
    /// saved entry (`prefix` included).
    pub fn read_from(&self, saved: &ParamSet, prefix: &str) -> Result<ParamSet> {
        let mut out = ParamSet::new();
        for (name, current) in self.iter() {
            let saved_name = format!("{prefix}{name}");
            let value = saved.get(&saved_name)?;
            if value.dims() != current.dims() {
                return Err(BackboneError::Parameter {
                    name: saved_name,
                    problem: format!(
                        "has shape {:?}, expected {:?}",
                        value.dims(),
                        current.dims()
                    ),
                });
            }
            let value = value
                .to_dtype(current.dtype())?
                .to_device(current.device())?;
            out.insert(name, value)?;
        }
        Ok(out)
    }

    /// The same values cut from the autograd graph.
    pub fn detach(&self) -> ParamSet {
        ParamSet {
            names: self.names.clone(),
            tensors: self.tensors.iter().map(Tensor::detach).collect(),
        }
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<ParamSet> {
        self.map_tensors(|t| Ok(t.to_dtype(dtype)?))
    }

    pub fn to_device(&self, device: &Device) -> Result<ParamSet> {
        self.map_tensors(|t| Ok(t.to_device(device)?))
    }

    fn map_tensors(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<ParamSet> {
        Ok(ParamSet {
            names: self.names.clone(),
            tensors: self.tensors.iter().map(f).collect::<Result<_>>()?,
        })
    }

    /// Every tensor multiplied by `factor`.
    pub fn scale(&self, factor: f64) -> Result<ParamSet> {
        self.map_tensors(|t| Ok((t * factor)?))
    }

    /// `self + factor * other`, matched by name.
    pub fn add_scaled(&self, other: &ParamSet, factor: f64) -> Result<ParamSet> {
        let mut out = ParamSet::new();
        for (name, tensor) in self.iter() {
            out.insert(name, (tensor + (other.get(name)? * factor)?)?)?;
        }
        Ok(out)
    }

    /// One step of gradient descent, `p - lr * g` for every parameter, keeping the
    /// autograd graph so that a meta-gradient can flow through the step. Every
    /// parameter needs a gradient of the same name.
    pub fn sgd_step(&self, grads: &ParamSet, lr: f64) -> Result<ParamSet> {
        let mut out = ParamSet::new();
        for (name, param) in self.iter() {
            let grad = grads.get(name)?;
            out.insert(name, (param - (grad * lr)?)?)?;
        }
        Ok(out)
    }

    /// Leaf variables holding copies of these values, for an optimiser to update.
    pub fn to_vars(&self) -> Result<VarSet> {
        let vars = self
            .tensors
            .iter()
            .map(|t| Ok(Var::from_tensor(&t.detach())?))
            .collect::<Result<_>>()?;
        Ok(VarSet {
            names: self.names.clone(),
            vars,
        })
    }

    /// Routes every tensor through a zero-valued leaf "probe", see [`Probes`].
    pub fn probed(&self) -> Result<(ParamSet, Probes)> {
        let mut probed = ParamSet::new();
        let mut probes = Vec::with_capacity(self.len());
        for (name, tensor) in self.iter() {
            let probe = Var::from_tensor(&tensor.zeros_like()?)?;
            probed.insert(name, (tensor + probe.as_tensor())?)?;
            probes.push(probe);
        }
        Ok((
            probed,
            Probes {
                names: self.names.clone(),
                probes,
            },
        ))
    }
}

/// Named leaf variables: the slow weights a learner trains.
#[derive(Debug, Clone)]
pub struct VarSet {
    names: Vec<String>,
    vars: Vec<Var>,
}

impl VarSet {
    /// The variables as a parameter set; gradients of anything computed from it
    /// are reported for these variables.
    pub fn as_params(&self) -> ParamSet {
        ParamSet {
            names: self.names.clone(),
            tensors: self.vars.iter().map(|v| v.as_tensor().clone()).collect(),
        }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The gradient of every variable from a backward pass; a variable the loss
    /// does not depend on gets zeros.
    pub fn gradients(&self, grads: &GradStore) -> Result<ParamSet> {
        gradients_of(&self.names, &self.vars, grads)
    }

    /// Overwrites the values (same names, same shapes).
    pub fn set(&self, values: &ParamSet) -> Result<()> {
        for (name, var) in self.names.iter().zip(&self.vars) {
            let value = values.get(name)?;
            if value.dims() != var.dims() {
                return Err(BackboneError::Parameter {
                    name: name.clone(),
                    problem: format!("has shape {:?}, expected {:?}", value.dims(), var.dims()),
                });
            }
            var.set(&value.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

/// Gradients with respect to tensors that are not leaves.
///
/// candle's backward keeps gradients only for leaf variables, but an inner loop
/// needs the gradient at adapted weights `w' = w - lr * g`, which are
/// intermediate results. Adding a zero-valued leaf to each of them changes no
/// value, and the gradient reported for that leaf is the gradient at `w'`,
/// still attached to the graph of `w'` for second-order use.
#[derive(Debug)]
pub struct Probes {
    names: Vec<String>,
    probes: Vec<Var>,
}

impl Probes {
    pub fn gradients(&self, grads: &GradStore) -> Result<ParamSet> {
        gradients_of(&self.names, &self.probes, grads)
    }
}

fn gradients_of(names: &[String], vars: &[Var], grads: &GradStore) -> Result<ParamSet> {
    let mut out = ParamSet::new();
    for (name, var) in names.iter().zip(vars) {
        let grad = match grads.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.as_tensor().zeros_like()?,
        };
        out.insert(name, grad)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(v: f64) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn names_are_unique_and_missing_names_are_reported() {
        let mut p = ParamSet::new();
        p.insert("a", scalar(1.)).unwrap();
        let err = p.insert("a", scalar(2.)).unwrap_err().to_string();
        assert!(err.contains("`a`") && err.contains("already"), "{err}");
        let err = p.get("b").unwrap_err().to_string();
        assert!(err.contains("`b`") && err.contains("missing"), "{err}");
    }

    #[test]
    fn sgd_step_subtracts_scaled_gradient() {
        let mut p = ParamSet::new();
        p.insert("w", Tensor::new(&[1f64, 2.], &Device::Cpu).unwrap())
            .unwrap();
        let mut g = ParamSet::new();
        g.insert("w", Tensor::new(&[10f64, -10.], &Device::Cpu).unwrap())
            .unwrap();
        let stepped = p.sgd_step(&g, 0.1).unwrap();
        let w: Vec<f64> = stepped.get("w").unwrap().to_vec1().unwrap();
        assert_eq!(w, vec![0., 3.]);
        let err = p.sgd_step(&ParamSet::new(), 0.1).unwrap_err().to_string();
        assert!(err.contains("`w`"), "{err}");
    }

    #[test]
    fn prefixes_round_trip() {
        let mut p = ParamSet::new();
        p.insert("w", scalar(1.)).unwrap();
        let q = p.with_prefix("net.");
        assert_eq!(q.names(), ["net.w"]);
        assert_eq!(q.strip_prefix("net.").names(), ["w"]);
        assert!(q.strip_prefix("other.").is_empty());
    }

    #[test]
    fn probes_report_gradients_at_intermediate_tensors() {
        let mut p = ParamSet::new();
        p.insert("w", scalar(3.)).unwrap();
        let vars = p.to_vars().unwrap();
        // Adapted weight w' = 2w is not a leaf; d(w'^2)/dw' = 2w' = 12.
        let mut adapted = ParamSet::new();
        adapted
            .insert("w", (vars.as_params().get("w").unwrap() * 2.).unwrap())
            .unwrap();
        let (probed, probes) = adapted.probed().unwrap();
        let loss = probed.get("w").unwrap().sqr().unwrap();
        let grads = loss.backward().unwrap();
        let at_adapted = probes.gradients(&grads).unwrap();
        let at_leaf = vars.gradients(&grads).unwrap();
        assert_eq!(
            at_adapted.get("w").unwrap().to_scalar::<f64>().unwrap(),
            12.
        );
        assert_eq!(at_leaf.get("w").unwrap().to_scalar::<f64>().unwrap(), 24.);
    }

    #[test]
    fn var_set_rejects_wrong_shapes() {
        let mut p = ParamSet::new();
        p.insert("w", Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let vars = p.to_vars().unwrap();
        let mut bad = ParamSet::new();
        bad.insert("w", Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let err = vars.set(&bad).unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("[4]"), "{err}");
    }
}
