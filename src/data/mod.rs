//! Data sets and their formats: JSONL I/O, the row schemas stages exchange,
//! and GSM8K's answer conventions.

pub mod gsm8k;
pub mod jsonl;
pub mod qa;
pub mod rows;

pub use rows::{Message, PromptRow, SftRow};
