//! The dependency rule of `src/lib.rs`, checked on the source text: no cycle between top-level
//! modules, and the lower layers know nothing of the HTTP layer, the worker or the process.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The top-level module of every `crate::` path a file names (`use crate::{a, b::c}` included).
fn references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // A brace group: the first identifier of each top-level item.
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        rest = &group[j..];
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphabetic() || c == '_') => {
                        let ident: String = group[j..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        out.insert(ident);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                out.insert(ident);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let module = first.trim_end_matches(".rs").to_string();
            if module == "main" || module == "lib" {
                continue;
            }
            let refs = references(&std::fs::read_to_string(&path).unwrap());
            let deps = graph.entry(module.clone()).or_default();
            deps.extend(refs.into_iter().filter(|r| *r != module));
        }
    }
    graph
}

/// A cycle through `graph`, if there is one, as the list of modules on it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_cycle_between_top_level_modules() {
    let g = graph();
    assert!(g.contains_key("store") && g.contains_key("http"), "{g:?}");
    if let Some(cycle) = find_cycle(&g) {
        panic!("module cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn lower_layers_know_nothing_of_routes_the_worker_or_the_process() {
    let g = graph();
    let forbidden = ["http", "app", "cli", "delivery"];
    for lower in [
        "store",
        "signature",
        "mapping",
        "sprinthub",
        "config",
        "domain",
        "operations",
    ] {
        for f in forbidden {
            assert!(
                !g.get(lower).is_some_and(|d| d.contains(f)),
                "{lower} imports {f}: {:?}",
                g.get(lower)
            );
        }
    }
    for bottom in ["config", "domain"] {
        assert!(
            g[bottom].is_empty(),
            "{bottom} is a bottom layer, yet imports {:?}",
            g[bottom]
        );
    }
}

#[test]
fn the_reference_reader_sees_groups_and_paths() {
    let r = references("use crate::{a, b::{c, d}, e as f};\nlet x = crate::g::h(); // crate::i");
    assert_eq!(
        r.into_iter().collect::<Vec<_>>(),
        vec!["a", "b", "e", "g", "i"]
    );
}

#[test]
fn a_cycle_is_found() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert!(find_cycle(&g).is_some());
    g.insert("b".to_string(), BTreeSet::new());
    assert!(find_cycle(&g).is_none());
}
