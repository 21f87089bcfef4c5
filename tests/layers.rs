//! The layer rules of lib.rs's `# Layout`, checked on the source: no import cycle between
//! files or top-level modules, and no module importing one in a layer above it (nor tonic
//! below the edge). Reads `crate::a::b` and `super::` paths as shared/tools/cycles.py does;
//! test-only code after a column-0 `#[cfg(test)]` is skipped.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// Layer of each top-level module: imports may only go to a lower number.
fn layer(top: &str) -> Option<u32> {
    Some(match top {
        "base" | "metrics" | "proto" => 0,
        "model" => 1,
        "engine" => 2,
        "batch" => 3,
        "config" => 4,
        "policy" | "pipeline" => 5,
        "service" => 6,
        "server" | "eval" | "gateway" => 7,
        // gpu-check reads rows with eval's reader.
        "tools" => 8,
        _ => return None,
    })
}

fn collect(dir: &Path, root: &Path, out: &mut BTreeMap<Module, String>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let p = entry.expect("dir entry").path();
        if p.is_dir() {
            collect(&p, root, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let rel = p.strip_prefix(root).expect("under src").with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.first().is_some_and(|f| f == "bin") {
                continue;
            }
            if parts
                .last()
                .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
            {
                parts.pop();
            }
            let text = std::fs::read_to_string(&p).expect("read file");
            out.insert(parts, text);
        }
    }
}

/// Non-test code without line comments.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        let l = line.find("//").map_or(line, |i| &line[..i]);
        out.push_str(l);
        out.push('\n');
    }
    out
}

fn ident_run(s: &str) -> Vec<String> {
    // `::a::b::{c, d}` after the keyword: the segments, then the group's first-level items.
    let mut segs = Vec::new();
    let mut rest = s;
    while let Some(r) = rest.strip_prefix("::") {
        let n = r
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(r.len());
        if n == 0 {
            break;
        }
        segs.push(r[..n].to_string());
        rest = &r[n..];
    }
    segs
}

fn group_items(s: &str) -> Vec<String> {
    // `s` starts right after `crate::x`; if `::{` follows, the group's first-level names.
    let Some(r) = s.strip_prefix("::{") else {
        return Vec::new();
    };
    let end = r.find('}').unwrap_or(r.len());
    r[..end]
        .split(',')
        .filter_map(|i| {
            let i = i.trim().split("::").next()?.trim();
            (!i.is_empty() && i != "self").then(|| i.to_string())
        })
        .collect()
}

fn resolve(files: &BTreeMap<Module, String>, path: &[String]) -> Option<Module> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| files.contains_key(p))
}

fn edges(files: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut out: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, text) in files {
        let text = code(text);
        for kw in ["crate", "super"] {
            let mut at = 0;
            while let Some(i) = text[at..].find(kw) {
                let start = at + i;
                at = start + kw.len();
                let before = text[..start].chars().last();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let segs = ident_run(&text[at..]);
                if segs.is_empty() {
                    continue;
                }
                let base: Module = if kw == "crate" {
                    Vec::new()
                } else {
                    m[..m.len().saturating_sub(1)].to_vec()
                };
                let mut targets = vec![[base.clone(), segs.clone()].concat()];
                if kw == "crate" && segs.len() == 1 {
                    let after = &text[at + 2 + segs[0].len()..];
                    for item in group_items(after) {
                        targets.push(vec![segs[0].clone(), item]);
                    }
                }
                for t in targets {
                    if let Some(t) = resolve(files, &t) {
                        if &t != m {
                            out.entry(m.clone()).or_default().insert(t);
                        }
                    }
                }
            }
        }
    }
    out
}

/// Strongly connected components with more than one node (Tarjan).
fn cycles<N: Ord + Clone>(nodes: &[N], adj: &BTreeMap<N, BTreeSet<N>>) -> Vec<Vec<N>> {
    struct St<N> {
        index: BTreeMap<N, usize>,
        low: BTreeMap<N, usize>,
        stack: Vec<N>,
        on: BTreeSet<N>,
        out: Vec<Vec<N>>,
        next: usize,
    }
    fn strong<N: Ord + Clone>(v: &N, adj: &BTreeMap<N, BTreeSet<N>>, s: &mut St<N>) {
        s.index.insert(v.clone(), s.next);
        s.low.insert(v.clone(), s.next);
        s.next += 1;
        s.stack.push(v.clone());
        s.on.insert(v.clone());
        for w in adj.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                strong(w, adj, s);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(&w);
                let done = &w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                s.out.push(comp);
            }
        }
    }
    let mut s = St {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
        next: 0,
    };
    for v in nodes {
        if !s.index.contains_key(v) {
            strong(v, adj, &mut s);
        }
    }
    s.out
}

fn source() -> (BTreeMap<Module, String>, BTreeMap<Module, BTreeSet<Module>>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    collect(&root, &root, &mut files);
    let e = edges(&files);
    (files, e)
}

#[test]
fn no_import_cycles_between_files_or_modules() {
    let (files, e) = source();
    assert!(files.len() > 40, "found only {} source files", files.len());
    let nodes: Vec<Module> = files.keys().cloned().collect();
    let fc = cycles(&nodes, &e);
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, bs) in &e {
        for b in bs {
            if let (Some(x), Some(y)) = (a.first(), b.first()) {
                if x != y {
                    top.entry(x.clone()).or_default().insert(y.clone());
                }
            }
        }
    }
    let tops: Vec<String> = files.keys().filter_map(|m| m.first().cloned()).collect();
    let tc = cycles(&tops, &top);
    assert!(
        fc.is_empty() && tc.is_empty(),
        "file cycles {fc:?}, module cycles {tc:?}"
    );
}

#[test]
fn imports_point_down_the_layers() {
    let (files, e) = source();
    let mut wrong = Vec::new();
    for (a, bs) in &e {
        let Some(la) = a.first().and_then(|t| layer(t)) else {
            continue;
        };
        for b in bs {
            let (ta, tb) = (&a[0], &b[0]);
            if ta == tb {
                continue;
            }
            match layer(tb) {
                Some(lb) if lb < la => {}
                _ => wrong.push(format!("{} -> {}", a.join("/"), b.join("/"))),
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers: {wrong:?}");
    // The wire format stays at the edge: no tonic below the server.
    for (m, text) in &files {
        let top = m.first().map(String::as_str).unwrap_or("");
        if layer(top).is_some_and(|l| l < 7) && top != "proto" {
            assert!(
                !code(text).contains("tonic") && !code(text).contains("crate::proto"),
                "{} uses tonic or the proto types",
                m.join("/")
            );
        }
    }
    // Every top-level module has a layer (a new one must be placed deliberately).
    for m in files.keys() {
        if let Some(t) = m.first() {
            assert!(
                layer(t).is_some(),
                "module {t} has no layer in tests/layers.rs"
            );
        }
    }
}

/// The checker sees a planted cycle and an upward import (it is not vacuous).
#[test]
fn the_checker_finds_a_planted_cycle() {
    let mut files: BTreeMap<Module, String> = BTreeMap::new();
    files.insert(vec!["model".into()], "use crate::engine::X;\n".into());
    files.insert(vec!["engine".into()], "use crate::model::{Y, Z};\n".into());
    let e = edges(&files);
    let nodes: Vec<Module> = files.keys().cloned().collect();
    assert_eq!(cycles(&nodes, &e).len(), 1);
    assert!(layer("model") < layer("engine"));
}
