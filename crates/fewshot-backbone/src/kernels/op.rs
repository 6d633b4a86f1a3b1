//! The glue between a kernel and candle: each kernel names itself, computes
//! its output for any float type, gives its output shape and its backward;
//! `Op` turns that into a candle custom op, and `apply1`..`apply3` run it on
//! contiguous inputs with the autograd graph recorded.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};

/// A one-input kernel.
pub trait Kernel1: Send + Sync + 'static {
    const NAME: &'static str;
    /// The output, from contiguous input elements.
    fn run<T: WithDType>(&self, a: &[T]) -> Vec<T>;
    /// The output shape; by default the input's.
    fn shape(&self, input: &Shape) -> Shape {
        input.clone()
    }
    /// The input's gradient from the output's (`None`: no gradient).
    fn backward(&self, a: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>>;
}

/// A two-input kernel.
pub trait Kernel2: Send + Sync + 'static {
    const NAME: &'static str;
    fn run<T: WithDType>(&self, a: &[T], b: &[T]) -> Vec<T>;
    /// The output shape; by default the first input's.
    fn shape(&self, first: &Shape) -> Shape {
        first.clone()
    }
    fn backward(
        &self,
        a: &Tensor,
        b: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)>;
}

/// A three-input kernel.
pub trait Kernel3: Send + Sync + 'static {
    const NAME: &'static str;
    fn run<T: WithDType>(&self, a: &[T], b: &[T], c: &[T]) -> Vec<T>;
    /// The output shape; by default the first input's.
    fn shape(&self, first: &Shape) -> Shape {
        first.clone()
    }
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>;
}

/// A kernel as a candle custom op.
pub(super) struct Op<K>(pub K);

pub fn apply1<K: Kernel1>(a: &Tensor, kernel: K) -> Result<Tensor> {
    a.contiguous()?.apply_op1(Op(kernel))
}

pub fn apply2<K: Kernel2>(a: &Tensor, b: &Tensor, kernel: K) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, Op(kernel))
}

pub fn apply3<K: Kernel3>(a: &Tensor, b: &Tensor, c: &Tensor, kernel: K) -> Result<Tensor> {
    a.contiguous()?
        .apply_op3(&b.contiguous()?, &c.contiguous()?, Op(kernel))
}

/// The elements of a contiguous CPU tensor's storage.
fn contiguous<'a, T: WithDType>(
    op: &'static str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&T::cpu_storage_as_slice(storage)?[start..end]),
        None => bail!("{op}: the kernels need contiguous inputs"),
    }
}

impl<K: Kernel1> CustomOp1 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(self.0.run(contiguous(K::NAME, s, l)?)),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(self.0.run(contiguous(K::NAME, s, l)?)),
            other => bail!("{}: unsupported dtype {:?}", K::NAME, other.dtype()),
        };
        Ok((out, self.0.shape(l.shape())))
    }

    fn bwd(&self, a: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.0.backward(a, out, grad)
    }
}

impl<K: Kernel2> CustomOp2 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = K::NAME;
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => f32::to_cpu_storage_owned(
                self.0
                    .run(contiguous(name, s1, l1)?, contiguous(name, s2, l2)?),
            ),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => f64::to_cpu_storage_owned(
                self.0
                    .run(contiguous(name, s1, l1)?, contiguous(name, s2, l2)?),
            ),
            (a, b) => bail!(
                "{name}: unsupported dtypes {:?} and {:?}",
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((out, self.0.shape(l1.shape())))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.0.backward(a, b, out, grad)
    }
}

impl<K: Kernel3> CustomOp3 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = K::NAME;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                f32::to_cpu_storage_owned(self.0.run(
                    contiguous(name, s1, l1)?,
                    contiguous(name, s2, l2)?,
                    contiguous(name, s3, l3)?,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                f64::to_cpu_storage_owned(self.0.run(
                    contiguous(name, s1, l1)?,
                    contiguous(name, s2, l2)?,
                    contiguous(name, s3, l3)?,
                ))
            }
            (a, b, c) => bail!(
                "{name}: unsupported dtypes {:?}, {:?} and {:?}",
                a.dtype(),
                b.dtype(),
                c.dtype()
            ),
        };
        Ok((out, self.0.shape(l1.shape())))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.0.backward(a, b, c, out, grad)
    }
}

/// `f()` when `input` is part of an autograd graph (a variable or computed
/// from one), else no gradient: images and constants need none.
pub fn gradient_if(input: &Tensor, f: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    match input.track_op() {
        true => f().map(Some),
        false => Ok(None),
    }
}
