//! The deploy files run as shipped: the Dockerfile, Docker Compose
//! (deploy/compose), the Kubernetes base and overlays (deploy/k8s) with the
//! NATS Helm chart's values, and the systemd units (deploy/systemd).
//!
//! - every Tocsin service is deployed in compose, in the Kubernetes base
//!   and as a systemd unit: in compose and Kubernetes with two replicas
//!   (incidents and escalation as leader and standby), each Deployment with
//!   a PodDisruptionBudget (`minAvailable: 1`);
//! - the compose file is well formed (services, `depends_on` targets, bind
//!   mounts that exist, named volumes declared, build contexts and targets
//!   of the Dockerfile, one host port per replica; `docker compose config`
//!   validates it against the Compose spec when Docker Compose is
//!   installed), its 3 NATS nodes form
//!   one cluster with the users of deploy/nats/permissions.conf, and each
//!   Tocsin container starts a binary with a command line the CLI accepts,
//!   is health-checked on `/readyz` of its admin port, and passes Tocsin's
//!   own config loader with the environment compose gives it;
//! - every variable a deploy file sets for Tocsin is one Tocsin reads (a
//!   CLI flag's variable or one its config names);
//! - the Kubernetes overlays patch what the base has, rename images it
//!   uses, and build with `kubectl kustomize` (when kubectl is installed;
//!   the other checks always run); Services reach their pods' ports;
//! - the runbooks Kubernetes and compose ship are the repository's, load
//!   with the allowed programs, and those programs are in the image;
//! - the Helm values make a 3-node JetStream cluster with file storage,
//!   `sync_interval: always` and every user's password (the config the
//!   chart renders from them passes `nats-server -t`: shipped_files.rs);
//! - the Dockerfile builds every binary with `--locked` on the official
//!   Rust image into a small non-root runtime image, copies only files that
//!   exist, and `.dockerignore` keeps build output out; when a Docker
//!   daemon answers, the image is built.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_yaml_ng::Value;
use tocsin::config::Service;
use tocsin_runtime::config::parse_duration;

use crate::shipped_files::{
    binaries, container_launch, containers, fail_on, k8s_documents, kind, load_tocsin_config,
    mounted_config, needed_env_refs, pod_spec, read, rel, root, str_at,
    tocsin_configs_in_configmaps, yaml_documents, Launch, NATS_DRAIN, PLACEHOLDER,
};

/// Programs of the Debian base image that runbooks may run (findutils,
/// coreutils; `Essential: yes` packages of debian:bookworm-slim).
const DEBIAN_BASE_PROGRAMS: &[&str] = &["find", "ls", "cat", "df", "du", "sleep", "true"];

fn compose_dir() -> PathBuf {
    root().join("deploy/compose")
}

/// deploy/compose/compose.yaml with its YAML merge keys (`<<: *x`) applied.
fn compose() -> Value {
    let path = compose_dir().join("compose.yaml");
    let mut doc = yaml_documents(&path)
        .unwrap_or_else(|e| panic!("{e}"))
        .pop()
        .unwrap_or_else(|| panic!("{}: empty", rel(&path)));
    doc.apply_merge()
        .unwrap_or_else(|e| panic!("{}: merge keys: {e}", rel(&path)));
    doc
}

fn compose_services(doc: &Value) -> Vec<(String, Value)> {
    doc.get("services")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.clone())))
        .collect()
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Sequence(s)) => s
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// A compose service's environment (map or `KEY=value` list).
fn compose_env(svc: &Value) -> BTreeMap<String, String> {
    match svc.get("environment") {
        Some(Value::Mapping(m)) => m
            .iter()
            .filter_map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => serde_yaml_ng::to_string(other).ok()?.trim().to_string(),
                };
                Some((k.as_str()?.to_string(), v))
            })
            .collect(),
        Some(Value::Sequence(s)) => s
            .iter()
            .filter_map(|v| v.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The binary of the image's ENTRYPOINT when a service sets none.
const IMAGE_ENTRYPOINT: &str = "tocsin";

/// How a compose service starts, when it runs Tocsin.
fn compose_launch(name: &str, svc: &Value) -> Option<Launch> {
    let entrypoint = strings(svc.get("entrypoint"));
    let command = strings(svc.get("command"));
    let argv: Vec<String> = if entrypoint.is_empty() {
        // Another image (nats) has no build.
        svc.get("build")?;
        std::iter::once(IMAGE_ENTRYPOINT.to_string())
            .chain(command)
            .collect()
    } else {
        entrypoint.into_iter().chain(command).collect()
    };
    let binary = Path::new(argv.first()?).file_name()?.to_str()?.to_string();
    if !binary.starts_with("tocsin") {
        return None;
    }
    Some(Launch {
        origin: format!("deploy/compose/compose.yaml, service {name}"),
        binary,
        args: argv[1..].to_vec(),
        env: compose_env(svc),
    })
}

fn compose_replicas(svc: &Value) -> u64 {
    svc.get("deploy")
        .and_then(|d| d.get("replicas"))
        .and_then(Value::as_u64)
        .unwrap_or(1)
}

/// A compose volume entry: (source, target); source None for an
/// anonymous volume.
fn compose_volume(v: &Value) -> Option<(Option<String>, String)> {
    match v {
        Value::String(s) => {
            let parts: Vec<&str> = s.split(':').collect();
            match parts.as_slice() {
                [target] => Some((None, target.to_string())),
                [source, target, ..] => Some((Some(source.to_string()), target.to_string())),
                [] => None,
            }
        }
        Value::Mapping(_) => Some((
            str_at(v, &["source"]).map(str::to_string),
            str_at(v, &["target"])?.to_string(),
        )),
        _ => None,
    }
}

fn is_bind(source: &str) -> bool {
    source.starts_with('.') || source.starts_with('/') || source.starts_with('~')
}

/// Where the file mounted at `target` comes from on the host (a bind mount
/// of a file, or of a folder holding it), relative to deploy/compose.
fn compose_file_source(svc: &Value, target: &Path) -> Option<PathBuf> {
    for v in svc
        .get("volumes")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        let Some((Some(source), mount)) = compose_volume(v) else {
            continue;
        };
        if !is_bind(&source) {
            continue;
        }
        let host = compose_dir().join(&source);
        if Path::new(&mount) == target {
            return Some(host);
        }
        if let Ok(rest) = target.strip_prefix(&mount) {
            return Some(host.join(rest));
        }
    }
    None
}

/// The Dockerfile's stages: name -> (FROM image, instructions).
fn dockerfile_stages() -> Vec<(String, String, Vec<String>)> {
    let text = read(&root().join("Dockerfile"));
    // Join continuation lines.
    let mut lines = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if t.starts_with('#') {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(body) => {
                cur.push_str(body);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                lines.push(std::mem::take(&mut cur));
            }
        }
    }
    let mut stages: Vec<(String, String, Vec<String>)> = Vec::new();
    for line in lines {
        let mut words = line.split_whitespace();
        let Some(op) = words.next() else { continue };
        if op.eq_ignore_ascii_case("FROM") {
            let args: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
            let image = args.first().copied().unwrap_or_default().to_string();
            let name = match args.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("AS") => name.to_string(),
                _ => format!("stage-{}", stages.len()),
            };
            stages.push((name, image, Vec::new()));
        } else if let Some((_, _, body)) = stages.last_mut() {
            body.push(line.clone());
        }
    }
    stages
}

/// The stage `name` and the stages it is built FROM, nearest first.
fn stage_chain<'a>(
    stages: &'a [(String, String, Vec<String>)],
    name: &str,
) -> Vec<&'a (String, String, Vec<String>)> {
    let mut out = Vec::new();
    let mut next = Some(name.to_string());
    while let Some(n) = next.take() {
        let Some(stage) = stages.iter().find(|(s, _, _)| *s == n) else {
            break;
        };
        out.push(stage);
        if stages.iter().any(|(s, _, _)| *s == stage.1) {
            next = Some(stage.1.clone());
        }
    }
    out
}

/// Programs on the PATH of an image built to `target`: what the stages
/// copy into /usr/local/bin, and the Debian base's.
fn image_programs(target: &str) -> BTreeSet<String> {
    let stages = dockerfile_stages();
    let mut out: BTreeSet<String> = DEBIAN_BASE_PROGRAMS.iter().map(|s| s.to_string()).collect();
    for (_, _, body) in stage_chain(&stages, target) {
        for line in body {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() != Some(&"COPY") {
                continue;
            }
            let Some(dest) = words.last() else { continue };
            if !dest.starts_with("/usr/local/bin") {
                continue;
            }
            let from = words
                .iter()
                .find_map(|w| w.strip_prefix("--from="))
                .unwrap_or_default();
            if dest.ends_with('/') {
                // A folder of binaries: the build stage's /out/ holds the
                // Tocsin binaries (checked by the Dockerfile test).
                if stages.iter().any(|(n, _, _)| n == from) {
                    out.extend(binaries().into_iter().filter(|b| b.starts_with("tocsin")));
                }
            } else if let Some(name) = Path::new(dest).file_name().and_then(|n| n.to_str()) {
                out.insert(name.to_string());
            }
        }
    }
    out
}

#[test]
fn every_service_is_deployed_in_compose_kubernetes_and_systemd() {
    let doc = compose();
    let services = compose_services(&doc);
    let k8s = k8s_documents();
    let mut problems = Vec::new();

    let pod_labels = |d: &Value| -> BTreeMap<String, String> {
        d.get("spec")
            .and_then(|s| s.get("template"))
            .and_then(|t| t.get("metadata"))
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
            .collect()
    };
    let selects = |selector: Option<&Value>, labels: &BTreeMap<String, String>| {
        let m: Vec<(String, String)> = selector
            .and_then(|s| s.get("matchLabels"))
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
            .collect();
        !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    let runs = |d: &Value, binary: &str| {
        d.get("spec")
            .and_then(|s| s.get("template"))
            .and_then(|t| t.get("spec"))
            .and_then(|s| s.get("containers"))
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|c| container_launch("", c))
            .any(|l| l.binary == binary)
    };

    for service in Service::ALL {
        let binary = format!("tocsin-{}", service.name());
        // Compose: two containers of it at least.
        let replicas: u64 = services
            .iter()
            .filter(|(name, svc)| {
                compose_launch(name, svc).is_some_and(|l| {
                    l.binary == binary
                        || (l.binary == "tocsin" && l.args.iter().any(|a| a == service.name()))
                })
            })
            .map(|(_, svc)| compose_replicas(svc))
            .sum();
        if replicas < 2 {
            problems.push(format!(
                "deploy/compose/compose.yaml: {binary} runs in {replicas} container(s); \
                 run 2 (a standby for incidents and escalation)"
            ));
        }
        // Kubernetes: a Deployment with 2 replicas and its PDB.
        match k8s
            .iter()
            .find(|(_, d)| kind(d) == "Deployment" && runs(d, &binary))
        {
            None => problems.push(format!("deploy/k8s/base: no Deployment runs {binary}")),
            Some((path, d)) => {
                let n = d
                    .get("spec")
                    .and_then(|s| s.get("replicas"))
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                if n < 2 {
                    problems.push(format!("{}: {binary} has {n} replica(s); run 2", rel(path)));
                }
            }
        }
        // systemd: its own unit.
        let unit = root().join(format!("deploy/systemd/{binary}.service"));
        if !unit.is_file() {
            problems.push(format!("{} is missing", rel(&unit)));
        } else if !read(&unit).lines().any(|l| {
            l.trim()
                .strip_prefix("ExecStart=")
                .and_then(|e| e.split_whitespace().next())
                .is_some_and(|p| p.ends_with(&format!("/{binary}")))
        }) {
            problems.push(format!("{}: ExecStart does not run {binary}", rel(&unit)));
        }
    }

    // Every Deployment has a PodDisruptionBudget keeping one pod up.
    for (path, d) in k8s.iter().filter(|(_, d)| kind(d) == "Deployment") {
        let name = str_at(d, &["metadata", "name"]).unwrap_or("?");
        let labels = pod_labels(d);
        let pdb = k8s.iter().find(|(_, p)| {
            kind(p) == "PodDisruptionBudget"
                && selects(p.get("spec").and_then(|s| s.get("selector")), &labels)
        });
        match pdb {
            None => problems.push(format!(
                "{}: Deployment {name} has no PodDisruptionBudget",
                rel(path)
            )),
            Some((ppath, p)) => {
                let min = p
                    .get("spec")
                    .and_then(|s| s.get("minAvailable"))
                    .and_then(Value::as_u64);
                if min != Some(1) {
                    problems.push(format!(
                        "{}: the PodDisruptionBudget of {name} needs minAvailable: 1, has {min:?}",
                        rel(ppath)
                    ));
                }
            }
        }
    }
    fail_on(problems);
}

#[test]
fn compose_file_is_well_formed() {
    let doc = compose();
    let services = compose_services(&doc);
    let names: BTreeSet<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    let declared: BTreeSet<String> = doc
        .get("volumes")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.as_str().map(str::to_string))
        .collect();
    let stages: BTreeSet<String> = dockerfile_stages().into_iter().map(|(n, _, _)| n).collect();
    let mut problems = Vec::new();
    let mut used_volumes = BTreeSet::new();
    assert!(
        !services.is_empty(),
        "deploy/compose/compose.yaml: no services"
    );
    for (name, svc) in &services {
        let origin = format!("deploy/compose/compose.yaml, service {name}");
        if svc.get("image").is_none() && svc.get("build").is_none() {
            problems.push(format!("{origin}: neither image nor build"));
        }
        // depends_on: services that exist; service_healthy on ones with a check.
        let deps: Vec<(String, Option<String>)> = match svc.get("depends_on") {
            Some(Value::Sequence(s)) => s
                .iter()
                .filter_map(|v| Some((v.as_str()?.to_string(), None)))
                .collect(),
            Some(Value::Mapping(m)) => m
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        k.as_str()?.to_string(),
                        str_at(v, &["condition"]).map(str::to_string),
                    ))
                })
                .collect(),
            _ => Vec::new(),
        };
        for (dep, condition) in deps {
            match services.iter().find(|(n, _)| *n == dep) {
                None => problems.push(format!("{origin}: depends_on {dep:?}, no such service")),
                Some((_, target)) => {
                    if condition.as_deref() == Some("service_healthy")
                        && target.get("healthcheck").is_none()
                    {
                        problems.push(format!(
                            "{origin}: waits for {dep} to be healthy, which has no healthcheck"
                        ));
                    }
                }
            }
        }
        // Volumes: bind mounts of files that exist, named volumes declared.
        for v in svc
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            match compose_volume(v) {
                None => problems.push(format!("{origin}: volume entry {v:?} not understood")),
                Some((None, _)) => {}
                Some((Some(source), _)) if is_bind(&source) => {
                    let host = compose_dir().join(&source);
                    if !host.exists() {
                        problems.push(format!(
                            "{origin}: bind mount source {source} ({}) does not exist",
                            rel(&host)
                        ));
                    }
                }
                Some((Some(source), _)) => {
                    used_volumes.insert(source.clone());
                    if !declared.contains(&source) {
                        problems.push(format!(
                            "{origin}: named volume {source} is not declared under `volumes:`"
                        ));
                    }
                }
            }
        }
        // Builds from the Dockerfile, to a stage it has.
        if let Some(build) = svc.get("build") {
            let context = compose_dir().join(str_at(build, &["context"]).unwrap_or("."));
            let dockerfile = context.join(str_at(build, &["dockerfile"]).unwrap_or("Dockerfile"));
            if !dockerfile.is_file() {
                problems.push(format!("{origin}: no Dockerfile at {}", rel(&dockerfile)));
            }
            if let Some(target) = str_at(build, &["target"]) {
                if !stages.contains(target) {
                    problems.push(format!(
                        "{origin}: build target {target} is no stage of the Dockerfile ({stages:?})"
                    ));
                }
            }
        }
        // One host port per replica.
        let replicas = compose_replicas(svc);
        for p in svc
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let Some(p) = p.as_str() else { continue };
            let parts: Vec<&str> = p.split(':').collect();
            if parts.len() < 2 {
                continue; // container port only: the host picks
            }
            let host = parts[parts.len() - 2];
            let count = match host.split_once('-') {
                Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                    (Ok(a), Ok(b)) if b >= a => u64::from(b - a + 1),
                    _ => 0,
                },
                None => u64::from(host.parse::<u32>().is_ok()),
            };
            if count < replicas {
                problems.push(format!(
                    "{origin}: port {p} gives {count} host port(s) to {replicas} replicas"
                ));
            }
        }
    }
    for v in &declared {
        if !used_volumes.contains(v) {
            problems.push(format!(
                "deploy/compose/compose.yaml: volume {v} is used by no service"
            ));
        }
    }
    assert!(names.len() >= 3 + Service::ALL.len());
    fail_on(problems);

    // Docker Compose itself, when installed (the checks above run anyway):
    // `config` interpolates and validates against the Compose spec, with
    // env.example's variables filled in.
    let dir = tempfile::tempdir().expect("temp dir");
    let env_file = dir.path().join("compose.env");
    let filled: String = read(&compose_dir().join("env.example"))
        .lines()
        .map(|l| l.replace(PLACEHOLDER, "p0123456789abcdef0123456789abcdef"))
        .map(|l| l + "\n")
        .collect();
    std::fs::write(&env_file, filled).expect("env file");
    for argv in [&["docker", "compose"][..], &["docker-compose"]] {
        let works = Command::new(argv[0])
            .args(&argv[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !works {
            continue;
        }
        let out = Command::new(argv[0])
            .args(&argv[1..])
            .arg("--env-file")
            .arg(&env_file)
            .arg("-f")
            .arg(compose_dir().join("compose.yaml"))
            .args(["config", "--quiet"])
            .output()
            .expect("run docker compose config");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{} config rejects deploy/compose/compose.yaml: {stderr}",
            argv.join(" ")
        );
        break;
    }
}

#[test]
fn compose_runs_a_3_node_nats_cluster_with_tocsins_users() {
    let doc = compose();
    let services = compose_services(&doc);
    let mut problems = Vec::new();
    let nats: Vec<&(String, Value)> = services
        .iter()
        .filter(|(_, s)| {
            s.get("image")
                .and_then(Value::as_str)
                .is_some_and(|i| i.starts_with("nats:"))
        })
        .collect();
    assert_eq!(
        nats.len(),
        3,
        "deploy/compose/compose.yaml: a NATS cluster of 3 nodes, found {}",
        nats.len()
    );
    let shipped = root().join("deploy/nats/permissions.conf");
    let passwords: BTreeSet<String> = tocsin_runtime::nats::IDENTITIES
        .iter()
        .map(|i| tocsin_tests::nats::password_variable(i))
        .collect();
    for (name, svc) in nats {
        let origin = format!("deploy/compose/compose.yaml, service {name}");
        let image = str_at(svc, &["image"]).unwrap_or_default();
        let version = image.trim_start_matches("nats:");
        let minor = version
            .strip_prefix("2.")
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|m| m.parse::<u32>().ok());
        if minor.is_none_or(|m| m < 12) {
            problems.push(format!("{origin}: {image}: NATS 2.12 or newer is needed"));
        }
        let argv = strings(svc.get("command"));
        let Some(config) = argv
            .iter()
            .position(|a| a == "--config" || a == "-c")
            .and_then(|i| argv.get(i + 1))
        else {
            problems.push(format!("{origin}: command {argv:?} names no --config"));
            continue;
        };
        let Some(source) = compose_file_source(svc, Path::new(config)) else {
            problems.push(format!("{origin}: {config} is on no bind mount"));
            continue;
        };
        let text = read(&source);
        // Routes to every node of the cluster, by service name.
        for (other, _) in services.iter().filter(|(_, s)| {
            s.get("image")
                .and_then(Value::as_str)
                .is_some_and(|i| i.starts_with("nats:"))
        }) {
            if !text.contains(&format!("nats://{other}:6222")) {
                problems.push(format!(
                    "{}: no route to {other} (nats://{other}:6222)",
                    rel(&source)
                ));
            }
        }
        // permissions.conf: the shipped file itself, next to the config.
        let perms = Path::new(config)
            .parent()
            .unwrap_or(Path::new("/"))
            .join("permissions.conf");
        match compose_file_source(svc, &perms) {
            Some(p) if p.canonicalize().ok() == shipped.canonicalize().ok() => {}
            other => problems.push(format!(
                "{origin}: {} must be deploy/nats/permissions.conf itself, is {other:?}",
                perms.display()
            )),
        }
        // JetStream on a named volume.
        let store = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("store_dir:"))
            .map(|s| s.trim().trim_matches('"').to_string());
        let on_volume = store.as_ref().is_some_and(|dir| {
            svc.get("volumes")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .filter_map(compose_volume)
                .any(|(s, t)| s.is_some_and(|s| !is_bind(&s)) && t == *dir)
        });
        if !on_volume {
            problems.push(format!(
                "{origin}: JetStream's store_dir {store:?} is on no named volume"
            ));
        }
        // Every user's password, and the node's name.
        let env = compose_env(svc);
        for p in &passwords {
            if !env.contains_key(p) {
                problems.push(format!("{origin}: no {p} in environment"));
            }
        }
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$')) {
            if let Some(var) = word.strip_prefix('$') {
                if !var.is_empty() && !env.contains_key(var) {
                    problems.push(format!(
                        "{}: ${var} is not in {name}'s environment",
                        rel(&source)
                    ));
                }
            }
        }
        if svc.get("healthcheck").is_none() {
            problems.push(format!("{origin}: no healthcheck"));
        }
    }
    fail_on(problems);
}

#[test]
fn compose_tocsin_containers_start_the_way_the_cli_expects() {
    let doc = compose();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut problems = Vec::new();
    let mut count = 0;
    for (name, svc) in compose_services(&doc) {
        let Some(launch) = compose_launch(&name, &svc) else {
            continue;
        };
        count += 1;
        let origin = launch.origin.clone();
        if !binaries().contains(&launch.binary) {
            problems.push(format!(
                "{origin}: runs {}, not a binary of services/tocsin",
                launch.binary
            ));
            continue;
        }
        let started = match launch.check() {
            Ok(s) => s,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        if started.admin.ip().is_loopback() {
            problems.push(format!(
                "{origin}: admin address {} is loopback; the health check and Prometheus cannot reach it",
                started.admin
            ));
        }
        // Health: /readyz on the admin port.
        let check = strings(svc.get("healthcheck").and_then(|h| h.get("test"))).join(" ");
        let port = started.admin.port().to_string();
        if !check.contains("/readyz") || !check.contains(&port) {
            problems.push(format!(
                "{origin}: the healthcheck must ask /readyz on the admin port {port}: {check:?}"
            ));
        }
        // SIGTERM drains: give it longer.
        let stop = svc
            .get("stop_grace_period")
            .and_then(Value::as_str)
            .and_then(|v| parse_duration(v).ok())
            .unwrap_or(Duration::from_secs(10));
        if stop <= started.grace + NATS_DRAIN {
            problems.push(format!(
                "{origin}: stop_grace_period {stop:?} must exceed the grace period {:?} + {NATS_DRAIN:?}",
                started.grace
            ));
        }
        // The config: a mounted file that the real loader takes for the
        // services of this container, with the variables it is given.
        let Some(source) = compose_file_source(&svc, &started.config) else {
            problems.push(format!(
                "{origin}: its config {} is on no bind mount",
                started.config.display()
            ));
            continue;
        };
        let text = read(&source);
        let env = compose_env(&svc);
        for var in needed_env_refs(&text, &started.services) {
            if !env.contains_key(&var) {
                problems.push(format!(
                    "{origin}: {} needs ${{{var}}}; add it to environment",
                    rel(&source)
                ));
            }
        }
        // Paths inside the container (runbooks) resolved to their sources.
        let work = dir.path().join(&name);
        std::fs::create_dir_all(&work).expect("temp folder");
        let file = work.join("tocsin.yaml");
        std::fs::write(&file, &text).expect("temp config");
        let config = match load_tocsin_config(
            &format!("{} as {origin} reads it", rel(&source)),
            &file,
            &started.services,
        ) {
            Ok(c) => c,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        if config.jetstream.replicas != 3 {
            problems.push(format!(
                "{}: the cluster has 3 NATS nodes; use jetstream.replicas: 3",
                rel(&source)
            ));
        }
        // Listeners reachable through a published port.
        let published: Vec<String> = strings(svc.get("ports"));
        let mut listens = Vec::new();
        if started.services.contains(&Service::Ingest) {
            listens.extend(config.ingest.as_ref().map(|i| i.listen));
        }
        if started.services.contains(&Service::Chatops) {
            listens.extend(config.chatops.as_ref().map(|c| c.listen));
        }
        for addr in listens {
            if !addr.ip().is_unspecified() {
                problems.push(format!(
                    "{origin}: listens on {addr}, which no published port reaches; use 0.0.0.0"
                ));
            }
            if !published
                .iter()
                .any(|p| p.ends_with(&format!(":{}", addr.port())))
            {
                problems.push(format!("{origin}: port {} is not published", addr.port()));
            }
        }
        // Runbooks: the mounted files are the repository's and load.
        if started.services.contains(&Service::Remediation) {
            let Some(rem) = config.remediation.as_ref() else {
                problems.push(format!("{origin}: no remediation section"));
                continue;
            };
            let target = str_at(&svc, &["build", "target"]).unwrap_or("runtime");
            let programs = image_programs(target);
            for p in &rem.allowed_programs {
                if !programs.contains(p) {
                    problems.push(format!(
                        "{origin}: remediation.allowed_programs names {p}, which the image \
                         (Dockerfile target {target}) does not have: {programs:?}"
                    ));
                }
            }
            let runbooks = work.join("runbooks");
            std::fs::create_dir_all(&runbooks).expect("temp folder");
            let mut loaded = 0;
            for d in &rem.runbook_dirs {
                for v in svc
                    .get("volumes")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                    .filter_map(compose_volume)
                {
                    let (Some(source), target) = v else { continue };
                    let Ok(file) = Path::new(&target).strip_prefix(&d.0) else {
                        continue;
                    };
                    let host = compose_dir().join(&source);
                    if !host.starts_with(compose_dir().join("../../runbooks"))
                        && !host
                            .canonicalize()
                            .is_ok_and(|h| h.starts_with(root().join("runbooks")))
                    {
                        problems.push(format!(
                            "{origin}: runbook {target} is not from the repository's runbooks/"
                        ));
                    }
                    std::fs::copy(&host, runbooks.join(file)).expect("copy runbook");
                    loaded += 1;
                }
            }
            if loaded == 0 {
                problems.push(format!(
                    "{origin}: no runbook is mounted in remediation.runbook_dirs"
                ));
            }
            let (_, errors) = tocsin_remediation::runbook::load_dirs(
                std::slice::from_ref(&runbooks),
                &rem.allowed_programs,
            );
            for e in errors {
                problems.push(format!("{origin}: a mounted runbook does not load: {e}"));
            }
        }
    }
    assert!(
        count >= Service::ALL.len(),
        "only {count} Tocsin services in compose"
    );
    fail_on(problems);
}

/// Every `${NAME}` of a text, with or without a default.
fn all_env_refs(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find('}') else { break };
        let inner = &rest[..end];
        let name = inner.split([':', '-', '?']).next().unwrap_or_default();
        names.insert(name.to_string());
        rest = &rest[end + 1..];
    }
    names
}

/// The variables Tocsin's command line reads (clap's `env = ...`).
fn cli_env_vars() -> BTreeSet<String> {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, out: &mut BTreeSet<String>) {
        for a in cmd.get_arguments() {
            if let Some(e) = a.get_env() {
                out.insert(e.to_string_lossy().into_owned());
            }
        }
        for s in cmd.get_subcommands() {
            walk(s, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(&tocsin::cli::Cli::command(), &mut out);
    assert!(
        out.contains("TOCSIN_ADMIN_LISTEN"),
        "clap walk found {out:?}"
    );
    out
}

#[test]
fn variables_the_deploy_files_set_are_ones_tocsin_reads() {
    let cli = cli_env_vars();
    let mut problems = Vec::new();
    let mut check = |origin: &str, vars: Vec<String>, config: &str| {
        let refs = all_env_refs(config);
        for v in vars {
            if v.starts_with("TOCSIN_") && !cli.contains(&v) && !refs.contains(&v) {
                problems.push(format!(
                    "{origin}: sets {v}, which neither the CLI nor its config reads"
                ));
            }
        }
    };
    // Compose.
    let doc = compose();
    for (name, svc) in compose_services(&doc) {
        let Some(launch) = compose_launch(&name, &svc) else {
            continue;
        };
        let config = launch
            .check()
            .ok()
            .and_then(|s| compose_file_source(&svc, &s.config))
            .map(|p| read(&p))
            .unwrap_or_default();
        check(
            &launch.origin,
            compose_env(&svc).into_keys().collect(),
            &config,
        );
    }
    // Kubernetes.
    let embedded = tocsin_configs_in_configmaps();
    for (path, d) in k8s_documents() {
        let Some(pod) = pod_spec(&d) else {
            continue;
        };
        for c in containers(pod) {
            let origin = format!(
                "{}, container {}",
                rel(&path),
                str_at(c, &["name"]).unwrap_or("?")
            );
            let Some(launch) = container_launch(&origin, c) else {
                continue;
            };
            if !launch.binary.starts_with("tocsin") {
                continue;
            }
            let config = launch
                .check()
                .ok()
                .and_then(|s| mounted_config(pod, c, &s.config).ok())
                .and_then(|(cm, key)| {
                    embedded
                        .iter()
                        .find(|e| e.configmap == cm && e.key == key)
                        .map(|e| e.text.clone())
                })
                .unwrap_or_default();
            let vars = c
                .get("env")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .filter_map(|e| str_at(e, &["name"]).map(str::to_string))
                .collect();
            check(&origin, vars, &config);
        }
    }
    // systemd units (their config: the shipped config/tocsin.yaml).
    let shipped = read(&root().join("config/tocsin.yaml"));
    let units = root().join("deploy/systemd");
    for entry in std::fs::read_dir(&units).expect("deploy/systemd") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("service") {
            continue;
        }
        let text = read(&path);
        if !text
            .lines()
            .any(|l| l.contains("ExecStart=/usr/local/bin/tocsin"))
        {
            continue;
        }
        let vars = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Environment="))
            .flat_map(|v| v.split_whitespace())
            .filter_map(|kv| {
                kv.trim_matches('"')
                    .split_once('=')
                    .map(|(k, _)| k.to_string())
            })
            .collect();
        check(&rel(&path), vars, &shipped);
    }
    fail_on(problems);
}

#[test]
fn compose_env_example_holds_placeholders_for_every_variable() {
    let example = compose_dir().join("env.example");
    let text = read(&example);
    let mut mentioned = BTreeSet::new();
    let mut problems = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let commented = line.starts_with('#');
        let body = line.trim_start_matches('#').trim();
        let Some((name, value)) = body.split_once('=') else {
            continue;
        };
        if !name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        mentioned.insert(name.to_string());
        let secret = ["TOKEN", "PASSWORD", "SECRET", "KEY"]
            .iter()
            .any(|s| name.ends_with(s));
        if !commented && secret && value != PLACEHOLDER {
            problems.push(format!("{}: {name} must be {PLACEHOLDER}", rel(&example)));
        }
    }
    let compose_text = read(&compose_dir().join("compose.yaml"));
    for name in all_env_refs(&compose_text) {
        if !mentioned.contains(&name) {
            problems.push(format!(
                "{}: compose.yaml reads ${{{name}}}; list it",
                rel(&example)
            ));
        }
    }
    // passwords.sh makes exactly the NATS passwords it lists.
    for identity in tocsin_runtime::nats::IDENTITIES {
        let v = tocsin_tests::nats::password_variable(identity);
        if !mentioned.contains(&v) {
            problems.push(format!("{}: {v} is missing", rel(&example)));
        }
    }
    fail_on(problems);
}

/// The overlays under deploy/k8s/overlays: (folder, kustomization).
fn overlays() -> Vec<(PathBuf, Value)> {
    let dir = root().join("deploy/k8s/overlays");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/k8s/overlays") {
        let path = entry.expect("entry").path();
        let kust = path.join("kustomization.yaml");
        if kust.is_file() {
            let doc = yaml_documents(&kust)
                .unwrap_or_else(|e| panic!("{e}"))
                .pop()
                .unwrap_or(Value::Null);
            out.push((path, doc));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn kustomize_overlays_patch_what_the_base_has() {
    let base = k8s_documents();
    let overlays = overlays();
    assert!(
        overlays
            .iter()
            .any(|(p, _)| p.ends_with("overlays/example")),
        "deploy/k8s/overlays/example is missing"
    );
    let images: BTreeSet<String> = base
        .iter()
        .flat_map(|(_, d)| {
            d.get("spec")
                .and_then(|s| s.get("template"))
                .and_then(|t| t.get("spec"))
                .and_then(|s| s.get("containers"))
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|c| {
            let image = str_at(&c, &["image"])?;
            Some(image.rsplit_once(':').map_or(image, |(n, _)| n).to_string())
        })
        .collect();
    let in_base = |k: &str, n: &str| {
        base.iter()
            .any(|(_, d)| kind(d) == k && str_at(d, &["metadata", "name"]) == Some(n))
    };
    let mut problems = Vec::new();
    for (dir, kust) in &overlays {
        let origin = rel(&dir.join("kustomization.yaml"));
        for r in strings(kust.get("resources")) {
            let p = dir.join(&r);
            if !(p.is_file() || p.join("kustomization.yaml").is_file()) {
                problems.push(format!("{origin}: resource {r} does not exist"));
            }
        }
        for i in kust
            .get("images")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let name = str_at(i, &["name"]).unwrap_or_default();
            if !images.contains(name) {
                problems.push(format!(
                    "{origin}: images renames {name}, which no base container uses ({images:?})"
                ));
            }
        }
        for p in kust
            .get("patches")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let mut targets = Vec::new();
            if let Some(t) = p.get("target") {
                targets.push((
                    str_at(t, &["kind"]).unwrap_or_default().to_string(),
                    str_at(t, &["name"]).unwrap_or_default().to_string(),
                ));
            } else if let Some(file) = str_at(p, &["path"]) {
                match yaml_documents(&dir.join(file)) {
                    Ok(docs) => targets.extend(docs.iter().map(|d| {
                        (
                            kind(d).to_string(),
                            str_at(d, &["metadata", "name"])
                                .unwrap_or_default()
                                .to_string(),
                        )
                    })),
                    Err(e) => problems.push(format!("{origin}: patch {file}: {e}")),
                }
            } else if let Some(inline) = str_at(p, &["patch"]) {
                if let Ok(d) = serde_yaml_ng::from_str::<Value>(inline) {
                    targets.push((
                        kind(&d).to_string(),
                        str_at(&d, &["metadata", "name"])
                            .unwrap_or_default()
                            .to_string(),
                    ));
                }
            }
            if targets.is_empty() {
                problems.push(format!("{origin}: a patch names no target: {p:?}"));
            }
            for (k, n) in targets {
                if !in_base(&k, &n) {
                    problems.push(format!(
                        "{origin}: patches {k} {n}, which the base does not have"
                    ));
                }
            }
        }
    }
    // Services reach the ports of the pods they select.
    for (path, svc) in base.iter().filter(|(_, d)| kind(d) == "Service") {
        let name = str_at(svc, &["metadata", "name"]).unwrap_or("?");
        let selector: BTreeMap<String, String> = svc
            .get("spec")
            .and_then(|s| s.get("selector"))
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
            .collect();
        let pods: Vec<&Value> = base
            .iter()
            .filter_map(|(_, d)| {
                let t = d.get("spec")?.get("template")?;
                let labels = t.get("metadata")?.get("labels")?.as_mapping()?;
                selector
                    .iter()
                    .all(|(k, v)| {
                        labels.get(k.as_str()).and_then(Value::as_str) == Some(v.as_str())
                    })
                    .then_some(t.get("spec")?)
            })
            .collect();
        if pods.is_empty() {
            problems.push(format!("{}: Service {name} selects no pods", rel(path)));
            continue;
        }
        for port in svc
            .get("spec")
            .and_then(|s| s.get("ports"))
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let target = port.get("targetPort").or_else(|| port.get("port"));
            let found = pods.iter().any(|spec| {
                spec.get("containers")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                    .flat_map(|c| {
                        c.get("ports")
                            .and_then(Value::as_sequence)
                            .cloned()
                            .unwrap_or_default()
                    })
                    .any(|cp| match target {
                        Some(Value::String(n)) => str_at(&cp, &["name"]) == Some(n.as_str()),
                        Some(t) => cp.get("containerPort") == Some(t),
                        None => false,
                    })
            });
            if !found {
                problems.push(format!(
                    "{}: Service {name} port {target:?} is no container port of its pods",
                    rel(path)
                ));
            }
        }
    }
    for s in ["tocsin-ingest", "tocsin-chatops"] {
        if !in_base("Service", s) {
            problems.push(format!("deploy/k8s/base: no Service {s}"));
        }
    }
    fail_on(problems);

    // kubectl builds them, when installed (the checks above run anyway).
    let kubectl_works = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if kubectl_works {
        let mut dirs = vec![root().join("deploy/k8s/base")];
        dirs.extend(overlays.iter().map(|(d, _)| d.clone()));
        for dir in dirs {
            let out = Command::new("kubectl")
                .arg("kustomize")
                .arg(&dir)
                .output()
                .expect("run kubectl kustomize");
            assert!(
                out.status.success(),
                "kubectl kustomize {}: {}",
                rel(&dir),
                String::from_utf8_lossy(&out.stderr)
            );
            let built = String::from_utf8_lossy(&out.stdout);
            for service in Service::ALL {
                assert!(
                    built.contains(&format!("name: tocsin-{}\n", service.name())),
                    "kubectl kustomize {}: no tocsin-{}",
                    rel(&dir),
                    service.name()
                );
            }
        }
    }
}

#[test]
fn kubernetes_runbooks_are_the_repositorys_and_load_with_the_allowed_programs() {
    let docs = k8s_documents();
    let embedded = tocsin_configs_in_configmaps();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut problems = Vec::new();
    let mut checked = 0;
    for (path, d) in &docs {
        let Some(pod) = pod_spec(d) else {
            continue;
        };
        for c in containers(pod) {
            let origin = format!(
                "{}, container {}",
                rel(path),
                str_at(c, &["name"]).unwrap_or("?")
            );
            let Some(started) = container_launch(&origin, c).and_then(|l| l.check().ok()) else {
                continue;
            };
            if !started.services.contains(&Service::Remediation) {
                continue;
            }
            checked += 1;
            let Some(text) = mounted_config(pod, c, &started.config)
                .ok()
                .and_then(|(cm, key)| embedded.iter().find(|e| e.configmap == cm && e.key == key))
                .map(|e| e.text.clone())
            else {
                problems.push(format!("{origin}: its config is in no ConfigMap"));
                continue;
            };
            let config: Value = serde_yaml_ng::from_str(&text).expect("config parses");
            let allowed = strings(
                config
                    .get("remediation")
                    .and_then(|r| r.get("allowed_programs")),
            );
            let dirs = strings(
                config
                    .get("remediation")
                    .and_then(|r| r.get("runbook_dirs")),
            );
            let image = str_at(c, &["image"]).unwrap_or_default();
            let target = if image.contains("tocsin-remediation") {
                "remediation"
            } else {
                "runtime"
            };
            let programs = image_programs(target);
            for p in &allowed {
                if !programs.contains(p) {
                    problems.push(format!(
                        "{origin}: allowed program {p} is not in its image ({image}, Dockerfile target {target})"
                    ));
                }
            }
            // Each runbook folder: a ConfigMap mounted there, holding
            // runbooks/ files byte for byte, that load.
            for d in &dirs {
                let mount = c
                    .get("volumeMounts")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                    .find(|m| str_at(m, &["mountPath"]) == Some(d.as_str()));
                let cm = mount
                    .and_then(|m| str_at(m, &["name"]))
                    .and_then(|v| {
                        pod.get("volumes")
                            .and_then(Value::as_sequence)
                            .into_iter()
                            .flatten()
                            .find(|x| str_at(x, &["name"]) == Some(v))
                    })
                    .and_then(|v| str_at(v, &["configMap", "name"]));
                let Some(cm) = cm else {
                    problems.push(format!(
                        "{origin}: runbook_dirs {d} is mounted from no ConfigMap"
                    ));
                    continue;
                };
                let Some((_, cmdoc)) = docs.iter().find(|(_, x)| {
                    kind(x) == "ConfigMap" && str_at(x, &["metadata", "name"]) == Some(cm)
                }) else {
                    problems.push(format!("{origin}: no ConfigMap {cm}"));
                    continue;
                };
                let folder = dir.path().join(cm);
                std::fs::create_dir_all(&folder).expect("temp folder");
                for (k, v) in cmdoc
                    .get("data")
                    .and_then(Value::as_mapping)
                    .into_iter()
                    .flatten()
                {
                    let (Some(k), Some(v)) = (k.as_str(), v.as_str()) else {
                        continue;
                    };
                    let shipped = root().join("runbooks").join(k);
                    if !shipped.is_file() || read(&shipped) != v {
                        problems.push(format!(
                            "ConfigMap {cm}: {k} differs from runbooks/{k}; copy it again"
                        ));
                    }
                    std::fs::write(folder.join(k), v).expect("temp runbook");
                }
                let (loaded, errors) =
                    tocsin_remediation::runbook::load_dirs(std::slice::from_ref(&folder), &allowed);
                for e in errors {
                    problems.push(format!(
                        "{origin}: a runbook of ConfigMap {cm} does not load: {e}"
                    ));
                }
                if loaded.is_empty() {
                    problems.push(format!("{origin}: ConfigMap {cm} holds no runbook"));
                }
            }
            // kubectl reads .kube/config in the working directory (a
            // runbook step's environment is PATH only).
            if allowed.iter().any(|p| p == "kubectl") {
                let wd = str_at(c, &["workingDir"]).unwrap_or("/");
                let kube = Path::new(wd).join(".kube");
                let mounted = c
                    .get("volumeMounts")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                    .any(|m| str_at(m, &["mountPath"]).map(Path::new) == Some(kube.as_path()));
                if !mounted {
                    problems.push(format!(
                        "{origin}: runs kubectl, but nothing is mounted at {} (kubectl's config)",
                        kube.display()
                    ));
                }
            }
        }
    }
    assert!(checked > 0, "no Kubernetes container runs remediation");
    fail_on(problems);
}

#[test]
fn nats_helm_values_make_a_3_node_jetstream_cluster_with_every_users_password() {
    let path = root().join("deploy/k8s/nats-values.yaml");
    let v = yaml_documents(&path)
        .unwrap_or_else(|e| panic!("{e}"))
        .pop()
        .expect("values");
    let at = |p: &[&str]| -> Option<&Value> {
        let mut cur = &v;
        for k in p {
            cur = cur.get(*k)?;
        }
        Some(cur)
    };
    let mut problems = Vec::new();
    let origin = rel(&path);
    for (p, want) in [
        (&["config", "cluster", "enabled"][..], Value::Bool(true)),
        (&["config", "cluster", "replicas"], Value::from(3)),
        (&["config", "jetstream", "enabled"], Value::Bool(true)),
        (
            &["config", "jetstream", "fileStore", "enabled"],
            Value::Bool(true),
        ),
        (
            &["config", "jetstream", "fileStore", "pvc", "enabled"],
            Value::Bool(true),
        ),
        (
            &["config", "jetstream", "merge", "sync_interval"],
            Value::from("always"),
        ),
    ] {
        if at(p) != Some(&want) {
            problems.push(format!(
                "{origin}: {} must be {want:?}, is {:?}",
                p.join("."),
                at(p)
            ));
        }
    }
    let tag = at(&["container", "image", "tag"])
        .and_then(Value::as_str)
        .unwrap_or("");
    let minor = tag
        .strip_prefix("2.")
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|m| m.parse::<u32>().ok());
    if minor.is_none_or(|m| m < 12) {
        problems.push(format!(
            "{origin}: container.image.tag {tag:?}: NATS 2.12+ is needed"
        ));
    }
    // Every identity's password from the tocsin-nats Secret (whose keys
    // secret.example.yaml shapes).
    let docs = k8s_documents();
    let secret_keys: BTreeSet<String> = docs
        .iter()
        .find(|(_, d)| {
            kind(d) == "Secret" && str_at(d, &["metadata", "name"]) == Some("tocsin-nats")
        })
        .and_then(|(_, d)| d.get("stringData").and_then(Value::as_mapping).cloned())
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.as_str().map(str::to_string))
        .collect();
    for identity in tocsin_runtime::nats::IDENTITIES {
        let var = tocsin_tests::nats::password_variable(identity);
        let e = at(&["container", "env", var.as_str()]);
        let secret = e.and_then(|e| str_at(e, &["valueFrom", "secretKeyRef", "name"]));
        let key = e.and_then(|e| str_at(e, &["valueFrom", "secretKeyRef", "key"]));
        if secret != Some("tocsin-nats") || key != Some(var.as_str()) || !secret_keys.contains(&var)
        {
            problems.push(format!(
                "{origin}: container.env.{var} must come from the tocsin-nats Secret key {var}"
            ));
        }
    }
    // The include names files the chart's ConfigMap holds.
    let (conf, files) = crate::shipped_files::helm_values_nats_conf(&v);
    for line in conf.lines() {
        if let Some(file) = line.strip_prefix("include ") {
            if !files.contains_key(file.trim()) {
                problems.push(format!(
                    "{origin}: includes {file}, which configMap.merge.data lacks"
                ));
            }
        }
    }
    // permissions.conf is deploy/nats's own, handed over by the install
    // command (no copy in the values to fall out of step).
    let set_file =
        r"--set-file 'configMap.merge.data.permissions\.conf=deploy/nats/permissions.conf'";
    if at(&["configMap", "merge", "data", "permissions.conf"]).is_some() {
        problems.push(format!(
            "{origin}: carries a copy of permissions.conf; `{set_file}` gives the chart the file itself"
        ));
    }
    for doc in [path.clone(), root().join("deploy/README.md")] {
        if !read(&doc).contains(set_file) {
            problems.push(format!(
                "{}: the helm install command needs {set_file}",
                rel(&doc)
            ));
        }
    }
    assert!(files.contains_key("permissions.conf"));
    fail_on(problems);
}

#[test]
fn dockerfile_builds_every_binary_into_a_small_non_root_image() {
    let stages = dockerfile_stages();
    let mut problems = Vec::new();
    let build = stages
        .iter()
        .find(|(_, image, body)| {
            image.starts_with("rust:") && body.iter().any(|l| l.contains("cargo build"))
        })
        .expect("Dockerfile: no stage FROM rust:... runs cargo build");
    let cargo = build
        .2
        .iter()
        .find(|l| l.contains("cargo build"))
        .expect("cargo build");
    for flag in ["--release", "--locked", "-p tocsin"] {
        if !cargo.contains(flag) {
            problems.push(format!("Dockerfile: `cargo build` without {flag}: {cargo}"));
        }
    }
    for b in binaries().into_iter().filter(|b| b.starts_with("tocsin")) {
        if !build
            .2
            .iter()
            .any(|l| l.split_whitespace().any(|w| w.trim_end_matches(';') == b))
        {
            problems.push(format!("Dockerfile: the build stage does not copy out {b}"));
        }
    }
    // The image the compose file and Kubernetes run: the last stage (the
    // default) and `remediation`.
    let last = stages.last().expect("stages").0.clone();
    for target in [last.as_str(), "remediation"] {
        let chain = stage_chain(&stages, target);
        if chain.is_empty() {
            problems.push(format!("Dockerfile: no stage {target}"));
            continue;
        }
        let root_image = &chain.last().expect("chain").1;
        if !(root_image.contains("-slim") || root_image.contains("distroless")) {
            problems.push(format!(
                "Dockerfile: {target} is built on {root_image}; use a small base (slim, distroless)"
            ));
        }
        let user = chain
            .iter()
            .find_map(|(_, _, body)| {
                body.iter()
                    .rev()
                    .find_map(|l| l.strip_prefix("USER ").map(|u| u.trim().to_string()))
            })
            .unwrap_or_else(|| "root".to_string());
        let uid = user.split(':').next().unwrap_or_default();
        if uid == "root" || uid == "0" || uid.is_empty() {
            problems.push(format!(
                "Dockerfile: {target} runs as {user:?}; use a non-root user"
            ));
        }
        let programs = image_programs(target);
        for b in binaries().into_iter().filter(|b| b.starts_with("tocsin")) {
            if !programs.contains(&b) {
                problems.push(format!("Dockerfile: {target} lacks {b}"));
            }
        }
        let entry = chain.iter().find_map(|(_, _, body)| {
            body.iter()
                .rev()
                .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        });
        match entry.and_then(|e| serde_json::from_str::<Vec<String>>(e).ok()) {
            Some(argv) if argv.first().is_some_and(|p| programs.contains(p)) => {}
            other => problems.push(format!(
                "Dockerfile: {target}'s ENTRYPOINT {other:?} is no program of the image"
            )),
        }
    }
    // COPY sources from the context exist; the image holds no secret.
    for (_, _, body) in &stages {
        for line in body {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() != Some(&"COPY") || words.iter().any(|w| w.starts_with("--from=")) {
                continue;
            }
            let args: Vec<&&str> = words[1..].iter().filter(|w| !w.starts_with("--")).collect();
            for src in &args[..args.len().saturating_sub(1)] {
                if !root().join(src).exists() {
                    problems.push(format!(
                        "Dockerfile: COPY {src}: no such file in the repository"
                    ));
                }
            }
        }
    }
    let ignore = read(&root().join(".dockerignore"));
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(|l| l.trim().trim_end_matches('/'))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for needed in ["target", ".tocsin", "deploy/compose/.env"] {
        if !ignored.contains(needed) {
            problems.push(format!(".dockerignore: add {needed}"));
        }
    }
    fail_on(problems);

    // Built for real when a Docker daemon answers (no daemon: the checks
    // above are what runs).
    let daemon = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if daemon {
        for target in [last.as_str(), "remediation"] {
            let out = Command::new("docker")
                .args(["build", "--target", target, "-t"])
                .arg(format!("tocsin-test-{target}:latest"))
                .arg(root())
                .output()
                .expect("run docker build");
            assert!(
                out.status.success(),
                "docker build --target {target}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
