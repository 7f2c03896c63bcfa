//! The model core: architectures, weights (safetensors, GGUF, hub), tokenizer
//! and chat template, generation. Usable and tested without the runner.

pub mod config;
pub mod ops;
pub mod transformer;

pub use config::{Arch, Config};
pub use ops::Kernels;
pub use transformer::{Batch, KvCache, Transformer};
