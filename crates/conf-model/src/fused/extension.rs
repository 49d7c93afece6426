//! The fused operations as a Burn backend extension on flex, with their own backward under
//! autodiff (the state each saves is what its backward kernel reads).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{
    Autodiff, Backend, Dispatch, DispatchDevice, Flex, GradientCheckpointingStrategy,
    TensorMetadata, backend_extension,
};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use super::{AdamWScalars, head_attention, kernels, logit_rows, products, update};

/// Whether `x` takes the fused path: an f32 tensor on flex, with or without autodiff, but not
/// under gradient checkpointing: the kernels keep the tensors their backward reads for the
/// whole pass, where Burn's checkpointing recomputes the element-wise chains they replace, so
/// they would cost the memory checkpointing is asked to save.
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    let device = x.device();
    x.dtype() == DType::F32
        && device.gradient_checkpointing_strategy() != Some(GradientCheckpointingStrategy::Balanced)
        && is_flex(&device)
}

/// Whether `device` is flex's, with or without autodiff.
pub fn is_flex(device: &Device) -> bool {
    matches!(
        device.clone().without_autodiff().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_gelu(x.into_dispatch()))
}

pub fn normalise<const D: usize>(x: Tensor<D>, eps: f32) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_normalise(
        x.into_dispatch(),
        eps,
    ))
}

pub fn adaptive_norm(
    x: Tensor<3>,
    c: Tensor<3>,
    weight: Tensor<2>,
    bias: Tensor<1>,
    eps: f32,
) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_adaptive_norm(
        x.into_dispatch(),
        c.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        eps,
    ))
}

pub fn matmul<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_matmul(
        lhs.into_dispatch(),
        rhs.into_dispatch(),
    ))
}

pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, causal: bool) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        causal,
    ))
}

pub fn attention_softmax(scores: Tensor<4>, causal: bool) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention_softmax(
        scores.into_dispatch(),
        causal,
    ))
}

/// AdamW's update of one parameter (no autodiff: optimizers step on the inner tensors): the
/// new parameter and moments.
pub fn adamw<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moment_1: Tensor<D>,
    moment_2: Tensor<D>,
    s: AdamWScalars,
) -> [Tensor<D>; 3] {
    let (param, moment_1, moment_2) = <Dispatch as NoGradOps>::fused_adamw(
        param.into_dispatch(),
        grad.into_dispatch(),
        moment_1.into_dispatch(),
        moment_2.into_dispatch(),
        s,
    );
    [param, moment_1, moment_2].map(Tensor::from_dispatch)
}

/// The attention of the passes that extend cached keys (no autodiff): queries `[B, H, S, dh]`
/// over the cached keys and values (`0..=i` with `causal`, all without) and their own.
pub fn prefix_and_self_attention(
    q: Tensor<4>,
    own_key: Tensor<4>,
    own_value: Tensor<4>,
    past_key: Tensor<4>,
    past_value: Tensor<4>,
    causal: bool,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NoGradOps>::fused_prefix_and_self_attention(
        q.into_dispatch(),
        own_key.into_dispatch(),
        own_value.into_dispatch(),
        past_key.into_dispatch(),
        past_value.into_dispatch(),
        causal,
    ))
}

/// Each row's cross-entropy: `logits [B, T, V]`, `targets [B, T]` → `[B, T]`.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_cross_entropy(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

/// Each row's loss, largest probability, correctness and entropy (no autodiff), `[B, T]` each.
pub fn token_statistics(logits: Tensor<3>, targets: Tensor<2, Int>) -> [Tensor<2>; 4] {
    let (loss, max_prob, correct, entropy) = <Dispatch as NoGradOps>::fused_token_statistics(
        logits.into_dispatch(),
        targets.into_dispatch(),
    );
    [loss, max_prob, correct, entropy].map(Tensor::from_dispatch)
}

/// One draw per row of `logits [B, T, V]` at `uniforms [B, T]` (no autodiff).
pub fn sample_tokens(logits: Tensor<3>, uniforms: Tensor<2>) -> Tensor<2, Int> {
    Tensor::from_dispatch(<Dispatch as NoGradOps>::fused_sample_tokens(
        logits.into_dispatch(),
        uniforms.into_dispatch(),
    ))
}

/// Operations that never take gradients: the optimizer's update, and the attention of a pass
/// that builds no graph.
#[backend_extension(Flex)]
pub trait NoGradOps: Backend {
    #[allow(clippy::type_complexity)]
    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        scalars: AdamWScalars,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    fn fused_prefix_and_self_attention(
        q: FloatTensor<Self>,
        own_key: FloatTensor<Self>,
        own_value: FloatTensor<Self>,
        past_key: FloatTensor<Self>,
        past_value: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self>;

    /// Loss, largest probability, correctness, entropy.
    #[allow(clippy::type_complexity)]
    fn fused_token_statistics(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );

    fn fused_sample_tokens(
        logits: FloatTensor<Self>,
        uniforms: FloatTensor<Self>,
    ) -> IntTensor<Self>;
}

impl NoGradOps for Flex {
    fn fused_adamw(
        param: FlexTensor,
        grad: FlexTensor,
        moment_1: FlexTensor,
        moment_2: FlexTensor,
        s: AdamWScalars,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        on_flex::adamw(&param, &grad, &moment_1, &moment_2, s)
    }

    fn fused_prefix_and_self_attention(
        q: FlexTensor,
        own_key: FlexTensor,
        own_value: FlexTensor,
        past_key: FlexTensor,
        past_value: FlexTensor,
        causal: bool,
    ) -> FlexTensor {
        on_flex::prefix_and_self_attention(&q, &own_key, &own_value, &past_key, &past_value, causal)
    }

    fn fused_token_statistics(
        logits: FlexTensor,
        targets: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor, FlexTensor) {
        on_flex::token_statistics(&logits, &targets)
    }

    fn fused_sample_tokens(logits: FlexTensor, uniforms: FlexTensor) -> FlexTensor {
        on_flex::sample_tokens(&logits, &uniforms)
    }
}

#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    fn fused_normalise(x: FloatTensor<Self>, eps: f32) -> FloatTensor<Self>;
    fn fused_adaptive_norm(
        x: FloatTensor<Self>,
        c: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;
    fn fused_attention_softmax(scores: FloatTensor<Self>, causal: bool) -> FloatTensor<Self>;
    fn fused_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self>;
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self>;
    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self>;
}

impl FusedOps for Flex {
    fn fused_gelu(x: FlexTensor) -> FlexTensor {
        on_flex::gelu(&x)
    }

    fn fused_normalise(x: FlexTensor, eps: f32) -> FlexTensor {
        on_flex::normalise(&x, eps).0
    }

    fn fused_adaptive_norm(
        x: FlexTensor,
        c: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        eps: f32,
    ) -> FlexTensor {
        on_flex::adaptive_norm(&x, &c, &weight, &bias, eps).0
    }

    fn fused_attention_softmax(scores: FlexTensor, causal: bool) -> FlexTensor {
        on_flex::attention_softmax(&scores, causal)
    }

    fn fused_matmul(lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
        on_flex::matmul(&lhs, &rhs)
    }

    fn fused_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, causal: bool) -> FlexTensor {
        on_flex::attention(&q, &k, &v, causal, false).0
    }

    fn fused_cross_entropy(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        on_flex::cross_entropy(&logits, &targets).0
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        // Saves the input.
        one_input::<C, _>(x, |x| (on_flex::gelu(x), x.clone()), on_flex::gelu_backward)
    }

    fn fused_normalise(x: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        // Saves the output and each row's 1 / std.
        one_input::<C, _>(
            x,
            |x| {
                let (output, inv_std) = on_flex::normalise(x, eps);
                (output.clone(), (output, Arc::from(inv_std)))
            },
            |(output, inv_std), grad| on_flex::normalise_backward(output, inv_std, grad),
        )
    }

    fn fused_adaptive_norm(
        x: FloatTensor<Self>,
        c: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AdaptiveNormBackward;

        impl Backward<Flex, 4> for AdaptiveNormBackward {
            type State = on_flex::AdaptiveNormSaved;

            fn backward(
                self,
                ops: Ops<Self::State, 4>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<Flex>(&ops.node);
                let [dx, dc, dw, db] = on_flex::adaptive_norm_backward(&ops.state, &grad);
                for (parent, g) in ops.parents.into_iter().zip([dx, dc, dw, db]) {
                    if let Some(node) = parent {
                        grads.register::<Flex>(node.id, g);
                    }
                }
            }
        }

        let nodes = [x.node(), c.node(), weight.node(), bias.node()];
        match AdaptiveNormBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (c, weight, bias) = (
                    c.into_primitive(),
                    weight.into_primitive(),
                    bias.into_primitive(),
                );
                let (output, saved) =
                    on_flex::adaptive_norm(&x.into_primitive(), &c, &weight, &bias, eps);
                prep.finish(saved, output)
            }
            OpsKind::UnTracked(prep) => {
                let (x, c) = (x.into_primitive(), c.into_primitive());
                let (weight, bias) = (weight.into_primitive(), bias.into_primitive());
                prep.finish(on_flex::adaptive_norm(&x, &c, &weight, &bias, eps).0)
            }
        }
    }

    fn fused_attention_softmax(scores: FloatTensor<Self>, causal: bool) -> FloatTensor<Self> {
        // Saves the output.
        one_input::<C, _>(
            scores,
            |scores| {
                let output = on_flex::attention_softmax(scores, causal);
                (output.clone(), output)
            },
            on_flex::softmax_backward,
        )
    }

    fn fused_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MatmulBackward;

        impl Backward<Flex, 2> for MatmulBackward {
            /// Both operands (shared buffers, not copies).
            type State = (FlexTensor, FlexTensor);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<Flex>(&ops.node);
                let (lhs, rhs) = &ops.state;
                let [lhs_node, rhs_node] = ops.parents;
                // d(lhs) = grad · rhsᵀ, d(rhs) = lhsᵀ · grad: transposed views, no copies.
                if let Some(node) = lhs_node {
                    let g = on_flex::matmul(&grad, &on_flex::transposed(rhs));
                    grads.register::<Flex>(node.id, g);
                }
                if let Some(node) = rhs_node {
                    let g = on_flex::matmul(&on_flex::transposed(lhs), &grad);
                    grads.register::<Flex>(node.id, g);
                }
            }
        }

        match MatmulBackward
            .prepare::<C>([lhs.node(), rhs.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (lhs, rhs) = (lhs.into_primitive(), rhs.into_primitive());
                let output = on_flex::matmul(&lhs, &rhs);
                prep.finish((lhs, rhs), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(on_flex::matmul(
                &lhs.into_primitive(),
                &rhs.into_primitive(),
            )),
        }
    }

    fn fused_attention(
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
                let (output, probs) = on_flex::attention(&q, &k, &v, causal, true);
                let saved = AttentionSaved {
                    q,
                    k,
                    v,
                    probs: Arc::new(probs),
                    causal,
                };
                prep.finish(saved, output)
            }
            OpsKind::UnTracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                prep.finish(on_flex::attention(&q, &k, &v, causal, false).0)
            }
        }
    }
    fn fused_cross_entropy(logits: FloatTensor<Self>, targets: FlexTensor) -> FloatTensor<Self> {
        // Saves the logits (a shared buffer), the targets and each row's log-sum-exp.
        one_input::<C, _>(
            logits,
            |logits| on_flex::cross_entropy(logits, &targets),
            on_flex::cross_entropy_backward,
        )
    }
}

/// What the attention's backward reads: its inputs (shared buffers) and the probabilities.
#[derive(Debug, Clone)]
struct AttentionSaved {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    /// Shared, not copied: `Arc<[f32]>::from(Vec)` would copy the whole `[B, H, S, K]`.
    probs: Arc<Vec<f32>>,
    causal: bool,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionSaved;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let s = &ops.state;
        let gradients = on_flex::attention_backward(&s.q, &s.k, &s.v, &s.probs, s.causal, &grad);
        for (parent, g) in ops.parents.into_iter().zip(gradients) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

/// The backward of a one-input fused operation: `backward(saved, grad)` is the input's
/// gradient, `saved` what the forward kept.
#[derive(Debug)]
struct OneInputBackward<S> {
    backward: fn(&S, &FlexTensor) -> FlexTensor,
}

impl<S: Clone + Send + std::fmt::Debug + 'static> Backward<Flex, 1> for OneInputBackward<S> {
    type State = S;

    fn backward(self, ops: Ops<S, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let saved = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            (self.backward)(&saved, &grad)
        });
    }
}

/// A one-input fused operation under autodiff: `forward` gives the output and what its
/// backward reads, kept only when the input is tracked.
fn one_input<C: CheckpointStrategy, S: Clone + Send + std::fmt::Debug + 'static>(
    x: FloatTensor<Autodiff<Flex, C>>,
    forward: impl FnOnce(&FlexTensor) -> (FlexTensor, S),
    backward: fn(&S, &FlexTensor) -> FlexTensor,
) -> FloatTensor<Autodiff<Flex, C>> {
    let op = OneInputBackward { backward };
    match op.prepare::<C>([x.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (output, saved) = forward(&x.into_primitive());
            prep.finish(saved, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(&x.into_primitive()).0),
    }
}

/// The kernels on flex tensors: contiguous f32 in, a new contiguous tensor of the same shape
/// out.
mod on_flex {
    use super::*;

    /// `t`'s values in row-major order (a copy only when `t` is a strided view).
    fn values(t: &FlexTensor) -> FlexTensor {
        assert_eq!(t.dtype(), DType::F32, "fused operations run on f32");
        t.to_contiguous()
    }

    fn slice(t: &FlexTensor) -> &[f32] {
        t.as_slice::<f32>().expect("a contiguous f32 tensor")
    }

    fn like(t: &FlexTensor, values: Vec<f32>) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, t.shape()))
    }

    fn last_dim(t: &FlexTensor) -> usize {
        *t.shape().last().expect("a tensor with dimensions")
    }

    pub fn gelu(x: &FlexTensor) -> FlexTensor {
        let x = values(x);
        like(&x, kernels::gelu(slice(&x)))
    }

    pub fn gelu_backward(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
        let (x, grad) = (values(x), values(grad));
        like(&x, kernels::gelu_backward(slice(&x), slice(&grad)))
    }

    pub fn normalise(x: &FlexTensor, eps: f32) -> (FlexTensor, Vec<f32>) {
        let x = values(x);
        let (output, inv_std) = kernels::normalise(slice(&x), last_dim(&x), eps);
        (like(&x, output), inv_std)
    }

    pub fn normalise_backward(y: &FlexTensor, inv_std: &[f32], grad: &FlexTensor) -> FlexTensor {
        let (y, grad) = (values(y), values(grad));
        let len = last_dim(&y);
        like(
            &y,
            kernels::normalise_backward(slice(&y), inv_std, slice(&grad), len),
        )
    }

    /// What the AdaptiveLayer's backward reads: `x̂`, each row's `1 / std`, and the
    /// confidence, weight and bias inputs (contiguous).
    #[derive(Debug, Clone)]
    pub struct AdaptiveNormSaved {
        normalised: FlexTensor,
        inv_std: Arc<[f32]>,
        c: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
    }

    pub fn adaptive_norm(
        x: &FlexTensor,
        c: &FlexTensor,
        weight: &FlexTensor,
        bias: &FlexTensor,
        eps: f32,
    ) -> (FlexTensor, AdaptiveNormSaved) {
        let (x, c, weight, bias) = (values(x), values(c), values(weight), values(bias));
        let (output, normalised, inv_std) = kernels::adaptive_norm(
            slice(&x),
            slice(&c),
            slice(&weight),
            slice(&bias),
            last_dim(&x),
            eps,
        );
        let saved = AdaptiveNormSaved {
            normalised: like(&x, normalised),
            inv_std: inv_std.into(),
            c,
            weight,
            bias,
        };
        (like(&x, output), saved)
    }

    /// The gradients for `x`, `c`, `weight` and `bias`, in that order.
    pub fn adaptive_norm_backward(saved: &AdaptiveNormSaved, grad: &FlexTensor) -> [FlexTensor; 4] {
        let grad = values(grad);
        let normalised = &saved.normalised;
        let grads = kernels::adaptive_norm_backward(
            slice(normalised),
            &saved.inv_std,
            slice(&saved.c),
            slice(&saved.weight),
            slice(&saved.bias),
            slice(&grad),
            last_dim(normalised),
        );
        [
            like(normalised, grads.x),
            like(&saved.c, grads.c),
            like(&saved.weight, grads.w),
            like(&saved.bias, grads.b),
        ]
    }

    pub fn attention_softmax(scores: &FlexTensor, causal: bool) -> FlexTensor {
        let scores = values(scores);
        let dims = scores.shape();
        let (queries, keys) = (dims[dims.num_dims() - 2], dims[dims.num_dims() - 1]);
        like(
            &scores,
            kernels::attention_softmax(slice(&scores), keys, queries, causal),
        )
    }

    /// The view of `t` with its last two dimensions swapped (no copy).
    pub fn transposed(t: &FlexTensor) -> FlexTensor {
        let rank = t.shape().num_dims();
        t.transpose(rank - 2, rank - 1)
    }

    /// The stack of matrices `t: [.., rows, cols]` holds, read in place (views included).
    fn matrices(t: &FlexTensor) -> products::Matrices<'_> {
        assert_eq!(t.dtype(), DType::F32, "fused operations run on f32");
        let layout = t.layout();
        let (dims, strides) = (layout.shape(), layout.strides());
        let rank = dims.num_dims();
        // Each matrix's start: the batch dimensions' index times their strides.
        let mut offsets = vec![layout.start_offset() as isize];
        for axis in 0..rank - 2 {
            offsets = offsets
                .iter()
                .flat_map(|&o| (0..dims[axis]).map(move |i| o + i as isize * strides[axis]))
                .collect();
        }
        products::Matrices {
            data: t.storage::<f32>(),
            offsets,
            rows: dims[rank - 2],
            cols: dims[rank - 1],
            row_stride: strides[rank - 2],
            col_stride: strides[rank - 1],
        }
    }

    /// `lhs · rhs` over the last two dimensions; the batch dimensions must be equal.
    pub fn matmul(lhs: &FlexTensor, rhs: &FlexTensor) -> FlexTensor {
        let (lhs_dims, rhs_dims) = (lhs.shape(), rhs.shape());
        let rank = lhs_dims.num_dims();
        assert!(
            rank >= 2
                && rhs_dims.num_dims() == rank
                && lhs_dims[..rank - 2] == rhs_dims[..rank - 2],
            "fused matmul: batch dimensions differ ({lhs_dims:?} · {rhs_dims:?})"
        );
        let values = products::matmul(&matrices(lhs), &matrices(rhs));
        let mut dims = lhs_dims.clone();
        dims[rank - 1] = rhs_dims[rank - 1];
        FlexTensor::from_data(TensorData::new(values, dims))
    }

    /// `[B, S, H, dh]` memory as the `[B, H, S, dh]` tensor it holds (a view).
    fn heads_view(
        values: Vec<f32>,
        batch: usize,
        heads: usize,
        rows: usize,
        dh: usize,
    ) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, [batch, rows, heads, dh])).transpose(1, 2)
    }

    fn heads<'a>(
        q: &'a FlexTensor,
        k: &'a FlexTensor,
        v: &'a FlexTensor,
        causal: bool,
    ) -> head_attention::Heads<'a> {
        let dims = q.shape();
        assert_eq!(dims.num_dims(), 4, "attention on [B, H, S, dh]");
        head_attention::Heads {
            q: matrices(q),
            k: matrices(k),
            v: matrices(v),
            heads: dims[1],
            scale: 1.0 / (dims[3] as f32).sqrt(),
            causal,
        }
    }

    /// Attention of `q: [B, H, S, dh]` over `k`, `v: [B, H, K, dh]`, scaled by `1/√dh`: the
    /// output (a view of `[B, S, H, dh]` memory) and, with `keep_probs`, the probabilities.
    pub fn attention(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        causal: bool,
        keep_probs: bool,
    ) -> (FlexTensor, Vec<f32>) {
        let d = q.shape();
        let (output, probs) = head_attention::forward(&heads(q, k, v, causal), keep_probs);
        (heads_view(output, d[0], d[1], d[2], d[3]), probs)
    }

    /// [`head_attention::prefix_and_self`] on `[B, H, S, dh]` tensors (views included): a
    /// view of `[B, S, H, dh]` memory.
    pub fn prefix_and_self_attention(
        q: &FlexTensor,
        own_key: &FlexTensor,
        own_value: &FlexTensor,
        past_key: &FlexTensor,
        past_value: &FlexTensor,
        causal: bool,
    ) -> FlexTensor {
        let d = q.shape();
        let output = head_attention::prefix_and_self(
            &heads(q, past_key, past_value, causal),
            &matrices(own_key),
            &matrices(own_value),
        );
        heads_view(output, d[0], d[1], d[2], d[3])
    }

    /// The gradients of q, k and v.
    pub fn attention_backward(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        probs: &[f32],
        causal: bool,
        grad: &FlexTensor,
    ) -> [FlexTensor; 3] {
        let [dq, dk, dv] =
            head_attention::backward(&heads(q, k, v, causal), probs, &matrices(grad));
        let (d, keys) = (q.shape(), k.shape()[2]);
        [
            heads_view(dq, d[0], d[1], d[2], d[3]),
            heads_view(dk, d[0], d[1], keys, d[3]),
            heads_view(dv, d[0], d[1], keys, d[3]),
        ]
    }

    pub fn adamw(
        param: &FlexTensor,
        grad: &FlexTensor,
        moment_1: &FlexTensor,
        moment_2: &FlexTensor,
        s: AdamWScalars,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let [param, grad, moment_1, moment_2] = [param, grad, moment_1, moment_2].map(values);
        let [p, m, v] = update::adamw(
            slice(&param),
            slice(&grad),
            slice(&moment_1),
            slice(&moment_2),
            s,
        );
        (like(&param, p), like(&param, m), like(&param, v))
    }

    pub fn softmax_backward(p: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
        let (p, grad) = (values(p), values(grad));
        like(
            &p,
            kernels::softmax_backward(slice(&p), slice(&grad), last_dim(&p)),
        )
    }
    /// `t`'s shape without its last dimension: one value per row.
    fn per_row(t: &FlexTensor, values: Vec<f32>) -> FlexTensor {
        let mut shape = t.shape();
        shape.remove(shape.num_dims() - 1);
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    /// Integer class indices, each checked to be below `classes`.
    fn indices(t: &FlexTensor, classes: usize) -> Vec<usize> {
        let t = t.to_contiguous();
        let values: Vec<i64> = match t.dtype() {
            DType::I64 => t.as_slice::<i64>().expect("contiguous").to_vec(),
            DType::I32 => (t.as_slice::<i32>().expect("contiguous").iter())
                .map(|&i| i64::from(i))
                .collect(),
            other => panic!("targets of type {other:?}: expected i64 or i32"),
        };
        values
            .into_iter()
            .map(|i| match usize::try_from(i) {
                Ok(i) if i < classes => i,
                _ => panic!("target {i} outside the vocabulary of {classes} tokens"),
            })
            .collect()
    }

    /// What the cross-entropy's backward reads.
    #[derive(Debug, Clone)]
    pub struct CrossEntropySaved {
        logits: FlexTensor,
        targets: Arc<[usize]>,
        log_sum_exp: Arc<[f32]>,
    }

    pub fn cross_entropy(
        logits: &FlexTensor,
        targets: &FlexTensor,
    ) -> (FlexTensor, CrossEntropySaved) {
        let logits = values(logits);
        let classes = last_dim(&logits);
        let targets = indices(targets, classes);
        let (loss, log_sum_exp) = logit_rows::cross_entropy(slice(&logits), &targets, classes);
        let saved = CrossEntropySaved {
            logits: logits.clone(),
            targets: targets.into(),
            log_sum_exp: log_sum_exp.into(),
        };
        (per_row(&logits, loss), saved)
    }

    pub fn cross_entropy_backward(saved: &CrossEntropySaved, grad: &FlexTensor) -> FlexTensor {
        let grad = values(grad);
        let logits = &saved.logits;
        like(
            logits,
            logit_rows::cross_entropy_backward(
                slice(logits),
                &saved.targets,
                &saved.log_sum_exp,
                slice(&grad),
                last_dim(logits),
            ),
        )
    }

    pub fn token_statistics(
        logits: &FlexTensor,
        targets: &FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor, FlexTensor) {
        let logits = values(logits);
        let classes = last_dim(&logits);
        let s = logit_rows::statistics(slice(&logits), &indices(targets, classes), classes);
        let row = |v| per_row(&logits, v);
        (row(s.loss), row(s.max_prob), row(s.correct), row(s.entropy))
    }

    pub fn sample_tokens(logits: &FlexTensor, uniforms: &FlexTensor) -> FlexTensor {
        let (logits, uniforms) = (values(logits), values(uniforms));
        let draws = logit_rows::sample(slice(&logits), slice(&uniforms), last_dim(&logits));
        FlexTensor::from_data(TensorData::new(draws, uniforms.shape()))
    }
}
