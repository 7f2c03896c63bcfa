//! The model core: architectures, weights (safetensors, GGUF, hub), tokenizer
//! and chat template, generation. Usable and tested without the runner.

pub mod config;
pub mod cpu_attention;
pub(crate) mod cpu_threads;
pub mod device;
pub mod ops;
pub mod skinny_matmul;
pub mod token_logprobs;
pub mod transformer;

pub use config::{Arch, Config};
pub use ops::Kernels;
pub use transformer::{Batch, KvCache, Transformer};
pub mod load;
pub mod lora;
pub mod tokenizer;

pub use load::{LoadedModel, ModelRef};
pub use tokenizer::{ChatTokenizer, Message};
pub mod generate;
mod gguf_meta;

pub use generate::{generate, Completion, FinishReason, SamplingParams};
