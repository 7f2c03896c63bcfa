//! `r1pipe infer`: ask a model a question and stream the answer; `-i` for a chat loop.

use std::io::{BufRead, Write};

use anyhow::{bail, Result};
use rand::SeedableRng;

use r1pipe::data::gsm8k::R1_SYSTEM_PROMPT;
use r1pipe::model::{self, device, generate, Message, SamplingParams};

#[derive(clap::Args)]
pub struct InferArgs {
    /// A model folder, a .gguf file, or a hub id (Qwen/Qwen2.5-0.5B-Instruct)
    #[arg(long)]
    pub model: String,
    /// The question (or -i)
    pub question: Option<String>,
    /// System prompt [default: the R1 think/answer format prompt]
    #[arg(long)]
    pub system_prompt: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 is greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep tokens at least this fraction as likely as the most likely one
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Divide (or multiply, if negative) the logits of tokens already seen; 1 is none
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (f32 on CPU, bf16 on CUDA), f32, bf16 or f16
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// A chat loop on stdin
    #[arg(short, long)]
    pub interactive: bool,
}

pub fn run(a: InferArgs) -> Result<i32> {
    if a.question.is_none() && !a.interactive {
        bail!("give a question, or -i for an interactive session");
    }
    eprintln!("loading {} …", a.model);
    let m = model::open(&a.model, &std::env::current_dir()?, &a.device, &a.dtype)?;
    eprintln!(
        "{} on {}, {:?}, kernels: {}",
        a.model,
        device::describe(&m.model.device),
        m.model.compute_dtype,
        r1pipe::kernels::describe(m.model.device.is_cpu(), m.model.compute_dtype)
    );
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        max_new_tokens: a.max_new_tokens,
        stop: Vec::new(),
        include_stop_str_in_output: false,
        tool_call: None,
        logprobs: false,
    };
    if let Some((field, message)) = params.problems().into_iter().next() {
        bail!("--{}: {message}", field.replace('_', "-"));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let system = Message::new("system", a.system_prompt.as_deref().unwrap_or(R1_SYSTEM_PROMPT));
    let mut history = vec![system.clone()];
    let mut ask = |history: &mut Vec<Message>, q: &str| -> Result<()> {
        history.push(Message::new("user", q));
        let ids = m.tokenizer.encode_chat(history, true)?;
        let t0 = std::time::Instant::now();
        let mut out = std::io::stdout();
        let mut print = |_row: usize, text: &str| {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        };
        let c = generate(&m.model, &m.tokenizer, &[ids], 1, &params, &mut rng, Some(&mut print))?;
        let secs = t0.elapsed().as_secs_f64();
        println!();
        eprintln!(
            "[{} tokens, {:.1} tokens/s, {:?}]",
            c[0].tokens.len(),
            c[0].tokens.len() as f64 / secs,
            c[0].finish_reason
        );
        history.push(Message::new("assistant", &c[0].text));
        Ok(())
    };
    if let Some(q) = &a.question {
        ask(&mut history, q)?;
    }
    if a.interactive {
        eprintln!("interactive: one question per line; /reset forgets the conversation; Ctrl-D ends");
        let stdin = std::io::stdin();
        loop {
            eprint!("> ");
            let mut line = String::new();
            if stdin.lock().read_line(&mut line)? == 0 {
                break;
            }
            let q = line.trim();
            if q.is_empty() {
                continue;
            }
            if q == "/reset" {
                history = vec![system.clone()];
                continue;
            }
            ask(&mut history, q)?;
        }
    }
    Ok(0)
}
