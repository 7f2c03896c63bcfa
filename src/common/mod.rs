//! What both sides of the crate need, importing neither: typed parameters and
//! their errors, diagnostics with file and line, YAML positions, durable file
//! helpers, checkpoint folders, cancellation and the host interface of long loops. The runner (`pipeline/`) and
//! the ML core (`model/`, `train/`, `rewards/`, `data/`) both build on this;
//! `tests/layers.rs` fails if either side imports the other.

pub mod builtin;
pub mod cancel;
pub mod checkpoints;
pub mod diagnostic;
pub mod fault;
pub mod fsutil;
pub mod host;
pub mod memory;
pub mod names;
pub mod params;
pub mod redact;
pub mod supervised;
pub mod table;
pub mod yaml_pos;

pub use cancel::{CancelToken, Cancelled};
pub use host::{FolderHost, Host};
pub use params::{typed, ParamError};
