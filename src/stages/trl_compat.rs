//! TRL's configuration in a training stage's `with:`: a `GRPOConfig` or
//! `SFTConfig` written as YAML carries over. Every field of TRL 1.16's two
//! configs (their own, `_BaseConfig`'s and transformers 5.25's
//! `TrainingArguments`, with their defaults: `trl_fields.json`, made by
//! tests/fixtures/make_trl_names.py from the published wheels) is one of:
//!
//! - the same name and meaning here (most of GRPO's and the optimizer's);
//! - translated: TRL's spelling or value turned into r1pipe's (`max_steps: -1`,
//!   `scale_rewards: true`, `use_vllm` + `vllm_mode: server` → `rollout:`);
//! - accepted at TRL's default, which asks for nothing r1pipe does not do
//!   (`push_to_hub: false`, `save_strategy: steps`), and refused otherwise, with
//!   the sentence that says what r1pipe does instead.
//!
//! The translation runs once, when the pipeline is read, so checks, runs and
//! fingerprints all see r1pipe's form. docs/grpo.md and docs/stages.md carry
//! [`table`] (tests/docs.rs keeps them equal).

use std::sync::LazyLock;

use serde_json::{Map, Value};

use crate::common::ParamError;

/// Which TRL config a stage's parameters follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainer {
    Grpo,
    Sft,
}

impl Trainer {
    fn key(self) -> &'static str {
        match self {
            Trainer::Grpo => "grpo",
            Trainer::Sft => "sft",
        }
    }
    pub fn config_name(self) -> &'static str {
        match self {
            Trainer::Grpo => "GRPOConfig",
            Trainer::Sft => "SFTConfig",
        }
    }
}

static FIELDS: LazyLock<Value> =
    LazyLock::new(|| serde_json::from_str(include_str!("trl_fields.json")).expect("trl_fields.json is JSON"));

/// TRL's fields of `trainer`'s config with their defaults, by name.
pub fn trl_fields(trainer: Trainer) -> &'static Map<String, Value> {
    FIELDS.get(trainer.key()).and_then(Value::as_object).expect("trl_fields.json has both configs")
}

/// What r1pipe does with a TRL field it does not take under that name.
fn instead(field: &str) -> &'static str {
    const OUTPUTS: &str =
        "the cache decides where outputs go: `r1pipe show STAGE.model` prints the trained model's folder";
    const LOGGING: &str =
        "every step goes to the stage's `log` (JSONL, TRL's metric names) and a line is printed every \
                           `logging_steps`; `r1pipe plot STAGE` draws the curves";
    const DISTRIBUTED: &str = "a stage trains on one device (`device:`, `resources:`); rollouts scale on a vLLM \
                               server (`rollout:`) and stages on a cluster executor (docs/rollouts.md)";
    const TORCH: &str = "a PyTorch setting: r1pipe computes on Candle with its own kernels (`device:`, and `dtype:` \
                         or `bf16:`)";
    const RESUME: &str = "an interrupted stage resumes from its newest checkpoint by itself, data position and RNG \
                          included (docs/cache.md)";
    const EVAL: &str = "evaluation during training runs on `eval_dataset` every `eval_steps` and after the last step, \
                        greedy unless `num_generations_eval` > 1 (docs/grpo.md)";
    const DATA: &str = "the data is the JSONL a `format` stage writes (prompts for GRPO, `{messages}` or \
                        `{prompt, completion}` for SFT), read whole in the stage's process";
    const HUB: &str = "r1pipe does not upload: the model folder (`r1pipe show STAGE.model`) is in the Hugging Face \
                       layout, ready for `hf upload`";
    const VLLM: &str = "r1pipe does not start vLLM: run `vllm serve MODEL --enable-lora` with these settings and name \
                        it in `rollout: {url, model}` (docs/rollouts.md)";
    const PRECISION: &str = "r1pipe computes in f32 or in bf16 with f32 master weights: `bf16: true` (or the \
                             pipeline's `dtype:`)";
    const MODEL: &str = "the model is the stage's `model:` (a folder, a .gguf or a hub id), loaded as it is";
    match field {
        "output_dir" | "logging_dir" | "overwrite_output_dir" => OUTPUTS,
        "fp16" | "fp16_full_eval" | "bf16_full_eval" | "tf32" | "half_precision_backend" | "cast_lm_head_to_fp32" => {
            PRECISION
        }
        "run_name"
        | "project"
        | "disable_tqdm"
        | "logging_strategy"
        | "logging_first_step"
        | "logging_nan_inf_filter"
        | "log_level"
        | "log_level_replica"
        | "log_on_each_node"
        | "include_num_input_tokens_seen"
        | "num_completions_to_print"
        | "log_unique_prompts"
        | "log_multimodal"
        | "skip_memory_metrics" => LOGGING,
        "use_vllm"
        | "vllm_mode"
        | "vllm_model_impl"
        | "vllm_enable_sleep_mode"
        | "vllm_structured_outputs_regex"
        | "vllm_server_timeout"
        | "vllm_group_port"
        | "vllm_gpu_memory_utilization"
        | "vllm_max_model_length"
        | "vllm_tensor_parallel_size"
        | "vllm_server_base_url"
        | "vllm_server_host"
        | "vllm_server_port"
        | "vllm_importance_sampling_cap" => VLLM,
        "resume_from_checkpoint"
        | "ignore_data_skip"
        | "restore_callback_states_from_checkpoint"
        | "save_only_model"
        | "enable_jit_checkpoint"
        | "save_strategy"
        | "save_on_each_node" => RESUME,
        "eval_strategy"
        | "eval_delay"
        | "eval_on_start"
        | "eval_do_concat_batches"
        | "eval_use_gather_object"
        | "eval_accumulation_steps"
        | "include_for_metrics"
        | "batch_eval_metrics"
        | "prediction_loss_only"
        | "eval_packing"
        | "do_eval"
        | "do_predict" => EVAL,
        "push_to_hub"
        | "hub_token"
        | "hub_private_repo"
        | "hub_model_id"
        | "hub_strategy"
        | "hub_always_push"
        | "hub_revision"
        | "log_completions_hub_repo" => HUB,
        "model_init_kwargs" | "trust_remote_code" | "chat_template_path" | "eos_token" | "pad_token" => MODEL,
        "optim" => "the optimizer is AdamW (PyTorch's form: decoupled weight decay, bias-corrected moments)",
        "optim_args" | "optim_target_modules" => {
            "the optimizer is AdamW with `adam_beta1`, `adam_beta2`, `adam_epsilon`, `weight_decay`"
        }
        "lr_scheduler_type" => {
            "the schedules are linear, cosine, constant, constant_with_warmup, cosine_with_restarts, \
                                polynomial, inverse_sqrt and cosine_with_min_lr"
        }
        "label_smoothing_factor" | "neftune_noise_alpha" | "router_aux_loss_coef" | "disable_dropout" => {
            "not offered: training uses the plain loss (models here have no dropout and no router)"
        }
        "auto_find_batch_size" => {
            "batch sizes are as written; the model-size check before a run says when they cannot fit"
        }
        "activation_checkpointing"
        | "activation_checkpointing_kwargs"
        | "gradient_checkpointing_kwargs"
        | "activation_offloading" => "`gradient_checkpointing: true` recomputes each decoder layer in backward",
        "generation_kwargs"
        | "chat_template_kwargs"
        | "cache_implementation"
        | "generation_batch_size"
        | "steps_per_generation"
        | "use_transformers_continuous_batching"
        | "transformers_continuous_batching_config"
        | "use_transformers_paged" => {
            "sampling is r1pipe's own continuous batching with the stage's sampling settings (temperature, top_p, \
             top_k, min_p, repetition_penalty); a step samples its whole batch"
        }
        "packing_strategy" | "padding_free" => {
            "`packing: true` packs examples into rows greedily, attention never \
                                                crossing examples"
        }
        "completion_only_loss" | "assistant_only_loss" => {
            "SFT trains on the completion (the assistant's turn) only, always"
        }
        "loss_type" => "SFT's loss is the mean negative log-likelihood of the completion tokens",
        "truncation_mode" => "an example longer than `max_length` is cut at its end, counted and reported",
        "full_determinism" | "data_seed" => "a stage is deterministic on the CPU given `seed` (resumed runs included)",
        "torch_empty_cache_steps"
        | "use_liger_kernel"
        | "liger_kernel_config"
        | "torch_compile"
        | "torch_compile_backend"
        | "torch_compile_mode"
        | "use_cpu"
        | "use_cache"
        | "debug"
        | "jit_mode_eval" => TORCH,
        f if f.starts_with("ddp_")
            || f.starts_with("fsdp")
            || f.starts_with("deepspeed")
            || f.starts_with("ds3_")
            || matches!(
                f,
                "local_rank" | "accelerator_config" | "parallelism_config" | "average_tokens_across_devices"
            ) =>
        {
            DISTRIBUTED
        }
        f if f.starts_with("dataloader_")
            || f.starts_with("dataset_")
            || f.starts_with("trackio_")
            || matches!(
                f,
                "remove_unused_columns"
                    | "label_names"
                    | "length_column_name"
                    | "train_sampling_strategy"
                    | "shuffle_dataset"
                    | "pad_to_multiple_of"
                    | "do_train"
            ) =>
        {
            if f.starts_with("trackio_") {
                LOGGING
            } else {
                DATA
            }
        }
        _ => "not offered by r1pipe",
    }
}

/// Whether `given` asks for what TRL's `default` does (so dropping it changes nothing).
fn same_as_default(given: &Value, default: &Value) -> bool {
    match (given, default) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::String(a), Value::Null) => a.is_empty(),
        (Value::Array(a), Value::Null) => a.is_empty(),
        (Value::Object(a), Value::Null) => a.is_empty(),
        (a, b) => a == b,
    }
}

/// Values of a refused field that mean what r1pipe does anyway.
fn harmless(field: &str, v: &Value) -> bool {
    let s = v.as_str().unwrap_or_default();
    match field {
        "save_strategy" | "logging_strategy" => s == "steps",
        "eval_strategy" => matches!(s, "no" | "steps"),
        "optim" => matches!(s, "adamw_torch" | "adamw_torch_fused" | "adamw_hf" | "default_optim"),
        "completion_only_loss" | "assistant_only_loss" => v != &Value::Bool(false),
        "loss_type" => s == "nll",
        "truncation_mode" => s == "keep_start",
        "do_train" => v == &Value::Bool(true),
        _ => false,
    }
}

/// Turn TRL's spellings and values in `params` into r1pipe's, in place. `known`
/// are the keys r1pipe's stage takes. Keys neither side knows are left for the
/// stage's own unknown-key error (with its did-you-mean).
pub fn normalize(params: &mut Map<String, Value>, trainer: Trainer, known: &[String]) -> Vec<ParamError> {
    let mut errors = Vec::new();
    let fields = trl_fields(trainer);
    // `max_steps: -1` is TRL's "train `num_train_epochs` instead".
    match params.get("max_steps").and_then(Value::as_i64) {
        Some(-1) => {
            params.remove("max_steps");
        }
        Some(n) if n < 0 => errors.push(
            ParamError::new("max_steps", format!("{n} is not a step count"))
                .hint("a positive number of optimizer steps, or -1 (TRL's default) to train num_train_epochs"),
        ),
        _ => {}
    }
    if let Some(Value::Bool(b)) = params.get("scale_rewards") {
        // TRL: True is "group", False is "none".
        let v = if *b { "group" } else { "none" };
        params.insert("scale_rewards".into(), Value::from(v));
    }
    if trainer == Trainer::Sft {
        if let Some(v) = params.remove("max_seq_length") {
            if params.contains_key("max_length") {
                errors.push(ParamError::new(
                    "max_seq_length",
                    "give `max_length` (TRL's name) or `max_seq_length`, not both",
                ));
            } else {
                params.insert("max_length".into(), v);
            }
        }
    }
    if trainer == Trainer::Grpo {
        errors.extend(vllm_to_rollout(params));
    }
    let names: Vec<String> = params.keys().cloned().collect();
    for key in names {
        if known.contains(&key) {
            continue;
        }
        let Some(default) = fields.get(&key) else { continue };
        let given = &params[&key];
        if same_as_default(given, default) || harmless(&key, given) {
            params.remove(&key);
            continue;
        }
        let leave = if default.is_null() {
            "leave it out".to_string()
        } else {
            format!("leave it out or at TRL's default `{}`", short(default))
        };
        errors.push(
            ParamError::new(key.clone(), format!("TRL's `{key}: {}` has no counterpart here", short(given)))
                .hint(format!("{}; {leave}", instead(&key))),
        );
        // Said once, here: the stage's own check would call it unknown.
        params.remove(&key);
    }
    errors
}

/// `use_vllm: true` with `vllm_mode: server` (TRL's external server) → `rollout: {url, model}`.
fn vllm_to_rollout(params: &mut Map<String, Value>) -> Vec<ParamError> {
    let on = params.get("use_vllm").and_then(Value::as_bool).unwrap_or(false);
    if !on {
        return Vec::new();
    }
    let mut errors = Vec::new();
    let mode = params.get("vllm_mode").and_then(Value::as_str).unwrap_or("colocate").to_string();
    if mode != "server" {
        errors.push(
            ParamError::new("vllm_mode", format!("`{mode}` runs vLLM inside the trainer, which r1pipe does not")).hint(
                "use `vllm_mode: server` with a `vllm serve MODEL --enable-lora` you start, or `rollout: {url, model}`",
            ),
        );
        return errors;
    }
    if params.contains_key("rollout") {
        errors.push(ParamError::new("use_vllm", "give `rollout:` or TRL's `use_vllm`, not both"));
        return errors;
    }
    let base = match params.get("vllm_server_base_url").and_then(Value::as_str) {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => {
            let host = params.get("vllm_server_host").and_then(Value::as_str).unwrap_or("0.0.0.0");
            let host = if host == "0.0.0.0" { "localhost" } else { host };
            let port = params.get("vllm_server_port").and_then(Value::as_u64).unwrap_or(8000);
            format!("http://{host}:{port}")
        }
    };
    let url = if base.ends_with("/v1") { base } else { format!("{base}/v1") };
    let model = match params.get("model").and_then(Value::as_str) {
        Some(m) if !m.contains("${") => m.to_string(),
        _ => {
            errors.push(
                ParamError::new("use_vllm", "the served model's name cannot be taken from an artifact reference")
                    .hint("write `rollout: { url: ..., model: NAME-AS-SERVED }` instead of use_vllm"),
            );
            return errors;
        }
    };
    let mut rollout = Map::new();
    rollout.insert("url".into(), Value::from(url));
    rollout.insert("model".into(), Value::from(model));
    if let Some(t) = params.get("vllm_server_timeout").and_then(Value::as_f64) {
        rollout.insert("timeout_s".into(), Value::from(t));
    }
    for k in
        ["use_vllm", "vllm_mode", "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout"]
    {
        params.remove(k);
    }
    params.insert("rollout".into(), Value::Object(rollout));
    errors
}

fn short(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What r1pipe does with every field of TRL's config: `(field, what happens)`,
/// sorted by field, for the docs.
pub fn table(trainer: Trainer, known: &[String]) -> Vec<(String, String)> {
    let translated = |f: &str| -> Option<&'static str> {
        Some(match (trainer, f) {
            (_, "max_steps") => "same; `-1` (TRL's default) trains `num_train_epochs`",
            (Trainer::Grpo, "scale_rewards") => "same; `true` is `group` and `false` is `none`, as in TRL",
            (_, "warmup_steps") => "same; below 1 it is a fraction of the run (transformers 5); replaces `warmup_ratio`",
            (_, "bf16") => "same: this stage computes in bf16 with f32 master weights (`false`: f32); unset: the pipeline's `dtype:`",
            (_, "seed") => "same: this stage's seed; unset: the pipeline's `seed:`",
            (_, "report_to") => "same for `tensorboard` (event files in `cache/tensorboard/PIPELINE/STAGE`, TRL's tags), `mlflow` (`MLFLOW_TRACKING_URI`) and `none`, one or a list; `wandb`: `wandb sync` of the TensorBoard files; not part of the fingerprint",
            (_, "logging_steps") => "same: a console line every N steps (and after the first and the last); the log file has every step",
            (Trainer::Grpo, "use_vllm") => "`use_vllm: true` with `vllm_mode: server` becomes `rollout: {url, model}` (a `vllm serve` you start; TRL's `trl vllm-serve` protocol is not spoken)",
            (Trainer::Grpo, "vllm_mode") => "`server` only, with `use_vllm` (see there); `colocate` is refused",
            (Trainer::Grpo, "vllm_server_base_url" | "vllm_server_host" | "vllm_server_port") => "with `use_vllm`: the `rollout:` URL (base URL, or host and port; `/v1` added)",
            (Trainer::Grpo, "vllm_server_timeout") => "with `use_vllm`: `rollout.timeout_s`",
            (Trainer::Sft, "max_length") => "same; r1pipe's earlier `max_seq_length` is still read",
            _ => return None,
        })
    };
    let mut rows: Vec<(String, String)> = trl_fields(trainer)
        .iter()
        .map(|(f, default)| {
            let what = if let Some(t) = translated(f) {
                t.to_string()
            } else if known.contains(f) {
                "same name and meaning".to_string()
            } else {
                let extra = match f.as_str() {
                    "save_strategy" | "logging_strategy" => " (`steps` too)",
                    "eval_strategy" => " (`no` and `steps` too)",
                    "optim" => " (`adamw_torch`, `adamw_torch_fused`, `adamw_hf` too)",
                    _ => "",
                };
                format!("accepted at TRL's default `{}`{extra}, refused otherwise: {}", short(default), instead(f))
            };
            (f.clone(), what)
        })
        .collect();
    rows.sort();
    rows
}

/// [`table`] as a Markdown table.
pub fn markdown(trainer: Trainer, known: &[String]) -> String {
    let mut out = format!("| TRL 1.16 `{}` field | in r1pipe |\n| --- | --- |\n", trainer.config_name());
    for (f, what) in table(trainer, known) {
        out.push_str(&format!("| `{f}` | {} |\n", what.replace('|', "\\|")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn known() -> Vec<String> {
        [
            "learning_rate",
            "max_steps",
            "scale_rewards",
            "model",
            "rollout",
            "beta",
            "logging_steps",
            "bf16",
            "max_length",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn norm(v: Value, t: Trainer) -> (Map<String, Value>, Vec<ParamError>) {
        let mut m = v.as_object().unwrap().clone();
        let e = normalize(&mut m, t, &known());
        (m, e)
    }

    #[test]
    fn trl_values_become_r1pipes_and_defaults_are_dropped() {
        let (m, e) = norm(
            json!({"max_steps": -1, "scale_rewards": false, "push_to_hub": false,
                   "save_strategy": "steps", "optim": "adamw_torch", "learning_rate": 1e-6, "fp16": false}),
            Trainer::Grpo,
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(Value::Object(m), json!({"scale_rewards": "none", "learning_rate": 1e-6}));
    }

    #[test]
    fn a_refused_field_says_what_r1pipe_does_instead() {
        let (_, e) = norm(json!({"output_dir": "out", "fp16": true, "max_steps": -3}), Trainer::Grpo);
        let by = |k: &str| e.iter().find(|x| x.path == k).unwrap_or_else(|| panic!("no error for {k}: {e:?}"));
        assert!(by("output_dir").hint.as_deref().unwrap().contains("r1pipe show STAGE.model"));
        assert!(by("fp16").hint.as_deref().unwrap().contains("bf16: true"));
        assert!(by("max_steps").hint.as_deref().unwrap().contains("-1"));
        // Keys TRL does not have either are left for the stage's unknown-key error.
        let (m, e) = norm(json!({"lerning_rate": 1.0}), Trainer::Grpo);
        assert!(e.is_empty() && m.contains_key("lerning_rate"));
    }

    #[test]
    fn use_vllm_in_server_mode_becomes_a_rollout_server() {
        let (m, e) = norm(
            json!({"model": "Qwen/Qwen2.5-0.5B-Instruct", "use_vllm": true, "vllm_mode": "server",
                   "vllm_server_host": "10.0.0.5", "vllm_server_port": 8001, "vllm_server_timeout": 240.0}),
            Trainer::Grpo,
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            m["rollout"],
            json!({"url": "http://10.0.0.5:8001/v1", "model": "Qwen/Qwen2.5-0.5B-Instruct", "timeout_s": 240.0})
        );
        assert!(!m.contains_key("use_vllm") && !m.contains_key("vllm_server_port"));
        let (_, e) = norm(json!({"model": "m/x", "use_vllm": true}), Trainer::Grpo);
        assert_eq!(e[0].path, "vllm_mode", "colocate (TRL's default) is refused: {e:?}");
    }

    #[test]
    fn sft_reads_max_seq_length_as_max_length() {
        let (m, e) = norm(json!({"max_seq_length": 512}), Trainer::Sft);
        assert!(e.is_empty());
        assert_eq!(m["max_length"], 512);
    }

    #[test]
    fn every_trl_field_has_a_row() {
        for t in [Trainer::Grpo, Trainer::Sft] {
            let rows = table(t, &known());
            assert_eq!(rows.len(), trl_fields(t).len());
            assert!(rows.iter().all(|(_, what)| !what.is_empty()));
        }
        assert!(trl_fields(Trainer::Grpo).len() > 150, "TRL's GRPOConfig with TrainingArguments");
    }
}
