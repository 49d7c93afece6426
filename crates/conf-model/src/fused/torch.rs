//! The attention on libtorch's CPU device (tch-cpu) through PyTorch's own fused
//! scaled-dot-product attention, forward and backward (its flash kernel for the CPU), with
//! Burn's autodiff recording one operation. Burn's path records the decomposed softmax over
//! `[B, H, S, K]` scores, and libtorch's vectorised exponential takes its slow path on every
//! masked (−∞) score.

// burn-tch is deprecated upstream; this module exists for the tch backends while Burn has them.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::{LibTorchDevice, TchTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, DispatchDevice, LibTorch, backend_extension};
use burn::prelude::*;
use burn::tensor::DType;

/// Whether q, k, v (`[B, H, S|K, dh]`) take PyTorch's attention: f32 on libtorch's CPU
/// device, and for a causal mask as many keys as queries (its causal mask is aligned at the
/// first key, so it cannot serve queries over cached keys).
pub fn applies(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, causal: bool) -> bool {
    let on_torch_cpu = |t: &Tensor<4>| {
        t.dtype() == DType::F32
            && matches!(
                t.device().without_autodiff().as_dispatch(),
                DispatchDevice::LibTorch(LibTorchDevice::Cpu)
            )
    };
    [q, k, v].into_iter().all(on_torch_cpu) && (!causal || q.dims()[2] == k.dims()[2])
}

pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, causal: bool) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as TorchOps>::torch_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        causal,
    ))
}

#[backend_extension(LibTorch, Autodiff)]
pub trait TorchOps: Backend {
    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self>;
}

/// The output and the rows' log-sum-exp, which the backward reads.
fn forward(q: &TchTensor, k: &TchTensor, v: &TchTensor, causal: bool) -> (TchTensor, TchTensor) {
    let (output, logsumexp) = tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu(
        &q.tensor,
        &k.tensor,
        &v.tensor,
        0.0,
        causal,
        None::<tch::Tensor>,
        None::<f64>,
    );
    (TchTensor::new(output), TchTensor::new(logsumexp))
}

impl TorchOps for LibTorch {
    fn torch_attention(q: TchTensor, k: TchTensor, v: TchTensor, causal: bool) -> TchTensor {
        forward(&q, &k, &v, causal).0
    }
}

/// What the backward reads: the inputs, the output and its log-sum-exp.
#[derive(Debug, Clone)]
struct Saved {
    q: TchTensor,
    k: TchTensor,
    v: TchTensor,
    output: TchTensor,
    logsumexp: TchTensor,
    causal: bool,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<LibTorch, 3> for AttentionBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<LibTorch>(&ops.node);
        let s = &ops.state;
        let (dq, dk, dv) =
            tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu_backward(
                &grad.tensor,
                &s.q.tensor,
                &s.k.tensor,
                &s.v.tensor,
                &s.output.tensor,
                &s.logsumexp.tensor,
                0.0,
                s.causal,
                None::<tch::Tensor>,
                None::<f64>,
            );
        for (parent, g) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = parent {
                grads.register::<LibTorch>(node.id, TchTensor::new(g));
            }
        }
    }
}

impl<C: CheckpointStrategy> TorchOps for Autodiff<LibTorch, C> {
    fn torch_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self> {
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let (output, logsumexp) = forward(&q, &k, &v, causal);
                let saved = Saved {
                    q,
                    k,
                    v,
                    output: output.clone(),
                    logsumexp,
                    causal,
                };
                prep.finish(saved, output)
            }
            OpsKind::UnTracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                prep.finish(forward(&q, &k, &v, causal).0)
            }
        }
    }
}
