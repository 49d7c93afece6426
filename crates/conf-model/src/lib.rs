//! MiniGPT and ConfidenceAwareGPT, written once on Burn's backend-agnostic `Tensor`: the
//! backend is whatever `Device` the models are built on.

pub mod attention;
mod confidence_gpt;
mod config;
pub mod fused;
pub mod init;
pub mod layers;
mod mini_gpt;
mod precision;
pub mod profiler;

pub use attention::{AttentionMask, CausalSelfAttention, LayerKv, causal_mask, softmax_attention};
pub use confidence_gpt::{ConfidenceAwareGpt, ConfidenceOutput, MetaAwareBlock, StateOutput};
pub use config::{ConfHead, ConfidenceGptConfig, GptConfig, ModelConfigError, ParameterMatch};
pub use layers::{AdaptiveLayer, Mlp};
pub use mini_gpt::{Block, MiniGpt, positions};
pub use precision::Precision;
