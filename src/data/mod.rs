//! Data sets and their formats: JSONL I/O and GSM8K's answer conventions.

pub mod gsm8k;
pub mod jsonl;
