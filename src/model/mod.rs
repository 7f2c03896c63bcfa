//! The model core: architectures (typed layers, families as config flags),
//! weights (safetensors, GGUF, hub), tokenizer and chat template, generation.
//! The hand-written CPU kernels underneath live in `crate::kernels`. Usable
//! and tested without the runner.

pub mod batch;
pub mod batching;
pub mod checkpointing;
pub mod config;
pub mod device;
pub mod family;
pub mod generate;
pub(crate) mod gguf_meta;
pub mod grads;
pub mod kv_cache;
pub mod layers;
pub mod load;
pub mod lora;
pub mod ops;
pub mod peft;
mod template_limits;
mod template_sandbox;
pub mod tokenizer;
pub mod tool_call;
pub mod transformer;
pub mod vocab_logprobs;

pub use batch::Batch;
pub use config::{Config, Family};
pub use generate::{generate, Completion, FinishReason, SamplingParams};
pub use kv_cache::KvCache;
pub use layers::Pass;
pub use load::{open, LoadedModel, ModelRef};
pub use ops::Ops;
pub use tokenizer::{ChatTokenizer, Message};
pub use transformer::Transformer;
