//! The workspace's layering, checked from `cargo metadata` against the rules table in
//! `ARCHITECTURE.md`: no crate depends on a crate the table does not allow it (so never on one
//! above it), exactly one crate depends on rerun, one on axum and one on async-nats, and the
//! fuzz targets' build holds no opencv, candle, axum or rerun.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `crate → crates it may depend on`, from the table between the markers in ARCHITECTURE.md.
fn rules() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).unwrap();
    let start = text
        .find("<!-- layers -->")
        .expect("layers table start marker");
    let end = text
        .find("<!-- /layers -->")
        .expect("layers table end marker");
    let mut rules = BTreeMap::new();
    for line in text[start..end].lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let Some(name) = cells.get(1).and_then(|c| c.strip_prefix('`')) else {
            continue;
        };
        let name = name.trim_end_matches('`').to_string();
        let allowed = cells
            .get(3)
            .map(|c| {
                c.split(',')
                    .map(|d| d.trim().trim_matches('`').to_string())
                    .filter(|d| d.starts_with("streamrecon"))
                    .collect()
            })
            .unwrap_or_default();
        rules.insert(name, allowed);
    }
    assert!(!rules.is_empty(), "no rules found in ARCHITECTURE.md");
    rules
}

fn metadata(manifest: &Path) -> Value {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A package's normal (non-dev) dependencies: name → (optional, features it enables).
fn deps(pkg: &Value) -> BTreeMap<String, (bool, Vec<String>)> {
    pkg["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["kind"].is_null() || d["kind"] == "build")
        .map(|d| {
            let features = d["features"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            (
                d["name"].as_str().unwrap().to_string(),
                (d["optional"].as_bool().unwrap_or(false), features),
            )
        })
        .collect()
}

#[test]
fn no_crate_depends_on_a_layer_the_rules_do_not_allow() {
    let rules = rules();
    let meta = metadata(&Path::new(ROOT).join("Cargo.toml"));
    let packages = meta["packages"].as_array().unwrap();
    let names: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        rules.keys().cloned().collect(),
        "the workspace's crates and the ARCHITECTURE.md table differ"
    );
    let mut rerun = Vec::new();
    let mut axum = Vec::new();
    let mut nats = Vec::new();
    for p in packages {
        let name = p["name"].as_str().unwrap();
        for dep in deps(p).keys() {
            if names.contains(dep) {
                assert!(
                    rules[name].contains(dep),
                    "{name} depends on {dep}, which ARCHITECTURE.md does not allow"
                );
            }
            match dep.as_str() {
                "rerun" => rerun.push(name.to_string()),
                "axum" => axum.push(name.to_string()),
                "async-nats" => nats.push(name.to_string()),
                _ => {}
            }
        }
    }
    assert_eq!(rerun, ["streamrecon-viewer"], "crates depending on rerun");
    assert_eq!(axum, ["streamrecon-serve"], "crates depending on axum");
    assert_eq!(
        nats,
        ["streamrecon-serve"],
        "crates depending on async-nats"
    );
}

#[test]
fn the_fuzz_build_holds_no_heavy_dependency() {
    let workspace = metadata(&Path::new(ROOT).join("Cargo.toml"));
    let packages: BTreeMap<String, &Value> = workspace["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p))
        .collect();
    let fuzz = metadata(&Path::new(ROOT).join("fuzz/Cargo.toml"));
    let fuzz_pkg = fuzz["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "streamrecon-fuzz")
        .unwrap();
    // Every crate the fuzz targets build, following each dependency's optional parts only where
    // the crate depending on it turns them on.
    let mut reached = BTreeSet::new();
    let mut todo: Vec<(String, Vec<String>)> = deps(fuzz_pkg)
        .into_iter()
        .filter(|(_, (optional, _))| !optional)
        .map(|(n, (_, f))| (n, f))
        .collect();
    while let Some((name, features)) = todo.pop() {
        reached.insert(name.clone());
        let Some(p) = packages.get(&name) else {
            continue;
        };
        let table = p["features"].as_object().unwrap();
        let mut enabled: BTreeSet<String> = features.into_iter().collect();
        if let Some(default) = table.get("default").and_then(Value::as_array) {
            enabled.extend(default.iter().filter_map(|f| f.as_str().map(String::from)));
        }
        let turned_on: BTreeSet<String> = enabled
            .iter()
            .filter_map(|f| table.get(f).and_then(Value::as_array))
            .flatten()
            .filter_map(|d| d.as_str()?.strip_prefix("dep:").map(String::from))
            .collect();
        for (dep, (optional, f)) in deps(p) {
            if (!optional || turned_on.contains(&dep)) && !reached.contains(&dep) {
                todo.push((dep, f));
            }
        }
    }
    assert!(reached.contains("streamrecon-datasets"), "{reached:?}");
    for heavy in ["opencv", "candle-core", "candle-nn", "axum", "rerun"] {
        assert!(
            !reached.contains(heavy),
            "the fuzz build reaches {heavy}: {reached:?}"
        );
    }
}

#[test]
fn every_bench_binary_runs_its_own_main() {
    // A bench file without `harness = false` compiles as an empty libtest harness: `cargo bench`
    // then measures nothing and says so nowhere.
    let manifest = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
    let benches: Vec<&str> = manifest.split("[[bench]]").skip(1).collect();
    for entry in std::fs::read_dir(Path::new(ROOT).join("benches")).unwrap() {
        let path = entry.unwrap().path();
        // Only Rust sources are bench targets (benches/REFERENCE.md is documentation).
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let declared = benches
            .iter()
            .any(|b| b.contains(&format!("name = \"{stem}\"")) && b.contains("harness = false"));
        assert!(
            declared,
            "benches/{stem}.rs has no [[bench]] entry with harness = false in Cargo.toml"
        );
    }
}
