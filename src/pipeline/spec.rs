//! Reading a pipeline file: YAML → presets merged → `-S` overrides → `${vars.x}`
//! substituted → every stage's parameters checked by its kind. All problems are
//! collected and reported with file, line and hint before anything runs. The
//! graph (cycles) is checked next, on the parsed pipeline (`dag.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::executor::ExecutorConfig;
use super::kind::{Project, Registry, Requirements, StageKind};
use super::resources::Resources;
use crate::common::builtin::{self, BuiltinKind};
use crate::common::diagnostic::{nearest, suggest, Diagnostic, Diagnostics};
use crate::common::fsutil::read_text_capped;
use crate::common::names::identifier_problem;
use crate::common::params::{lookup, yaml_to_json};
use crate::common::yaml_pos::Positions;

const TOP_KEYS: &[&str] = &["name", "seed", "device", "dtype", "vars", "stages", "executor", "remote"];
const STAGE_KEYS: &[&str] = &["kind", "with", "use", "needs", "matrix", "resources"];

/// A reference `${stage.output}` found in a stage's parameters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ArtifactRef {
    pub stage: String,
    pub output: String,
}

impl ArtifactRef {
    pub fn key(&self) -> String {
        format!("{}.{}", self.stage, self.output)
    }
}

pub struct Stage {
    pub name: String,
    pub kind: Arc<dyn StageKind>,
    /// Fully resolved parameters; artifact references stay as `${stage.output}` text.
    pub params: Value,
    pub refs: Vec<ArtifactRef>,
    pub needs: Vec<String>,
    pub requirements: Requirements,
    /// What the stage's job asks of a cluster (`resources:`); not part of its fingerprint.
    pub resources: Resources,
    pub line: Option<usize>,
}

impl Stage {
    /// Stages this one depends on (by data or by `needs`), without duplicates.
    pub fn upstream(&self) -> Vec<String> {
        let mut set: BTreeSet<String> = self.refs.iter().map(|r| r.stage.clone()).collect();
        set.extend(self.needs.iter().cloned());
        set.into_iter().collect()
    }
}

pub struct Pipeline {
    pub file: PathBuf,
    pub project: Project,
    pub name: String,
    pub seed: u64,
    pub device: String,
    pub dtype: String,
    /// `executor: {kind: …}`: where stages run (`--executor` overrides the kind).
    pub executor: ExecutorConfig,
    /// `remote: URL` or `{url, endpoint}`: a remote cache (`--remote` overrides it).
    pub remote: Option<super::store::remote::RemoteSpec>,
    /// In file order.
    pub stages: Vec<Stage>,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// A `-S stage.key=value` (or `-S vars.key=value`) override.
#[derive(Debug, Clone)]
pub struct Override {
    pub target: String,
    pub path: Vec<String>,
    pub value: serde_yaml::Value,
    pub text: String,
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (lhs, rhs) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected STAGE.KEY=VALUE"))?;
        let mut parts: Vec<String> = lhs.trim().split('.').map(str::to_string).collect();
        if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(format!("`{s}`: expected STAGE.KEY=VALUE, e.g. grpo.learning_rate=1e-6"));
        }
        let target = parts.remove(0);
        // A value is read as YAML so that numbers, booleans and lists keep their types.
        let value = serde_yaml::from_str(rhs).unwrap_or_else(|_| serde_yaml::Value::String(rhs.to_string()));
        Ok(Override { target, path: parts, value, text: s.to_string() })
    }
}

/// A pipeline file larger than this is refused before it is parsed.
const MAX_PIPELINE_BYTES: u64 = 4 << 20;

/// A preset or reward set larger than this is refused before it is parsed.
pub const MAX_PRESET_BYTES: u64 = 1 << 20;

/// Load and validate a pipeline.
pub fn load(file: &Path, overrides: &[Override], registry: &Registry) -> Result<Pipeline, Diagnostics> {
    let text = read_text_capped(file, MAX_PIPELINE_BYTES).map_err(|e| {
        Diagnostic::new(file, None, format!("cannot read pipeline file: {e}"))
            .with_hint("check the path; pipelines usually live in pipelines/")
    })?;
    let project = Project::of_file(file);
    Loader {
        file: file.to_path_buf(),
        positions: Positions::parse(&text),
        diags: Diagnostics::default(),
        project,
        stage_overrides: Vec::new(),
    }
    .load(&text, overrides, registry)
}

struct Loader {
    file: PathBuf,
    positions: Positions,
    diags: Diagnostics,
    project: Project,
    /// The `-S` overrides of the stage being read: (key under `with`, as typed), so
    /// that a bad value set on the command line is reported as coming from there.
    stage_overrides: Vec<(String, String)>,
}

impl Loader {
    fn err(&mut self, path: &str, message: impl Into<String>, hint: Option<String>) {
        // A matrix member's keys are where its matrix stage wrote them.
        let line = self.positions.line(path).or_else(|| {
            let tail = path.strip_prefix("stages.")?;
            let (stage, rest) = tail.split_once('.').map_or((tail, None), |(s, r)| (s, Some(r)));
            let base = super::matrix::base_name(stage);
            let moved = match rest {
                Some(r) => format!("stages.{base}.{r}"),
                None => format!("stages.{base}"),
            };
            (base != stage).then(|| self.positions.line(&moved))?
        });
        self.diags.push(Diagnostic::new(&self.file, line, message).with_optional_hint(hint));
    }

    fn load(mut self, text: &str, overrides: &[Override], registry: &Registry) -> Result<Pipeline, Diagnostics> {
        if let Some(d) = crate::common::yaml_pos::nesting_problem(&self.file, text) {
            return Err(d.into());
        }
        let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| yaml_syntax(&self.file, text, &e))?;
        let serde_yaml::Value::Mapping(top) = doc else {
            return Err(Diagnostic::new(&self.file, Some(1), "a pipeline file must be a mapping with `stages:`")
                .with_hint("see pipelines/quickstart.yaml for the shape")
                .into());
        };

        for key in top.keys() {
            let k = key.as_str().unwrap_or("?");
            if !TOP_KEYS.contains(&k) {
                self.err(k, format!("unknown top-level key `{k}`"), Some(suggest(k, TOP_KEYS, "keys")));
            }
        }
        let get = |k: &str| top.get(serde_yaml::Value::String(k.into()));
        let name = match get("name") {
            Some(v) => v.as_str().map(str::to_string).unwrap_or_else(|| {
                self.err("name", "`name` must be a string", None);
                String::new()
            }),
            None => self.file.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default(),
        };
        if let Some(problem) = identifier_problem(&name) {
            let from = if get("name").is_some() { "" } else { " (taken from the file name)" };
            self.err(
                "name",
                format!("the pipeline's name{from}: {problem}"),
                Some("set `name:` to an identifier such as `gsm8k-grpo`".into()),
            );
        }
        let seed = match get("seed") {
            None => 42,
            Some(v) => v.as_u64().unwrap_or_else(|| {
                self.err("seed", "`seed` must be a non-negative integer", None);
                0
            }),
        };
        let device = self.scalar_string(get("device"), "device", "auto");
        if let Some((message, hint)) = registry.devices().check_device(&device) {
            self.err("device", message, Some(hint));
        }
        let dtype = self.scalar_string(get("dtype"), "dtype", "auto");
        if let Some((message, hint)) = registry.devices().check_dtype(&dtype) {
            self.err("dtype", message, Some(hint));
        }
        let executor = self.executor(get("executor"));
        let remote = self.remote(get("remote"));

        let mut vars = match get("vars") {
            None => serde_json::Map::new(),
            Some(v) => match yaml_to_json(v, "vars") {
                Ok(Value::Object(m)) => {
                    // vars are values, resolved into stages; a reference inside one would be
                    // passed on as literal text.
                    for (k, v) in &m {
                        if v.to_string().contains("${") {
                            self.err(
                                &format!("vars.{k}"),
                                format!("`vars.{k}` holds a `${{…}}` reference, which vars cannot resolve"),
                                Some("write the reference where the value is used, under a stage's `with:`".into()),
                            );
                        }
                    }
                    m
                }
                Ok(Value::Null) => serde_json::Map::new(),
                Ok(_) => {
                    self.err("vars", "`vars` must be a mapping of names to values", None);
                    serde_json::Map::new()
                }
                Err(e) => {
                    self.err(&e.path, e.message, None);
                    serde_json::Map::new()
                }
            },
        };

        let stages_yaml = match get("stages") {
            Some(serde_yaml::Value::Mapping(m)) if !m.is_empty() => m.clone(),
            Some(_) => {
                self.err("stages", "`stages` must be a non-empty mapping of stage names to stages", None);
                serde_yaml::Mapping::new()
            }
            None => {
                self.diags.push(
                    Diagnostic::new(&self.file, None, "the pipeline has no `stages:`")
                        .with_hint("add `stages:` with at least one stage"),
                );
                serde_yaml::Mapping::new()
            }
        };
        let base_names: Vec<String> = stages_yaml.keys().map(|k| k.as_str().unwrap_or("?").to_string()).collect();
        for name in &base_names {
            let path = format!("stages.{name}");
            if let Some(problem) = identifier_problem(name) {
                self.err(&path, format!("stage name: {problem}"), Some("name stages like `sft` or `eval_base`".into()));
            } else if name == "vars" {
                self.err(&path, "`vars` cannot name a stage: `${vars.…}` refers to the pipeline's variables", None);
            }
        }
        // Matrix stages become their members (`grpo@r1`, …) before anything reads a stage.
        let (expanded, matrix_problems) = super::matrix::expand(&stages_yaml);
        for (path, msg, hint) in matrix_problems {
            self.err(&path, msg, hint);
        }
        let stages_yaml = expanded.stages;
        let stage_names: Vec<String> = stages_yaml.keys().map(|k| k.as_str().unwrap_or("?").to_string()).collect();

        // -S overrides: vars first (they feed every stage), stage keys after presets are merged.
        let mut stage_overrides: BTreeMap<String, Vec<&Override>> = BTreeMap::new();
        for o in overrides {
            if o.target == "vars" {
                match yaml_to_json(&o.value, "") {
                    Ok(v) => set_path(&mut vars, &o.path, v),
                    Err(e) => self.override_err(o, &e.message, None),
                }
            } else if stage_names.contains(&o.target) {
                stage_overrides.entry(o.target.clone()).or_default().push(o);
            } else if let Some(members) = expanded.members.get(&o.target) {
                // An override of a matrix stage applies to every member.
                for m in members {
                    stage_overrides.entry(m.clone()).or_default().push(o);
                }
            } else {
                let names: Vec<&str> = stage_names.iter().map(String::as_str).collect();
                self.override_err(o, &format!("no stage `{}`", o.target), Some(suggest(&o.target, &names, "stages")));
            }
        }
        let vars = Value::Object(vars);

        let mut stages = Vec::new();
        for (name_v, body) in &stages_yaml {
            let name = name_v.as_str().unwrap_or("?").to_string();
            let ovs = stage_overrides.remove(&name).unwrap_or_default();
            if let Some(stage) = self.stage(&name, body, &ovs, &vars, &stage_names, registry) {
                stages.push(stage);
            }
        }

        // Members of one matrix stage that came out identical (a `-S` on the swept key,
        // or a key the body never uses) would be one stage run twice into one work folder.
        for (base, members) in &expanded.members {
            let mut seen: Vec<(&Value, &str)> = Vec::new();
            for s in stages.iter().filter(|s| members.contains(&s.name)) {
                match seen.iter().find(|(p, _)| **p == s.params) {
                    Some((_, first)) => self.err(
                        &format!("stages.{base}.matrix"),
                        format!("the members `{first}` and `{}` of `{base}` are identical", s.name),
                        Some(format!(
                            "a `-S {base}.KEY=…` replaces the value the matrix sweeps, or the body never uses                              `${{item.KEY}}`; override one member (`-S {first}.KEY=…`) or drop the override"
                        )),
                    ),
                    None => seen.push((&s.params, &s.name)),
                }
            }
        }

        // References to outputs: the stage must exist and declare the output.
        let kinds: BTreeMap<String, (Arc<dyn StageKind>, &Value)> =
            stages.iter().map(|s| (s.name.clone(), (s.kind.clone(), &s.params))).collect();
        for s in &stages {
            for r in &s.refs {
                let base = format!("stages.{}", s.name);
                match kinds.get(&r.stage) {
                    None if !stage_names.contains(&r.stage) => {
                        let names: Vec<&str> = stage_names.iter().map(String::as_str).collect();
                        self.err(
                            &base,
                            format!(
                                "stage `{}` refers to `${{{}}}`, but there is no stage `{}`",
                                s.name,
                                r.key(),
                                r.stage
                            ),
                            Some(suggest(&r.stage, &names, "stages")),
                        );
                    }
                    None => {} // that stage had its own errors
                    Some((k, params)) => {
                        let outs: Vec<&str> = k.outputs().iter().map(|o| o.name).collect();
                        let absent = k.absent_outputs(params);
                        if let Some((_, why)) = absent.iter().find(|(o, _)| *o == r.output) {
                            self.err(
                                &base,
                                format!(
                                    "stage `{}` refers to `${{{}}}`, but `{}` writes no `{}` here: {why}",
                                    s.name,
                                    r.key(),
                                    r.stage,
                                    r.output
                                ),
                                None,
                            );
                        } else if !outs.contains(&r.output.as_str()) {
                            self.err(
                                &base,
                                format!(
                                    "stage `{}` refers to `${{{}}}`, but a `{}` stage has no output `{}`",
                                    s.name,
                                    r.key(),
                                    k.name(),
                                    r.output
                                ),
                                Some(suggest(&r.output, &outs, "outputs")),
                            );
                        }
                    }
                }
            }
        }

        let pipeline = Pipeline {
            file: self.file.clone(),
            project: self.project.clone(),
            name,
            seed,
            device,
            dtype,
            executor,
            remote,
            stages,
        };
        self.diags.into_result(pipeline)
    }

    fn override_err(&mut self, o: &Override, msg: &str, hint: Option<String>) {
        self.diags.push(
            Diagnostic::new(&self.file, None, format!("override `-S {}`: {msg}", o.text)).with_optional_hint(hint),
        );
    }

    /// `executor: {kind: …, settings}`; problems are reported and the run stays local.
    fn executor(&mut self, v: Option<&serde_yaml::Value>) -> ExecutorConfig {
        let Some(v) = v else { return ExecutorConfig::default() };
        let Ok(v) = yaml_to_json(v, "executor").map_err(|e| self.err(&e.path, e.message, None)) else {
            return ExecutorConfig::default();
        };
        ExecutorConfig::parse(&v).unwrap_or_else(|problems| {
            for (path, message, hint) in problems {
                let path = if path.is_empty() { "executor".to_string() } else { format!("executor.{path}") };
                self.err(&path, format!("{path}: {message}"), hint);
            }
            ExecutorConfig::default()
        })
    }

    /// `remote: URL` or `remote: {url, endpoint}`.
    fn remote(&mut self, v: Option<&serde_yaml::Value>) -> Option<super::store::remote::RemoteSpec> {
        let v = yaml_to_json(v?, "remote").map_err(|e| self.err(&e.path, e.message, None)).ok()?;
        let v = match v {
            Value::String(url) => serde_json::json!({ "url": url }),
            other => other,
        };
        match crate::common::params::typed::<super::store::remote::RemoteSpec>(&v) {
            Ok(spec) if spec.url.trim().is_empty() => {
                self.err(
                    "remote",
                    "`remote` is an empty URL",
                    Some("s3://BUCKET/PREFIX, https://HOST/PATH or file:///PATH".into()),
                );
                None
            }
            Ok(spec) => Some(spec),
            Err(e) => {
                let path = if e.path.is_empty() { "remote".to_string() } else { format!("remote.{}", e.path) };
                self.err(&path, format!("{path}: {}", e.message), Some("a URL, or {url, endpoint}".into()));
                None
            }
        }
    }

    fn scalar_string(&mut self, v: Option<&serde_yaml::Value>, key: &str, default: &str) -> String {
        match v {
            None => default.to_string(),
            Some(serde_yaml::Value::String(s)) => s.clone(),
            Some(_) => {
                self.err(key, format!("`{key}` must be a string"), None);
                default.to_string()
            }
        }
    }

    fn stage(
        &mut self,
        name: &str,
        body: &serde_yaml::Value,
        overrides: &[&Override],
        vars: &Value,
        stage_names: &[String],
        registry: &Registry,
    ) -> Option<Stage> {
        let base = format!("stages.{name}");
        let line = self.positions.line(&base);
        let serde_yaml::Value::Mapping(m) = body else {
            self.err(&base, format!("stage `{name}` must be a mapping with `kind:`"), None);
            return None;
        };
        for key in m.keys() {
            let k = key.as_str().unwrap_or("?");
            if !STAGE_KEYS.contains(&k) {
                self.err(
                    &format!("{base}.{k}"),
                    format!("stage `{name}`: unknown key `{k}`"),
                    Some(suggest(k, STAGE_KEYS, "stage keys")),
                );
            }
        }
        let get = |k: &str| m.get(serde_yaml::Value::String(k.into()));
        let kind_name = match get("kind").and_then(|v| v.as_str()) {
            Some(k) => k.to_string(),
            None => {
                self.err(
                    &base,
                    format!("stage `{name}` has no `kind:`"),
                    Some(format!("valid kinds: {}", registry.names().join(", "))),
                );
                return None;
            }
        };
        let Some(kind) = registry.get(&kind_name) else {
            self.err(
                &format!("{base}.kind"),
                format!("stage `{name}`: unknown kind `{kind_name}`"),
                Some(suggest(&kind_name, &registry.names(), "kinds")),
            );
            return None;
        };

        // Preset (`use:`) first, `with:` over it, then -S overrides.
        let mut params = serde_json::Map::new();
        let mut preset_file: Option<(PathBuf, Positions)> = None;
        if let Some(u) = get("use") {
            match u.as_str() {
                Some(rel) => {
                    if let Some((path, positions, Value::Object(preset))) =
                        self.read_preset(&format!("{base}.use"), rel)
                    {
                        deep_merge(&mut params, preset);
                        preset_file = Some((path, positions));
                    }
                }
                None => self.err(
                    &format!("{base}.use"),
                    "`use` must name a preset: a built-in (`grpo`, `sft`) or a YAML file",
                    None,
                ),
            }
        }
        // Set when `with` could not be read: the kind's own checks would then report
        // every parameter as missing, which is not the problem.
        let mut with_unreadable = false;
        match get("with") {
            None | Some(serde_yaml::Value::Null) => {}
            Some(w @ serde_yaml::Value::Mapping(_)) => match yaml_to_json(w, "") {
                Ok(Value::Object(with)) => deep_merge(&mut params, with),
                Ok(_) => unreachable!("a mapping converts to an object"),
                Err(e) => {
                    with_unreadable = true;
                    self.err(&format!("{base}.with.{}", e.path), format!("stage `{name}`: {}", e.message), e.hint)
                }
            },
            Some(_) => self.err(
                &format!("{base}.with"),
                format!("stage `{name}`: `with` must be a mapping of parameters"),
                None,
            ),
        }
        self.stage_overrides = overrides.iter().map(|o| (o.path.join("."), o.text.clone())).collect();
        for o in overrides {
            match yaml_to_json(&o.value, "") {
                Ok(v) => set_path(&mut params, &o.path, v),
                Err(e) => self.override_err(o, &e.message, None),
            }
        }
        let mut params = Value::Object(params);

        let mut refs = Vec::new();
        let mut problems = Vec::new();
        substitute(&mut params, "", vars, stage_names, &mut refs, &mut problems);
        for (path, msg, hint) in problems {
            self.err(&format!("{base}.with.{path}"), format!("stage `{name}`: {msg}"), hint);
        }
        refs.sort();
        refs.dedup();
        // Other spellings (TRL's, for the training kinds) become the kind's own, once.
        if let Value::Object(m) = &mut params {
            for e in kind.normalize(m) {
                self.param_error(name, &kind_name, &base, &e, preset_file.as_ref());
            }
        }

        let mut needs = Vec::new();
        match get("needs") {
            None => {}
            Some(serde_yaml::Value::Sequence(seq)) => {
                for (i, n) in seq.iter().enumerate() {
                    match n.as_str() {
                        Some(n) if stage_names.iter().any(|s| s == n) => needs.push(n.to_string()),
                        Some(n) => {
                            let names: Vec<&str> = stage_names.iter().map(String::as_str).collect();
                            self.err(
                                &format!("{base}.needs.{i}"),
                                format!("stage `{name}` needs `{n}`, but there is no such stage"),
                                Some(suggest(n, &names, "stages")),
                            );
                        }
                        None => self.err(&format!("{base}.needs.{i}"), "`needs` entries must be stage names", None),
                    }
                }
            }
            Some(_) => self.err(&format!("{base}.needs"), "`needs` must be a list of stage names", None),
        }

        let checked = if with_unreadable { Ok(Requirements::default()) } else { kind.check(&params, &self.project) };
        let requirements = match checked {
            Ok(r) => r,
            Err(errors) => {
                for e in errors {
                    self.param_error(name, &kind_name, &base, &e, preset_file.as_ref());
                }
                Requirements::default()
            }
        };
        for (param, path) in &requirements.local_paths {
            // A device or a pipe (/dev/zero, a FIFO) has no content to fingerprint: named
            // now, before any stage runs, rather than when this stage's turn comes.
            let problem = match fs::metadata(path) {
                Err(_) => Some("which does not exist"),
                Ok(m) if !(m.is_file() || m.is_dir()) => Some("which is not a regular file or folder"),
                Ok(_) => None,
            };
            if let Some(problem) = problem {
                let key = param.split(':').next().unwrap_or(param);
                self.err(
                    &format!("{base}.with.{key}"),
                    format!("stage `{name}`: `{param}` names {}, {problem}", path.display()),
                    Some(format!("relative paths are read from the project root, {}", self.project.root.display())),
                );
            }
        }
        let resources = match get("resources") {
            None => Resources::default(),
            Some(r) => match yaml_to_json(r, "").map(|v| crate::common::params::typed::<Resources>(&v)) {
                Ok(Ok(r)) => {
                    for (key, msg) in r.problems() {
                        self.err(
                            &format!("{base}.resources.{key}"),
                            format!("stage `{name}`: resources.{key}: {msg}"),
                            None,
                        );
                    }
                    r
                }
                Ok(Err(e)) | Err(e) => {
                    self.err(&format!("{base}.resources"), format!("stage `{name}`: resources: {}", e.message), e.hint);
                    Resources::default()
                }
            },
        };
        Some(Stage { name: name.to_string(), kind, params, refs, needs, requirements, resources, line })
    }

    /// A kind's parameter error, placed in the pipeline file or, for a key that
    /// only the preset sets, in the preset file.
    fn param_error(
        &mut self,
        stage: &str,
        kind: &str,
        base: &str,
        e: &crate::common::params::ParamError,
        preset: Option<&(PathBuf, Positions)>,
    ) {
        let full = if e.path.is_empty() { format!("{base}.with") } else { format!("{base}.with.{}", e.path) };
        let msg = format!("stage `{stage}` ({kind}): {e}");
        let from_command_line = self
            .stage_overrides
            .iter()
            .find(|(key, _)| !e.path.is_empty() && (e.path == *key || e.path.starts_with(&format!("{key}."))));
        if let Some((_, text)) = from_command_line {
            let text = text.clone();
            self.diags.push(
                Diagnostic::new(&self.file, None, format!("command line `-S {text}`: {msg}"))
                    .with_optional_hint(e.hint.clone()),
            );
            return;
        }
        let in_preset = preset
            .filter(|_| self.positions.exact(&full).is_none())
            .and_then(|(file, pos)| Some((file, pos.exact(&e.path)?)));
        match in_preset {
            Some((file, line)) => {
                self.diags.push(Diagnostic::new(file, Some(line), msg).with_optional_hint(e.hint.clone()))
            }
            None => self.err(&full, msg, e.hint.clone()),
        }
    }

    fn read_preset(&mut self, at: &str, rel: &str) -> Option<(PathBuf, Positions, Value)> {
        let (path, text) = if builtin::is_name(rel) {
            // A built-in: its text is compiled in; messages name the repository file it came from.
            let Some(b) = builtin::find(BuiltinKind::Preset, rel) else {
                let names = builtin::names(BuiltinKind::Preset);
                self.err(
                    at,
                    format!("no built-in preset `{rel}`"),
                    Some(format!(
                        "{}; or give a YAML file's path (`use: my-presets/{rel}.yaml`); `r1pipe presets` lists them",
                        suggest(rel, &names, "built-in presets")
                    )),
                );
                return None;
            };
            (PathBuf::from(format!("<built-in {}>", b.source)), b.text.to_string())
        } else {
            let path = self.project.root.join(rel);
            if !matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                self.err(
                    at,
                    format!("a preset is a built-in name or a YAML file (.yaml or .yml), not {}", path.display()),
                    Some("e.g. `use: grpo` (built in) or `use: my-presets/grpo.yaml`".into()),
                );
                return None;
            }
            match read_text_capped(&path, MAX_PRESET_BYTES) {
                Ok(t) => (path, t),
                Err(e) => {
                    self.err(
                        at,
                        format!("cannot read preset {}: {e}", path.display()),
                        Some(format!(
                            "preset paths are relative to the project root, {}; the built-in presets are named without a path (`use: grpo`)",
                            self.project.root.display()
                        )),
                    );
                    return None;
                }
            }
        };
        if let Some(d) = crate::common::yaml_pos::nesting_problem(&path, &text) {
            self.diags.push(d);
            return None;
        }
        let doc: serde_yaml::Value = match serde_yaml::from_str(&text) {
            Ok(d) => d,
            Err(e) => {
                self.diags.push(yaml_syntax(&path, &text, &e));
                return None;
            }
        };
        match yaml_to_json(&doc, "") {
            Ok(Value::Object(m)) => {
                // Parameter names are identifiers. A file whose keys are not (another format
                // that happens to parse as YAML, a password file) is not echoed back key by key.
                let positions = Positions::parse(&text);
                if let Some(bad) = m.keys().find(|k| !is_parameter_name(k)) {
                    let line = positions.exact(bad);
                    self.diags.push(
                        Diagnostic::new(&path, line, "this is not a preset: a key here is not a parameter name")
                            .with_hint("a preset is a YAML mapping of parameter names (`learning_rate: 1.0e-6`)"),
                    );
                    return None;
                }
                Some((path, positions, Value::Object(m)))
            }
            Ok(_) => {
                self.diags.push(Diagnostic::new(&path, Some(1), "a preset must be a mapping of parameters"));
                None
            }
            Err(e) => {
                self.diags.push(Diagnostic::new(&path, None, e.message));
                None
            }
        }
    }
}

/// A parameter's name as kinds write them: lowercase letters, digits and `_`.
fn is_parameter_name(k: &str) -> bool {
    !k.is_empty() && k.len() <= 64 && k.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn yaml_syntax(file: &Path, text: &str, e: &serde_yaml::Error) -> Diagnostic {
    let line = e.location().map(|l| l.line());
    // `with: { data: ${b.train} }`: the `{` of `${` inside a flow mapping is YAML syntax.
    let has_reference = line.and_then(|l| text.lines().nth(l.saturating_sub(1))).is_some_and(|l| l.contains("${"));
    let hint = if has_reference {
        "a `${…}` inside `{ … }` or `[ … ]` must be quoted (`data: \"${b.train}\"`), or write the mapping in block style (one `key: value` per line)"
    } else {
        "check indentation and that every `key: value` has a space after the colon"
    };
    Diagnostic::new(file, line, format!("YAML syntax error: {}", crate::common::params::yaml_error_text(e)))
        .with_hint(hint)
}

/// Merge `over` into `base`: mappings merge key by key, anything else replaces.
pub fn deep_merge(base: &mut serde_json::Map<String, Value>, over: serde_json::Map<String, Value>) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Object(b)), Value::Object(o)) => deep_merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(map: &mut serde_json::Map<String, Value>, path: &[String], value: Value) {
    let (last, init) = path.split_last().expect("override paths have at least one key");
    let mut cur = map;
    for seg in init {
        let entry = cur.entry(seg.clone()).or_insert_with(|| Value::Object(Default::default()));
        if !entry.is_object() {
            *entry = Value::Object(Default::default());
        }
        cur = entry.as_object_mut().expect("just made an object");
    }
    cur.insert(last.clone(), value);
}

type Problem = (String, String, Option<String>);

/// Replace `${vars.x}` by its value (keeping its type when it is the whole string),
/// collect `${stage.output}` references (kept as text until run time), and unescape `$${`.
fn substitute(
    v: &mut Value,
    path: &str,
    vars: &Value,
    stages: &[String],
    refs: &mut Vec<ArtifactRef>,
    problems: &mut Vec<Problem>,
) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                substitute(x, &p, vars, stages, refs, problems);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter_mut().enumerate() {
                substitute(x, &format!("{path}.{i}"), vars, stages, refs, problems);
            }
        }
        Value::String(s) if s.contains("${") => {
            if let Some(new) = interpolate(s, path, vars, stages, refs, problems) {
                *v = new;
            }
        }
        _ => {}
    }
}

fn interpolate(
    s: &str,
    path: &str,
    vars: &Value,
    stages: &[String],
    refs: &mut Vec<ArtifactRef>,
    problems: &mut Vec<Problem>,
) -> Option<Value> {
    let mut out = String::new();
    let mut rest = s;
    let mut whole_var: Option<Value> = None;
    while let Some(i) = rest.find("${") {
        if i > 0 && rest[..i].ends_with('$') {
            // `$${x}` is a literal `${x}`.
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let Some(end) = rest[i..].find('}') else {
            problems.push((
                path.into(),
                format!("unclosed `${{` in `{s}`"),
                Some("write `${stage.output}` or `${vars.name}`".into()),
            ));
            return None;
        };
        let expr = rest[i + 2..i + end].trim();
        let is_whole = i == 0 && i + end + 1 == rest.len() && out.is_empty();
        if let Some(var) = expr.strip_prefix("vars.") {
            match lookup(vars, var) {
                Some(val) if is_whole => whole_var = Some(val.clone()),
                Some(Value::String(t)) => out.push_str(t),
                Some(val) => out.push_str(&val.to_string()),
                None => {
                    let names: Vec<&str> =
                        vars.as_object().map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default();
                    let hint = match nearest(var, names.iter().copied()) {
                        Some(n) => format!("did you mean `${{vars.{n}}}`?"),
                        None => format!("defined vars: {}", crate::common::diagnostic::join_ticked(&names)),
                    };
                    problems.push((path.into(), format!("`${{{expr}}}` is not defined"), Some(hint)));
                }
            }
        } else if let Some((stage, output)) = expr.split_once('.') {
            refs.push(ArtifactRef { stage: stage.to_string(), output: output.to_string() });
            out.push_str(&format!("${{{stage}.{output}}}"));
        } else {
            let names: Vec<&str> = stages.iter().map(String::as_str).collect();
            problems.push((
                path.into(),
                format!("`${{{expr}}}` is neither `${{vars.NAME}}` nor `${{STAGE.OUTPUT}}`"),
                Some(suggest(expr, &names, "stages")),
            ));
        }
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Some(whole_var.unwrap_or(Value::String(out)))
}
