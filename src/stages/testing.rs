//! `test.counter`: a slow, checkpointing stage that exists to test the runner
//! (interruption, resume, identical outputs). Registered only when
//! `R1PIPE_TEST_KINDS` is set.

use std::fs;
use std::time::Duration;

use anyhow::Result;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::common::Host;
use crate::common::{typed, ParamError};
use crate::data::jsonl::Appender;
use crate::pipeline::{KindInfo, OutputSpec, Project, Requirements, StageContext, StageKind};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    steps: u64,
    #[serde(default)]
    step_ms: u64,
    /// Written into the output; an optional input artifact's content is appended.
    #[serde(default)]
    text: String,
    #[serde(default)]
    input: Option<String>,
    /// Named input artifacts (a mapping, as evaluate's `models`), appended as `name: content`.
    #[serde(default)]
    inputs: std::collections::BTreeMap<String, String>,
    /// Fail (an error, not a crash) when reaching this step.
    #[serde(default)]
    fail_at: Option<u64>,
}

pub struct Counter;

const OUTPUTS: &[OutputSpec] = &[OutputSpec::file("result", "result.txt", "the text and the final count")];

impl StageKind for Counter {
    fn info(&self) -> &'static KindInfo {
        &KindInfo {
            name: "test.counter",
            version: 1,
            description: "test-only: counts to `steps`, checkpointing every step",
            outputs: OUTPUTS,
        }
    }
    fn parameters(&self) -> Value {
        json!({"steps": null, "step_ms": 0, "text": "", "input": null, "inputs": {}, "fail_at": null})
    }
    fn check(&self, params: &Value, _project: &Project) -> Result<Requirements, Vec<ParamError>> {
        typed::<Params>(params).map_err(|e| vec![e])?;
        Ok(Requirements::default())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: Params = ctx.params()?;
        let checkpoints = ctx.checkpoints();
        let mut count = match checkpoints.latest() {
            Some((_, dir)) => fs::read_to_string(dir.join("count"))?.trim().parse::<u64>()?,
            None => 0,
        };
        // Every executed step is logged, so a test can see that resumed work is not redone.
        let mut log = Appender::open(&ctx.work_dir.join("steps.jsonl"))?;
        let bar = ctx.progress(p.steps, "steps");
        bar.set_position(count);
        while count < p.steps {
            ctx.cancel.check()?;
            if p.fail_at == Some(count + 1) {
                anyhow::bail!("failing at step {} as asked (fail_at)", count + 1);
            }
            std::thread::sleep(Duration::from_millis(p.step_ms));
            count += 1;
            log.append(&json!({ "step": count, "pid": std::process::id() }))?;
            checkpoints.save(count, 2, |d| Ok(fs::write(d.join("count"), count.to_string())?))?;
            bar.set_position(count);
        }
        bar.finish_and_clear();
        let mut text = format!("{}\ncount={count}\n", p.text);
        if let Some(input) = &p.input {
            text.push_str(&fs::read_to_string(input)?);
        }
        for (name, input) in &p.inputs {
            text.push_str(&format!("{name}: {}", fs::read_to_string(input)?));
        }
        fs::write(ctx.output_path("result"), text)?;
        let executed = fs::read_to_string(ctx.work_dir.join("steps.jsonl"))?.lines().count();
        ctx.set_metrics(json!({ "count": count, "steps_executed_in_work_dir": executed }));
        Ok(())
    }
}
