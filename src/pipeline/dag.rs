//! The stage graph: edges from `${stage.output}` references and `needs`,
//! topological order, cycles named, and sub-graph selection for --only/--until.

use std::collections::{BTreeSet, HashMap};

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};

use super::spec::Pipeline;
use crate::common::diagnostic::Diagnostic;

pub struct Dag {
    pub graph: DiGraph<String, ()>,
    index: HashMap<String, NodeIndex>,
}

impl Dag {
    pub fn build(p: &Pipeline) -> Result<Dag, Diagnostic> {
        let mut graph = DiGraph::new();
        let mut index = HashMap::new();
        for s in &p.stages {
            index.insert(s.name.clone(), graph.add_node(s.name.clone()));
        }
        for s in &p.stages {
            for up in s.upstream() {
                if let Some(&from) = index.get(&up) {
                    graph.update_edge(from, index[&s.name], ());
                }
            }
        }
        let dag = Dag { graph, index };
        if let Some(cycle) = dag.find_cycle(p) {
            let first = p.stage(&cycle[0]).and_then(|s| s.line);
            let mut shown = cycle.clone();
            shown.push(cycle[0].clone());
            return Err(Diagnostic::new(&p.file, first, format!("the stages form a cycle: {}", shown.join(" → ")))
                .with_hint("a stage cannot use its own outputs, directly or through other stages; remove one reference or `needs` entry"));
        }
        Ok(dag)
    }

    /// The stages of one cycle in dependency order, if there is one.
    fn find_cycle(&self, p: &Pipeline) -> Option<Vec<String>> {
        for scc in tarjan_scc(&self.graph) {
            let self_loop = scc.len() == 1 && self.graph.contains_edge(scc[0], scc[0]);
            if scc.len() > 1 || self_loop {
                let members: BTreeSet<&String> = scc.iter().map(|&n| &self.graph[n]).collect();
                // Walk the cycle in file order from its first stage, following edges inside the component.
                let start = p.stages.iter().find(|s| members.contains(&s.name))?.name.clone();
                let mut order = vec![start.clone()];
                let mut cur = self.index[&start];
                loop {
                    let next =
                        self.graph.neighbors(cur).filter(|n| scc.contains(n)).min_by_key(|n| {
                            p.stages.iter().position(|s| s.name == self.graph[*n]).unwrap_or(usize::MAX)
                        })?;
                    if self.graph[next] == start || order.contains(&self.graph[next]) {
                        break;
                    }
                    order.push(self.graph[next].clone());
                    cur = next;
                }
                return Some(order);
            }
        }
        None
    }

    /// Stage names in an order where every stage follows all it depends on
    /// (file order among independent stages).
    pub fn order(&self, p: &Pipeline) -> Vec<String> {
        // Kahn's algorithm with file order as the tie-break, so plans read like the file.
        let pos: HashMap<&str, usize> = p.stages.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
        let mut indeg: HashMap<NodeIndex, usize> = self
            .graph
            .node_indices()
            .map(|n| (n, self.graph.neighbors_directed(n, petgraph::Incoming).count()))
            .collect();
        let mut ready: BTreeSet<(usize, NodeIndex)> =
            indeg.iter().filter(|(_, &d)| d == 0).map(|(&n, _)| (pos[self.graph[n].as_str()], n)).collect();
        let mut out = Vec::new();
        while let Some(first) = ready.iter().next().copied() {
            ready.remove(&first);
            let n = first.1;
            out.push(self.graph[n].clone());
            for m in self.graph.neighbors(n) {
                let d = indeg.get_mut(&m).expect("every node has a degree");
                *d -= 1;
                if *d == 0 {
                    ready.insert((pos[self.graph[m].as_str()], m));
                }
            }
        }
        debug_assert!(toposort(&self.graph, None).is_ok());
        out
    }

    /// `names` and every stage they depend on, transitively.
    pub fn with_ancestors(&self, names: &[String]) -> BTreeSet<String> {
        let rev = Reversed(&self.graph);
        let mut out = BTreeSet::new();
        for n in names {
            if let Some(&start) = self.index.get(n) {
                let mut dfs = Dfs::new(rev, start);
                while let Some(x) = dfs.next(rev) {
                    out.insert(self.graph[x].clone());
                }
            }
        }
        out
    }

    /// `names` and every stage that depends on them, transitively.
    pub fn with_descendants(&self, names: &[String]) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for n in names {
            if let Some(&start) = self.index.get(n) {
                let mut dfs = Dfs::new(&self.graph, start);
                while let Some(x) = dfs.next(&self.graph) {
                    out.insert(self.graph[x].clone());
                }
            }
        }
        out
    }

    /// The graph as text: each stage with what it depends on, in run order.
    pub fn render_text(&self, p: &Pipeline) -> String {
        let mut out = String::new();
        for name in self.order(p) {
            let s = p.stage(&name).expect("ordered names come from the pipeline");
            let ups = s.upstream();
            // Only what this stage writes with its parameters (no `adapter` without LoRA).
            let absent = s.kind.absent_outputs(&s.params);
            let outs: Vec<&str> =
                s.kind.outputs().iter().map(|o| o.name).filter(|n| !absent.iter().any(|(a, _)| a == n)).collect();
            out.push_str(&format!("{name} ({})  → {}\n", s.kind.name(), outs.join(", ")));
            for (i, r) in s.refs.iter().enumerate() {
                let last = i + 1 == s.refs.len() && s.needs.is_empty();
                out.push_str(&format!("  {} ${{{}}}\n", if last { "└─" } else { "├─" }, r.key()));
            }
            for (i, n) in s.needs.iter().enumerate() {
                let last = i + 1 == s.needs.len();
                out.push_str(&format!("  {} needs {n}\n", if last { "└─" } else { "├─" }));
            }
            if ups.is_empty() {
                out.push_str("  (no inputs)\n");
            }
        }
        out
    }

    pub fn render_mermaid(&self, p: &Pipeline) -> String {
        let mut out = String::from("flowchart TD\n");
        for s in &p.stages {
            out.push_str(&format!("  {}[\"{} ({})\"]\n", mermaid_id(&s.name), s.name, s.kind.name()));
        }
        for s in &p.stages {
            for r in &s.refs {
                out.push_str(&format!("  {} -->|{}| {}\n", mermaid_id(&r.stage), r.output, mermaid_id(&s.name)));
            }
            for n in &s.needs {
                out.push_str(&format!("  {} -.-> {}\n", mermaid_id(n), mermaid_id(&s.name)));
            }
        }
        out
    }

    pub fn render_dot(&self, p: &Pipeline) -> String {
        let mut out = format!("digraph \"{}\" {{\n  rankdir=TB;\n", p.name);
        for s in &p.stages {
            out.push_str(&format!("  \"{}\" [label=\"{}\\n({})\", shape=box];\n", s.name, s.name, s.kind.name()));
        }
        for s in &p.stages {
            for r in &s.refs {
                out.push_str(&format!("  \"{}\" -> \"{}\" [label=\"{}\"];\n", r.stage, s.name, r.output));
            }
            for n in &s.needs {
                out.push_str(&format!("  \"{}\" -> \"{}\" [style=dashed];\n", n, s.name));
            }
        }
        out.push_str("}\n");
        out
    }
}

/// A node id mermaid accepts, one per stage name: letters and digits stay, every
/// other character becomes `_` and its code (`p@a` → `p_40a`, `p_a` → `p_5fa`),
/// so two names never share an id.
fn mermaid_id(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_string() } else { format!("_{:x}", c as u32) }).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn mermaid_ids_of_different_names_differ() {
        assert_ne!(super::mermaid_id("p@a"), super::mermaid_id("p_a"));
        assert_eq!(super::mermaid_id("grpo"), "grpo");
    }
}
