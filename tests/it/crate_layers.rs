//! The crate layering: services share vocabulary through `tocsin-proto`
//! (the wire), `tocsin-runtime` (the service shape) and `tocsin-rules`
//! (matchers, times, windows); no service crate depends on another, so each
//! can change, be built and be replaced on its own. `tocsin` (the binary
//! that composes them) and the tests are the only crates above them.

use std::collections::BTreeMap;

/// Crates any service may depend on.
const SHARED: [&str; 3] = ["tocsin-proto", "tocsin-runtime", "tocsin-rules"];
/// Crates that compose the services (and so depend on all of them).
const COMPOSERS: [&str; 2] = ["tocsin", "tocsin-tests"];

/// `package -> its tocsin-* dependencies` (normal and dev) from `cargo
/// metadata`.
fn workspace_edges() -> BTreeMap<String, Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut edges = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let deps = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d["name"].as_str())
            .filter(|n| n.starts_with("tocsin"))
            .map(str::to_owned)
            .collect();
        edges.insert(p["name"].as_str().unwrap().to_owned(), deps);
    }
    edges
}

/// Every edge from one service crate to another, as `a -> b`.
fn service_to_service(edges: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let is_service = |n: &str| !SHARED.contains(&n) && !COMPOSERS.contains(&n);
    let mut bad = Vec::new();
    for (from, deps) in edges {
        if !is_service(from) {
            continue;
        }
        for to in deps {
            if is_service(to) && to != from {
                bad.push(format!("{from} -> {to}"));
            }
        }
    }
    bad
}

#[test]
fn no_service_crate_depends_on_another() {
    let edges = workspace_edges();
    for crate_name in ["tocsin-ingest", "tocsin-incidents", "tocsin-escalation"] {
        assert!(
            edges.contains_key(crate_name),
            "{crate_name} is in the workspace"
        );
    }
    let bad = service_to_service(&edges);
    assert!(
        bad.is_empty(),
        "service crates depend on each other: {bad:?}; move what they share into \
         tocsin-rules, tocsin-runtime or tocsin-proto"
    );
    // The shared crates stay below every service.
    for shared in SHARED {
        let up: Vec<_> = edges[shared]
            .iter()
            .filter(|d| !SHARED.contains(&d.as_str()))
            .collect();
        assert!(up.is_empty(), "{shared} depends on {up:?}");
    }
}

#[test]
fn the_guard_sees_an_added_dependency() {
    let mut edges = workspace_edges();
    edges
        .get_mut("tocsin-escalation")
        .unwrap()
        .push("tocsin-incidents".into());
    assert_eq!(
        service_to_service(&edges),
        ["tocsin-escalation -> tocsin-incidents"]
    );
}
