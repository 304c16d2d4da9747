//! Every file Tocsin ships under `config/`, `deploy/` and `runbooks/` loads:
//!
//! - every YAML document parses, and every Kubernetes manifest names its
//!   `apiVersion`, `kind` and `metadata.name`;
//! - `config/tocsin.yaml` and every Tocsin config inside a Kubernetes
//!   ConfigMap (`tocsin.yaml`, `notifier.yaml`) pass Tocsin's own config
//!   loader, each for the services of the containers that start with it and
//!   with the secret files those containers mount;
//! - every NATS config keeps JetStream at `sync_interval: always`, lets in
//!   only the users of `deploy/nats/permissions.conf` (the Kubernetes copy
//!   identical to it), and passes `nats-server -t` with the passwords
//!   `deploy/nats/passwords.sh` makes and, for the cluster, certificates of
//!   a throw-away CA; the cluster listens on explicit addresses with TLS for
//!   clients and mutual TLS between nodes; only Tocsin's pods may reach
//!   NATS in Kubernetes;
//! - systemd units and Kubernetes containers start a binary that exists,
//!   with a command line the real CLI accepts, and give it longer to stop
//!   than its grace period; the units and workloads listed in [`UNITS`] and
//!   [`WORKLOADS`] are there, each unit on its own admin port;
//! - example secrets hold placeholders only.
//!
//! No NATS server runs here (`nats-server -t` only reads a config).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use clap::Parser;
use serde::Deserialize;
use serde_yaml_ng::Value;
use tocsin::{
    cli::Cli,
    config::{Config, Service},
};
use tocsin_runtime::config::parse_duration;

/// Binaries a unit or container may start: nats-server and the `[[bin]]`
/// targets of services/tocsin (`tocsin`, `tocsin-ingest`, ...).
pub(crate) fn binaries() -> BTreeSet<String> {
    let manifest = read(&root().join("services/tocsin/Cargo.toml"));
    let mut names = BTreeSet::from(["nats-server".to_string()]);
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if let Some(v) = line.strip_prefix("name").map(str::trim_start) {
            if in_bin {
                if let Some(v) = v.strip_prefix('=') {
                    names.insert(v.trim().trim_matches('"').to_string());
                }
            }
        }
    }
    assert!(
        names.contains("tocsin") && names.contains("tocsin-ingest"),
        "services/tocsin/Cargo.toml: no tocsin/tocsin-ingest [[bin]] found in {names:?}"
    );
    names
}

/// Longest the NATS client flush may take after the grace period (app.rs).
pub(crate) const NATS_DRAIN: Duration = Duration::from_secs(5);

/// Default of `--grace-period` / `TOCSIN_GRACE_PERIOD`.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// Default of `--admin-listen` / `TOCSIN_ADMIN_LISTEN`.
const DEFAULT_ADMIN: &str = "127.0.0.1:9464";

/// Placeholder that example secrets must use.
pub(crate) const PLACEHOLDER: &str = "REPLACE_ME";

/// systemd units shipped in deploy/systemd, each `<binary>.service` running
/// that binary.
const UNITS: &[&str] = &[
    "tocsin",
    "tocsin-ingest",
    "tocsin-incidents",
    "tocsin-escalation",
    "tocsin-notifier",
    "tocsin-chatops",
    "tocsin-remediation",
];

/// Kubernetes workloads shipped in deploy/k8s running Tocsin: (kind, name,
/// binary of its container).
const WORKLOADS: &[(&str, &str, &str)] = &[
    ("Deployment", "tocsin-ingest", "tocsin-ingest"),
    ("Deployment", "tocsin-incidents", "tocsin-incidents"),
    ("Deployment", "tocsin-escalation", "tocsin-escalation"),
    ("Deployment", "tocsin-notifier", "tocsin-notifier"),
    ("Deployment", "tocsin-chatops", "tocsin-chatops"),
    ("Deployment", "tocsin-remediation", "tocsin-remediation"),
];

/// Content of every secret file in the test (long enough for a token, and
/// exactly a PagerDuty routing key's 32 characters).
const TEST_SECRET: &str = "shippedfilestestsecret0123456789";

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// Path relative to the repository root, for messages.
pub(crate) fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every file under the shipped folders, sorted.
fn shipped_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    for dir in ["config", "deploy", "runbooks"] {
        walk(&root().join(dir), &mut out);
    }
    out.sort();
    out
}

fn with_extension(exts: &[&str]) -> Vec<PathBuf> {
    shipped_files()
        .into_iter()
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
        })
        .collect()
}

pub(crate) fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", rel(path)))
}

/// All documents of a YAML file (empty documents left out).
pub(crate) fn yaml_documents(path: &Path) -> Result<Vec<Value>, String> {
    let text = read(path);
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let value = Value::deserialize(doc)
            .map_err(|e| format!("{}: document {}: {e}", rel(path), i + 1))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The Kubernetes manifests of the kustomize base (the overlays hold
/// patches, and nats-values.yaml Helm values: tests/it/deploy_files.rs
/// checks those).
fn is_k8s_manifest(path: &Path) -> bool {
    path.starts_with(root().join("deploy/k8s/base"))
}

pub(crate) fn k8s_documents() -> Vec<(PathBuf, Value)> {
    with_extension(&["yaml", "yml"])
        .into_iter()
        .filter(|p| is_k8s_manifest(p))
        .flat_map(|p| {
            let docs = yaml_documents(&p).unwrap_or_else(|e| panic!("{e}"));
            docs.into_iter().map(move |d| (p.clone(), d))
        })
        .collect()
}

/// The pod spec of a workload (`spec.template.spec`), if it has one.
pub(crate) fn pod_spec(doc: &Value) -> Option<&Value> {
    doc.get("spec")?.get("template")?.get("spec")
}

/// The containers of a pod spec.
pub(crate) fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    pod.get("containers")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
}

pub(crate) fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for key in path {
        cur = cur.get(*key)?;
    }
    cur.as_str()
}

pub(crate) fn kind(doc: &Value) -> &str {
    str_at(doc, &["kind"]).unwrap_or("")
}

/// `${NAME}` references without a default: what must be in the environment.
pub(crate) fn required_env_refs(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find('}') else { break };
        let inner = &rest[..end];
        if !inner.contains(":-") {
            names.insert(inner.to_string());
        }
        rest = &rest[end + 1..];
    }
    names
}

/// The `${NAME}` references (without a default) a process running
/// `services` must have in its environment: those of the sections it reads.
/// `Config::load` skips the `ingest`, `notifier`, `chatops` and
/// `remediation` sections of services it does not run, and the
/// `nats.credentials` of other identities (the admin's it reads).
pub(crate) fn needed_env_refs(text: &str, services: &[Service]) -> BTreeSet<String> {
    let Ok(mut doc) = serde_yaml_ng::from_str::<Value>(text) else {
        return required_env_refs(&without_comment_lines(text));
    };
    let names: Vec<&str> = services.iter().map(|s| s.name()).collect();
    if let Some(top) = doc.as_mapping_mut() {
        for section in ["ingest", "notifier", "chatops", "remediation"] {
            if !names.contains(&section) {
                top.remove(section);
            }
        }
        if let Some(creds) = top
            .get_mut("nats")
            .and_then(|n| n.get_mut("credentials"))
            .and_then(Value::as_mapping_mut)
        {
            creds.retain(|k, _| {
                k.as_str()
                    .is_some_and(|k| k == "admin" || names.contains(&k))
            });
        }
    }
    required_env_refs(&serde_yaml_ng::to_string(&doc).unwrap_or_default())
}

/// Loads a Tocsin config with the real loader for `services`, after giving
/// each variable it needs a test value (long enough for a token).
pub(crate) fn load_tocsin_config(
    origin: &str,
    path: &Path,
    services: &[Service],
) -> Result<Config, String> {
    for name in required_env_refs(&read(path)) {
        // Only this test binary's environment; every test here sets the same values.
        std::env::set_var(&name, format!("shipped-files-test-{name}"));
    }
    Config::load(path, services).map_err(|e| format!("{origin}: {e}"))
}

/// A Tocsin config file embedded in a Kubernetes ConfigMap (every key
/// ending in `.yaml` that names `nats:` or `jetstream:`).
pub(crate) struct Embedded {
    /// Where it came from, for messages.
    pub(crate) origin: String,
    pub(crate) configmap: String,
    pub(crate) key: String,
    pub(crate) text: String,
}

pub(crate) fn tocsin_configs_in_configmaps() -> Vec<Embedded> {
    let mut out = Vec::new();
    for (path, doc) in k8s_documents() {
        if kind(&doc) != "ConfigMap" {
            continue;
        }
        let name = str_at(&doc, &["metadata", "name"]).unwrap_or_default();
        let data = doc.get("data").and_then(Value::as_mapping);
        for (key, value) in data.into_iter().flatten() {
            let (Some(key), Some(text)) = (key.as_str(), value.as_str()) else {
                continue;
            };
            if !key.ends_with(".yaml") {
                continue;
            }
            // Runbooks (tocsin-runbooks) are YAML too: a Tocsin config
            // names NATS or the streams.
            let parsed = serde_yaml_ng::from_str::<Value>(text).ok();
            if parsed.is_some_and(|v| v.get("nats").is_none() && v.get("jetstream").is_none()) {
                continue;
            }
            out.push(Embedded {
                origin: format!("{} (ConfigMap {name}, {key})", rel(&path)),
                configmap: name.to_string(),
                key: key.to_string(),
                text: text.to_string(),
            });
        }
    }
    out
}

/// A container of a Kubernetes workload that runs a Tocsin binary.
struct TocsinContainer {
    /// File, workload and container, for messages.
    origin: String,
    /// The pod template's spec and the container.
    pod: Value,
    container: Value,
    started: Started,
}

/// Every container of a workload under deploy/k8s that runs a Tocsin binary
/// with a command line the CLI accepts (the others are reported by
/// `kubernetes_workloads_start_tocsin_the_way_the_cli_expects`).
fn tocsin_containers() -> Vec<TocsinContainer> {
    let mut out = Vec::new();
    for (path, doc) in k8s_documents() {
        let Some(pod) = pod_spec(&doc) else {
            continue;
        };
        let workload = format!(
            "{} ({} {})",
            rel(&path),
            kind(&doc),
            str_at(&doc, &["metadata", "name"]).unwrap_or("?")
        );
        for c in containers(pod) {
            let origin = format!(
                "{workload}, container {}",
                str_at(c, &["name"]).unwrap_or("?")
            );
            let Some(launch) = container_launch(&origin, c) else {
                continue;
            };
            if launch.binary == "nats-server" {
                continue;
            }
            if let Ok(started) = launch.check() {
                out.push(TocsinContainer {
                    origin,
                    pod: pod.clone(),
                    container: c.clone(),
                    started,
                });
            }
        }
    }
    out
}

/// How a container is started (`command` + `args`, literal `env` values);
/// None without a command.
pub(crate) fn container_launch(origin: &str, c: &Value) -> Option<Launch> {
    let strings = |key: &str| -> Vec<String> {
        c.get(key)
            .and_then(Value::as_sequence)
            .map(|s| {
                s.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let command = strings("command");
    let program = command.first()?;
    let binary = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let mut env = BTreeMap::new();
    for e in c
        .get("env")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        if let (Some(k), Some(v)) = (str_at(e, &["name"]), str_at(e, &["value"])) {
            env.insert(k.to_string(), v.to_string());
        }
    }
    Some(Launch {
        origin: origin.to_string(),
        binary,
        args: command[1..]
            .iter()
            .cloned()
            .chain(strings("args"))
            .collect(),
        env,
    })
}

/// The pod volume named `name`.
fn volume<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod.get("volumes")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .find(|v| str_at(v, &["name"]) == Some(name))
}

/// The key of a ConfigMap or Secret volume that appears as `file` in the
/// folder it is mounted on (`items` may rename keys).
fn volume_key(source: &Value, file: &str) -> Option<String> {
    match source.get("items").and_then(Value::as_sequence) {
        Some(items) => items
            .iter()
            .find(|i| str_at(i, &["path"]) == Some(file))
            .and_then(|i| str_at(i, &["key"]))
            .map(str::to_string),
        None => Some(file.to_string()),
    }
}

/// The ConfigMap key a container's `--config` file comes from: (ConfigMap
/// name, key), or why there is none.
pub(crate) fn mounted_config(
    pod: &Value,
    c: &Value,
    config: &Path,
) -> Result<(String, String), String> {
    for m in c
        .get("volumeMounts")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        let (Some(mount), Some(name)) = (str_at(m, &["mountPath"]), str_at(m, &["name"])) else {
            continue;
        };
        let file = match str_at(m, &["subPath"]) {
            Some(sub) if Path::new(mount) == config => sub.to_string(),
            None if config.parent() == Some(Path::new(mount)) => config
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or_default()
                .to_string(),
            _ => continue,
        };
        let source = volume(pod, name)
            .and_then(|v| v.get("configMap"))
            .ok_or_else(|| format!("{} is not mounted from a ConfigMap", config.display()))?;
        let cm = str_at(source, &["name"]).unwrap_or_default().to_string();
        let key = volume_key(source, &file).ok_or_else(|| {
            format!(
                "{} is in no `items` entry of ConfigMap {cm}",
                config.display()
            )
        })?;
        return Ok((cm, key));
    }
    Err(format!(
        "--config {} is on no volume mount; mount it from a ConfigMap",
        config.display()
    ))
}

/// Secret volumes a container mounts: (mount path, volume source).
fn secret_mounts(pod: &Value, c: &Value) -> Vec<(String, Value)> {
    c.get("volumeMounts")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let source = volume(pod, str_at(m, &["name"])?)?.get("secret")?;
            Some((str_at(m, &["mountPath"])?.to_string(), source.clone()))
        })
        .collect()
}

/// Keys an example Secret gives (stringData or data).
fn example_secret_keys(docs: &[(PathBuf, Value)], name: &str) -> Option<BTreeSet<String>> {
    let doc = docs
        .iter()
        .map(|(_, d)| d)
        .find(|d| kind(d) == "Secret" && str_at(d, &["metadata", "name"]) == Some(name))?;
    Some(
        ["stringData", "data"]
            .iter()
            .filter_map(|k| doc.get(*k).and_then(Value::as_mapping))
            .flatten()
            .filter_map(|(k, _)| k.as_str().map(str::to_string))
            .collect(),
    )
}

/// Writes, under `dir`, a file for every key of every Secret the container
/// mounts (as its example Secret gives them, holding [`TEST_SECRET`]), and
/// returns `text` with each mount path pointing there instead.
fn with_test_secret_files(
    docs: &[(PathBuf, Value)],
    pod: &Value,
    c: &Value,
    text: &str,
    dir: &Path,
) -> String {
    let mut text = text.to_string();
    for (i, (mount, source)) in secret_mounts(pod, c).into_iter().enumerate() {
        let name = str_at(&source, &["secretName"]).unwrap_or_default();
        let folder = dir.join(format!("secret-{i}-{name}"));
        std::fs::create_dir_all(&folder).expect("temp secret folder");
        for key in example_secret_keys(docs, name).unwrap_or_default() {
            let file = match source.get("items").and_then(Value::as_sequence) {
                Some(items) => match items
                    .iter()
                    .find(|it| str_at(it, &["key"]) == Some(key.as_str()))
                    .and_then(|it| str_at(it, &["path"]))
                {
                    Some(p) => p.to_string(),
                    None => continue,
                },
                None => key,
            };
            std::fs::write(folder.join(file), TEST_SECRET).expect("temp secret file");
        }
        let mount = mount.trim_end_matches('/');
        text = text.replace(&format!("{mount}/"), &format!("{}/", folder.display()));
    }
    text
}

/// Lines of a NATS config without comments (`#` or `//` to the end of line).
pub(crate) fn nats_conf_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| {
            let l = l.split('#').next().unwrap_or("");
            let l = l.split("//").next().unwrap_or("");
            l.trim().to_string()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// Whether a NATS config that enables JetStream fsyncs every write.
fn check_sync_interval(origin: &str, text: &str) -> Result<(), String> {
    let lines = nats_conf_lines(text);
    let jetstream = lines.iter().any(|l| l.starts_with("jetstream"));
    if !jetstream {
        return Ok(());
    }
    let always = lines.iter().any(|l| {
        l.strip_prefix("sync_interval").map(|r| {
            r.trim_start_matches([' ', ':', '='])
                .trim_matches(['"', '\'', ' '])
        }) == Some("always")
    });
    if always {
        Ok(())
    } else {
        Err(format!(
            "{origin}: JetStream without `sync_interval: always` (acknowledged writes can be lost on a crash otherwise)"
        ))
    }
}

/// `nats-server -t -c FILE` with `env` added to its environment.
pub(crate) fn nats_server_test_config(
    origin: &str,
    file: &Path,
    env: &[(&str, &str)],
) -> Result<(), String> {
    let bin = tocsin_tests::nats::nats_server_bin().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(&bin)
        .arg("-t")
        .arg("-c")
        .arg(file)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{origin}: nats-server -t rejects it: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

pub(crate) fn fail_on(problems: Vec<String>) {
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

/// How a Tocsin process is started: binary name, arguments, environment.
pub(crate) struct Launch {
    pub(crate) origin: String,
    pub(crate) binary: String,
    pub(crate) args: Vec<String>,
    pub(crate) env: BTreeMap<String, String>,
}

/// What a Tocsin process would run with.
pub(crate) struct Started {
    pub(crate) grace: Duration,
    pub(crate) admin: SocketAddr,
    /// The services it runs (`tocsin up`: all of them).
    pub(crate) services: Vec<Service>,
    /// Its config file.
    pub(crate) config: PathBuf,
}

impl Launch {
    /// Parses the command line with the real CLI, the way the binary does
    /// (`tocsin-ingest` takes the global flags only), and returns what it
    /// would run with.
    pub(crate) fn check(&self) -> Result<Started, String> {
        use tocsin::cli::Command;
        let origin = &self.origin;
        let mut argv = vec!["tocsin".to_string()];
        argv.extend(self.args.iter().cloned());
        let forced = match self.binary.as_str() {
            "tocsin" => None,
            // A single-service binary takes the global flags only and runs
            // its service (cli::main).
            b if b.starts_with("tocsin-") && binaries().contains(b) => {
                argv.push("up".into());
                let service = Service::ALL
                    .into_iter()
                    .find(|s| b == format!("tocsin-{}", s.name()))
                    .ok_or_else(|| format!("{origin}: {b} runs no service Tocsin knows"))?;
                Some(service)
            }
            other => return Err(format!("{origin}: {other} is not a Tocsin binary")),
        };
        let cli = Cli::try_parse_from(&argv)
            .map_err(|e| format!("{origin}: the CLI rejects {argv:?}: {e}"))?;
        let services = match (forced, &cli.command) {
            (Some(s), _) => vec![s],
            (None, Command::Up) => Service::ALL.to_vec(),
            (None, Command::Ingest) => vec![Service::Ingest],
            (None, Command::Incidents) => vec![Service::Incidents],
            (None, Command::Escalation) => vec![Service::Escalation],
            (None, Command::Notifier) => vec![Service::Notifier],
            (None, Command::Chatops) => vec![Service::Chatops],
            (None, Command::Remediation) => vec![Service::Remediation],
            (None, other) => {
                return Err(format!("{origin}: runs {other:?}, not a service"));
            }
        };
        // A flag wins over the variable, the variable over the default (clap).
        let flag = |name: &str| {
            self.args
                .iter()
                .any(|a| a == name || a.starts_with(&format!("{name}=")))
        };
        let grace = match self.env.get("TOCSIN_GRACE_PERIOD") {
            _ if flag("--grace-period") => cli.grace_period,
            Some(v) => {
                parse_duration(v).map_err(|e| format!("{origin}: TOCSIN_GRACE_PERIOD: {e}"))?
            }
            None => DEFAULT_GRACE,
        };
        let admin = match self.env.get("TOCSIN_ADMIN_LISTEN") {
            _ if flag("--admin-listen") => cli.admin_listen,
            Some(v) => v
                .parse()
                .map_err(|e| format!("{origin}: TOCSIN_ADMIN_LISTEN={v}: {e}"))?,
            None => DEFAULT_ADMIN.parse().expect("default admin address"),
        };
        let config = match self.env.get("TOCSIN_CONFIG") {
            _ if flag("--config") || flag("-c") => cli.config.clone(),
            Some(v) => PathBuf::from(v),
            None => PathBuf::from("config/tocsin.yaml"),
        };
        if let Some(f) = self.env.get("TOCSIN_LOG_FORMAT") {
            if !["human", "json"].contains(&f.as_str()) {
                return Err(format!(
                    "{origin}: TOCSIN_LOG_FORMAT={f}: use human or json"
                ));
            }
        }
        Ok(Started {
            grace,
            admin,
            services,
            config,
        })
    }
}

/// A systemd unit: section name -> (key, value) in order.
fn parse_unit(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            current = line[1..line.len() - 1].to_string();
            sections.entry(current.clone()).or_default();
        } else if let Some((k, v)) = line.split_once('=') {
            sections
                .entry(current.clone())
                .or_default()
                .push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    sections
}

/// `Environment=` assignments of a unit's [Service] section.
fn unit_env(service: &[(String, String)]) -> BTreeMap<String, String> {
    service
        .iter()
        .filter(|(k, _)| k == "Environment")
        .flat_map(|(_, v)| v.split_whitespace())
        .filter_map(|kv| kv.trim_matches('"').split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A systemd time span such as `45s`, `90`, `1min 30s` or `infinity`.
fn systemd_timespan(v: &str) -> Option<Duration> {
    if v == "infinity" {
        return Some(Duration::MAX);
    }
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    parse_duration(&v.replace("min", "m").replace("sec", "s")).ok()
}

fn check_unit(path: &Path) -> Result<(), String> {
    let origin = rel(path);
    let sections = parse_unit(&read(path));
    for s in ["Unit", "Service", "Install"] {
        if !sections.contains_key(s) {
            return Err(format!("{origin}: no [{s}] section"));
        }
    }
    let service = &sections["Service"];
    let values = |key: &str| -> Vec<&str> {
        service
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let exec = values("ExecStart");
    let [exec] = exec.as_slice() else {
        return Err(format!(
            "{origin}: needs exactly one ExecStart, has {exec:?}"
        ));
    };
    let mut words = exec.split_whitespace();
    let program = words
        .next()
        .unwrap_or_default()
        .trim_start_matches(['@', '-', ':', '+', '!']);
    let binary = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    if !binaries().contains(&binary) {
        return Err(format!(
            "{origin}: ExecStart runs {program:?}; the binaries are {:?}",
            binaries()
        ));
    }
    if !Path::new(program).is_absolute() {
        return Err(format!("{origin}: ExecStart needs an absolute path"));
    }
    // Under ProtectSystem=strict only the state directory is writable, and
    // relative data dirs (`.tocsin/data/...`) start from the working directory.
    if values("ProtectSystem").last() == Some(&"strict") {
        if let Some(dir) = values("WorkingDirectory").last() {
            let state: Vec<PathBuf> = values("StateDirectory")
                .iter()
                .flat_map(|v| v.split_whitespace())
                .map(|d| Path::new("/var/lib").join(d))
                .collect();
            if !state.iter().any(|s| Path::new(dir).starts_with(s)) {
                return Err(format!(
                    "{origin}: WorkingDirectory={dir} is read-only under ProtectSystem=strict; \
                     use a StateDirectory ({state:?})"
                ));
            }
        }
    }
    if binary == "nats-server" {
        return Ok(());
    }
    let env = unit_env(service);
    let launch = Launch {
        origin: origin.clone(),
        binary,
        args: words.map(str::to_string).collect(),
        env,
    };
    let grace = launch.check()?.grace;
    if values("KillSignal") != ["SIGTERM"] {
        return Err(format!("{origin}: Tocsin drains on KillSignal=SIGTERM"));
    }
    let stop = values("TimeoutStopSec")
        .last()
        .and_then(|v| systemd_timespan(v))
        .ok_or_else(|| format!("{origin}: set TimeoutStopSec (longer than the grace period)"))?;
    if stop <= grace + NATS_DRAIN {
        return Err(format!(
            "{origin}: TimeoutStopSec {stop:?} must exceed the grace period {grace:?} + {NATS_DRAIN:?} of NATS flush"
        ));
    }
    Ok(())
}

/// Checks a pod template's Tocsin containers; returns how many there were.
fn check_pod_template(origin: &str, spec: &Value) -> Result<usize, String> {
    let containers = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .ok_or_else(|| format!("{origin}: no containers"))?;
    let termination = spec
        .get("terminationGracePeriodSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(30);
    let mut count = 0;
    for c in containers {
        let name = str_at(c, &["name"]).unwrap_or("?");
        let origin = format!("{origin}, container {name}");
        let Some(launch) = container_launch(&origin, c) else {
            continue;
        };
        let program = launch.binary.clone();
        if !binaries().contains(&launch.binary) {
            return Err(format!(
                "{origin}: runs {program:?}; the binaries are {:?}",
                binaries()
            ));
        }
        if launch.binary == "nats-server" {
            continue;
        }
        count += 1;
        let Started { grace, admin, .. } = launch.check()?;
        if admin.ip().is_loopback() {
            return Err(format!(
                "{origin}: admin address {admin} is loopback; the kubelet cannot probe it"
            ));
        }
        let pre_stop = c
            .get("lifecycle")
            .and_then(|l| l.get("preStop"))
            .and_then(|p| p.get("sleep"))
            .and_then(|s| s.get("seconds"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let needed = grace + NATS_DRAIN + Duration::from_secs(pre_stop);
        if Duration::from_secs(termination) <= needed {
            return Err(format!(
                "{origin}: terminationGracePeriodSeconds {termination} must exceed {needed:?} \
                 (grace period + NATS flush + preStop)"
            ));
        }
        let admin_port = c
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .find(|p| p.get("containerPort").and_then(Value::as_u64) == Some(admin.port().into()))
            .and_then(|p| str_at(p, &["name"]))
            .ok_or_else(|| {
                format!(
                    "{origin}: no container port {} (the admin address)",
                    admin.port()
                )
            })?;
        for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
            let get = c.get(probe).and_then(|p| p.get("httpGet"));
            let port = get.and_then(|g| g.get("port"));
            let port_ok = port.and_then(Value::as_str) == Some(admin_port)
                || port.and_then(Value::as_u64) == Some(admin.port().into());
            if get.and_then(|g| str_at(g, &["path"])) != Some(path) || !port_ok {
                return Err(format!(
                    "{origin}: {probe} must GET {path} on the admin port {admin_port}"
                ));
            }
        }
    }
    Ok(count)
}

#[test]
fn every_yaml_file_parses_and_manifests_name_themselves() {
    let files = with_extension(&["yaml", "yml"]);
    assert!(
        files.contains(&root().join("config/tocsin.yaml")),
        "config/tocsin.yaml not found; is the walk broken? found {files:?}"
    );
    let mut problems = Vec::new();
    let mut manifests = 0;
    for path in &files {
        let docs = match yaml_documents(path) {
            Ok(d) => d,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        if docs.is_empty() {
            problems.push(format!("{}: no YAML document", rel(path)));
        }
        if !is_k8s_manifest(path) {
            continue;
        }
        for (i, doc) in docs.iter().enumerate() {
            manifests += 1;
            for key in [&["apiVersion"][..], &["kind"], &["metadata", "name"]] {
                if str_at(doc, key).is_none_or(str::is_empty) {
                    problems.push(format!(
                        "{}: document {}: no {}",
                        rel(path),
                        i + 1,
                        key.join(".")
                    ));
                }
            }
        }
    }
    assert!(
        manifests > 0,
        "no Kubernetes manifest found under deploy/k8s"
    );
    fail_on(problems);
}

#[test]
fn tocsin_configs_pass_the_real_loader() {
    let config = load_tocsin_config(
        "config/tocsin.yaml",
        &root().join("config/tocsin.yaml"),
        &Service::ALL,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        config.ingest.is_some(),
        "config/tocsin.yaml: no ingest section"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let embedded = tocsin_configs_in_configmaps();
    assert!(
        embedded.iter().any(|e| e.key == "tocsin.yaml"),
        "no ConfigMap under deploy/k8s carries a tocsin.yaml"
    );
    let docs = k8s_documents();
    let containers = tocsin_containers();
    let mut problems = Vec::new();
    let mut jetstream: Option<(&str, Value)> = None;
    for (i, e) in embedded.iter().enumerate() {
        // Every service creates or updates the streams at start: one
        // `jetstream:` section for all of them, or they undo each other.
        let js = serde_yaml_ng::from_str::<Value>(&e.text)
            .ok()
            .and_then(|v| v.get("jetstream").cloned())
            .unwrap_or(Value::Null);
        match &jetstream {
            None => jetstream = Some((&e.origin, js)),
            Some((first, j)) if *j != js => problems.push(format!(
                "{}: its `jetstream:` section differs from {first}'s",
                e.origin
            )),
            Some(_) => {}
        }
        // Loaded the way each container that starts with it loads it: for
        // its services, with the secret files it mounts.
        let users: Vec<&TocsinContainer> = containers
            .iter()
            .filter(|c| {
                mounted_config(&c.pod, &c.container, &c.started.config).ok()
                    == Some((e.configmap.clone(), e.key.clone()))
            })
            .collect();
        if users.is_empty() {
            problems.push(format!("{}: no Tocsin container starts with it", e.origin));
        }
        for (j, c) in users.into_iter().enumerate() {
            let origin = format!("{} as {} reads it", e.origin, c.origin);
            let work = dir.path().join(format!("{i}-{j}"));
            std::fs::create_dir_all(&work).expect("temp folder");
            let text = with_test_secret_files(&docs, &c.pod, &c.container, &e.text, &work);
            let file = work.join(&e.key);
            std::fs::write(&file, text).expect("write temp config");
            // Line numbers in an error count from the start of the embedded file.
            let config = match load_tocsin_config(&origin, &file, &c.started.services) {
                Ok(c) => c,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            if c.started.services.contains(&Service::Ingest) {
                match &config.ingest {
                    None => problems.push(format!("{origin}: no ingest section")),
                    Some(ingest) if !ingest.listen.ip().is_unspecified() => {
                        problems.push(format!(
                            "{origin}: ingest.listen {} is not reachable from the Service; use 0.0.0.0:8080",
                            ingest.listen
                        ))
                    }
                    Some(_) => {}
                }
            }
            if config.jetstream.replicas != 3 {
                problems.push(format!(
                    "{origin}: the cluster runs 3 NATS nodes; use jetstream.replicas: 3"
                ));
            }
        }
    }
    fail_on(problems);
}

/// The shipped users and permissions, included by every NATS config.
fn permissions_conf() -> PathBuf {
    root().join("deploy/nats/permissions.conf")
}

/// Every NATS config shipped: (origin, text), the files under deploy/nats
/// (but the included permissions.conf) and the `nats.conf` keys of
/// Kubernetes ConfigMaps, with the ConfigMap's other `.conf` keys (files
/// it includes).
fn nats_configs() -> Vec<(String, String, BTreeMap<String, String>)> {
    let mut out = Vec::new();
    let shared = BTreeMap::from([("permissions.conf".to_string(), read(&permissions_conf()))]);
    for path in with_extension(&["conf"]) {
        if !path.starts_with(root().join("deploy/nats")) || path == permissions_conf() {
            continue;
        }
        out.push((rel(&path), read(&path), shared.clone()));
    }
    for (path, doc) in k8s_documents() {
        if kind(&doc) != "ConfigMap" {
            continue;
        }
        let data: BTreeMap<String, String> = doc
            .get("data")
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
            .filter(|(k, _)| k.ends_with(".conf"))
            .collect();
        if let Some(conf) = data.get("nats.conf") {
            let mut included = data.clone();
            included.remove("nats.conf");
            out.push((
                format!("{} (nats.conf)", rel(&path)),
                conf.clone(),
                included,
            ));
        }
    }
    // Docker Compose's nodes: deploy/nats/permissions.conf mounted next to
    // their config, as it is.
    for path in with_extension(&["conf"]) {
        if path.starts_with(root().join("deploy/compose")) {
            out.push((rel(&path), read(&path), shared.clone()));
        }
    }
    // What the NATS Helm chart makes of nats-values.yaml.
    let values = root().join("deploy/k8s/nats-values.yaml");
    let doc = yaml_documents(&values)
        .unwrap_or_else(|e| panic!("{e}"))
        .pop()
        .unwrap_or(Value::Null);
    let (conf, files) = helm_values_nats_conf(&doc);
    out.push((
        format!("{} (as the chart renders it)", rel(&values)),
        conf,
        files,
    ));
    out
}

/// A node's nats.conf as the official NATS Helm chart (1.x) renders
/// `values` (deploy/k8s/nats-values.yaml), for what Tocsin relies on: the
/// client and monitoring ports, `config.cluster` (routes to every replica),
/// `config.jetstream` (file and memory store, its `merge`), and the
/// `*$include` keys of `config.merge` (sorted, as the chart does); with the
/// files of `configMap.merge.data` it mounts next to it (permissions.conf
/// from deploy/nats, as the install command's `--set-file` gives it, unless
/// the values hold one). The JetStream
/// folder is `@STORE@`, filled in by the test that runs `nats-server -t`.
pub(crate) fn helm_values_nats_conf(values: &Value) -> (String, BTreeMap<String, String>) {
    let at = |path: &[&str]| -> Option<&Value> {
        let mut cur = values;
        for k in path {
            cur = cur.get(*k)?;
        }
        Some(cur)
    };
    let scalar = |v: &Value| -> String {
        match v {
            Value::String(s) => s.clone(),
            other => serde_yaml_ng::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    };
    let enabled = |path: &[&str]| at(path).and_then(Value::as_bool) == Some(true);
    let mut conf = String::from(
        "server_name: $POD_NAME\nport: 4222\nhttp_port: 8222\n\
         lame_duck_grace_period: 10s\nlame_duck_duration: 30s\n",
    );
    if enabled(&["config", "cluster", "enabled"]) {
        let replicas = at(&["config", "cluster", "replicas"])
            .and_then(Value::as_u64)
            .unwrap_or(3);
        let routes: Vec<String> = (0..replicas)
            .map(|i| format!("nats://nats-{i}.nats-headless:6222"))
            .collect();
        conf.push_str(&format!(
            "cluster {{\n  name: nats\n  port: 6222\n  routes: [{}]\n}}\n",
            routes.join(", ")
        ));
    }
    if enabled(&["config", "jetstream", "enabled"]) {
        conf.push_str("jetstream {\n");
        if enabled(&["config", "jetstream", "fileStore", "enabled"]) {
            conf.push_str("  store_dir: @STORE@\n");
            if let Some(max) = at(&["config", "jetstream", "fileStore", "maxSize"]) {
                conf.push_str(&format!("  max_file_store: {}\n", scalar(max)));
            }
        }
        if enabled(&["config", "jetstream", "memoryStore", "enabled"]) {
            if let Some(max) = at(&["config", "jetstream", "memoryStore", "maxSize"]) {
                conf.push_str(&format!("  max_memory_store: {}\n", scalar(max)));
            }
        }
        for (k, v) in at(&["config", "jetstream", "merge"])
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
        {
            conf.push_str(&format!("  {}: {}\n", scalar(k), scalar(v)));
        }
        conf.push_str("}\n");
    }
    let mut includes: Vec<(String, String)> = at(&["config", "merge"])
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            let k = k.as_str()?;
            k.ends_with("$include").then(|| (k.to_string(), scalar(v)))
        })
        .collect();
    includes.sort();
    for (_, file) in includes {
        conf.push_str(&format!("include {file}\n"));
    }
    let mut files: BTreeMap<String, String> = at(&["configMap", "merge", "data"])
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
        .collect();
    // What `helm install --set-file` adds (the install command in the
    // values file, checked by tests/it/deploy_files.rs).
    files
        .entry("permissions.conf".to_string())
        .or_insert_with(|| read(&permissions_conf()));
    (conf, files)
}

/// The passwords deploy/nats/passwords.sh makes, as (variable, value).
fn made_passwords(dir: &Path) -> Vec<(String, String)> {
    let file = dir.join("nats-server.env");
    let out = Command::new(root().join("deploy/nats/passwords.sh"))
        .arg(&file)
        .output()
        .expect("run deploy/nats/passwords.sh");
    assert!(
        out.status.success(),
        "deploy/nats/passwords.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    read(&file)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A throw-away CA and one node certificate (for `nats-1` and the test's
/// address, server and client use, as deploy/README.md makes them), written
/// as the files the cluster configs name.
fn throwaway_tls(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("node key");
    let mut node = CertificateParams::new(vec!["nats-1".to_string()]).expect("node params");
    node.subject_alt_names
        .push(SanType::IpAddress("10.0.0.11".parse().expect("address")));
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let node = node
        .signed_by(&key, &ca, &ca_key)
        .expect("node certificate");
    std::fs::create_dir_all(dir).expect("tls folder");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("ca.pem");
    std::fs::write(dir.join("nats.pem"), node.pem()).expect("nats.pem");
    std::fs::write(dir.join("nats-key.pem"), key.serialize_pem()).expect("nats-key.pem");
}

/// Where systemd's LoadCredential= puts nats-server's files (the TLS drop-in).
const NATS_CREDENTIALS: &str = "/run/credentials/nats-server.service/";

#[test]
fn nats_configs_fsync_every_write_and_pass_nats_server_check() {
    let mut problems = Vec::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = dir.path().join("tls");
    throwaway_tls(&tls);
    let mut env = made_passwords(dir.path());
    // A cluster node's own address (nats-server.env), and the pod's name
    // (the StatefulSet sets it).
    env.push(("TOCSIN_NATS_ADDRESS".into(), "10.0.0.11".into()));
    env.push(("POD_NAME".into(), "nats-0".into()));
    // A Docker Compose node's name (compose.yaml sets it).
    env.push(("NATS_SERVER_NAME".into(), "nats-1".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let configs = nats_configs();
    for (i, (origin, text, included)) in configs.iter().enumerate() {
        problems.extend(check_sync_interval(origin, text).err());
        // Installed as it says: next to the files it includes.
        let folder = dir.path().join(i.to_string());
        std::fs::create_dir_all(&folder).expect("temp folder");
        for (name, content) in included {
            std::fs::write(folder.join(name), content).expect("write included file");
        }
        // dev.sh fills these in before starting it.
        let text = text
            .replace("@PORT@", "14222")
            .replace("@STORE@", &dir.path().join("store").display().to_string())
            .replace(NATS_CREDENTIALS, &format!("{}/", tls.display()));
        let file = folder.join("nats.conf");
        std::fs::write(&file, text).expect("write temp config");
        problems.extend(nats_server_test_config(origin, &file, &env).err());
    }
    assert!(
        configs.len() >= 5,
        "only {} NATS configs found; is the walk broken?",
        configs.len()
    );
    fail_on(problems);
}

#[test]
fn systemd_units_start_shipped_binaries_and_outlast_the_grace_period() {
    let units = with_extension(&["service"]);
    assert!(!units.is_empty(), "no systemd unit found under deploy/");
    fail_on(units.iter().filter_map(|u| check_unit(u).err()).collect());
}

#[test]
fn expected_units_are_shipped_each_on_its_own_admin_port() {
    let mut problems = Vec::new();
    let mut ports: BTreeMap<u16, &str> = BTreeMap::new();
    for unit in UNITS {
        let path = root().join(format!("deploy/systemd/{unit}.service"));
        if !path.is_file() {
            problems.push(format!("{} is missing", rel(&path)));
            continue;
        }
        let sections = parse_unit(&read(&path));
        let service = sections.get("Service").cloned().unwrap_or_default();
        let exec = service
            .iter()
            .find(|(k, _)| k == "ExecStart")
            .and_then(|(_, v)| v.split_whitespace().next())
            .unwrap_or_default();
        if Path::new(exec).file_name().and_then(|n| n.to_str()) != Some(unit) {
            problems.push(format!(
                "{}: ExecStart runs {exec:?}, not {unit}",
                rel(&path)
            ));
        }
        // Several units may run on one host (not next to tocsin.service,
        // but keep that one apart too).
        let admin = unit_env(&service)
            .get("TOCSIN_ADMIN_LISTEN")
            .cloned()
            .unwrap_or_else(|| DEFAULT_ADMIN.to_string());
        match admin.parse::<SocketAddr>() {
            Ok(a) => {
                if let Some(other) = ports.insert(a.port(), unit) {
                    problems.push(format!(
                        "{}: admin port {} is {other}.service's too",
                        rel(&path),
                        a.port()
                    ));
                }
            }
            Err(e) => problems.push(format!("{}: TOCSIN_ADMIN_LISTEN={admin}: {e}", rel(&path))),
        }
    }
    fail_on(problems);
}

#[test]
fn expected_kubernetes_workloads_are_shipped() {
    let docs = k8s_documents();
    let mut problems = Vec::new();
    for (k, name, binary) in WORKLOADS {
        let Some((path, doc)) = docs
            .iter()
            .find(|(_, d)| kind(d) == *k && str_at(d, &["metadata", "name"]) == Some(name))
        else {
            problems.push(format!("no {k} {name} under deploy/k8s"));
            continue;
        };
        let runs = pod_spec(doc)
            .and_then(|s| s.get("containers"))
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|c| container_launch("", c))
            .any(|l| l.binary == *binary);
        if !runs {
            problems.push(format!(
                "{}: {k} {name} runs no {binary} container",
                rel(path)
            ));
        }
    }
    fail_on(problems);
}

#[test]
fn kubernetes_workloads_start_tocsin_the_way_the_cli_expects() {
    let mut problems = Vec::new();
    let mut tocsin_containers = 0;
    for (path, doc) in k8s_documents() {
        if !["Deployment", "StatefulSet", "DaemonSet", "Job"].contains(&kind(&doc)) {
            continue;
        }
        let name = str_at(&doc, &["metadata", "name"]).unwrap_or("?");
        let origin = format!("{} ({} {name})", rel(&path), kind(&doc));
        let Some(spec) = pod_spec(&doc) else {
            problems.push(format!("{origin}: no spec.template.spec"));
            continue;
        };
        match check_pod_template(&origin, spec) {
            Ok(n) => tocsin_containers += n,
            Err(e) => problems.push(e),
        }
    }
    fail_on(problems);
    assert!(tocsin_containers > 0, "no Kubernetes workload runs Tocsin");
}

#[test]
fn kubernetes_wiring_is_consistent() {
    let docs = k8s_documents();
    let named = |k: &str, n: &str| {
        docs.iter()
            .any(|(_, d)| kind(d) == k && str_at(d, &["metadata", "name"]) == Some(n))
    };
    let mut problems = Vec::new();

    // Every Tocsin container starts with a config from a ConfigMap, and is
    // given every variable that config needs; every Secret a variable or a
    // volume comes from is shaped by secret.example.yaml.
    let embedded = tocsin_configs_in_configmaps();
    for (path, doc) in &docs {
        let Some(spec) = pod_spec(doc) else {
            continue;
        };
        for c in containers(spec) {
            let runs_tocsin = c
                .get("command")
                .and_then(Value::as_sequence)
                .and_then(|s| s.first())
                .and_then(Value::as_str)
                .is_some_and(|p| {
                    p.rsplit('/')
                        .next()
                        .is_some_and(|b| b.starts_with("tocsin"))
                });
            let origin = format!(
                "{}, container {}",
                rel(path),
                str_at(c, &["name"]).unwrap_or("?")
            );
            let env = c
                .get("env")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            for e in &env {
                if let Some(secret) = str_at(e, &["valueFrom", "secretKeyRef", "name"]) {
                    let key = str_at(e, &["valueFrom", "secretKeyRef", "key"]).unwrap_or("");
                    let shaped = docs.iter().any(|(_, d)| {
                        kind(d) == "Secret"
                            && str_at(d, &["metadata", "name"]) == Some(secret)
                            && (d.get("stringData").and_then(|s| s.get(key)).is_some()
                                || d.get("data").and_then(|s| s.get(key)).is_some())
                    });
                    if !shaped {
                        problems.push(format!(
                            "{origin}: Secret {secret} key {key} is in no example Secret"
                        ));
                    }
                }
                if let Some(cm) = str_at(e, &["valueFrom", "configMapKeyRef", "name"]) {
                    if !named("ConfigMap", cm) {
                        problems.push(format!("{origin}: no ConfigMap {cm}"));
                    }
                }
            }
            if !runs_tocsin {
                continue;
            }
            let Some(started) = container_launch(&origin, c).and_then(|l| l.check().ok()) else {
                continue; // reported by kubernetes_workloads_start_tocsin_the_way_the_cli_expects
            };
            let config = match mounted_config(spec, c, &started.config) {
                Ok((cm, key)) => embedded.iter().find(|e| e.configmap == cm && e.key == key),
                Err(e) => {
                    problems.push(format!("{origin}: {e}"));
                    continue;
                }
            };
            let Some(config) = config else {
                problems.push(format!(
                    "{origin}: --config {} is in no ConfigMap here",
                    started.config.display()
                ));
                continue;
            };
            for name in needed_env_refs(&config.text, &started.services) {
                if !env
                    .iter()
                    .any(|e| str_at(e, &["name"]) == Some(name.as_str()))
                {
                    problems.push(format!(
                        "{origin}: {} needs ${{{name}}}; add it to env",
                        config.key
                    ));
                }
            }
        }
        for v in spec
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            if let Some(cm) = str_at(v, &["configMap", "name"]) {
                if !named("ConfigMap", cm) {
                    problems.push(format!("{}: volume from missing ConfigMap {cm}", rel(path)));
                }
            }
            if let Some(secret) = v.get("secret") {
                let name = str_at(secret, &["secretName"]).unwrap_or("");
                match example_secret_keys(&docs, name) {
                    None => problems.push(format!(
                        "{}: volume from Secret {name:?}, which no example Secret shapes",
                        rel(path)
                    )),
                    Some(keys) => {
                        for item in secret
                            .get("items")
                            .and_then(Value::as_sequence)
                            .into_iter()
                            .flatten()
                        {
                            let key = str_at(item, &["key"]).unwrap_or("");
                            if !keys.contains(key) {
                                problems.push(format!(
                                    "{}: Secret {name} key {key} is in no example Secret",
                                    rel(path)
                                ));
                            }
                        }
                    }
                }
            }
        }
        if kind(doc) == "StatefulSet" {
            let svc = str_at(doc, &["spec", "serviceName"]).unwrap_or("");
            if !named("Service", svc) {
                problems.push(format!(
                    "{}: serviceName {svc:?} is no Service here",
                    rel(path)
                ));
            }
        }
    }

    // Example Secrets hold placeholders only.
    for (path, doc) in &docs {
        if kind(doc) != "Secret" {
            continue;
        }
        if !path.to_string_lossy().contains(".example.") {
            problems.push(format!(
                "{}: a Secret outside a *.example.yaml file",
                rel(path)
            ));
        }
        for (k, v) in doc
            .get("stringData")
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
        {
            if v.as_str() != Some(PLACEHOLDER) {
                problems.push(format!(
                    "{}: {} must be {PLACEHOLDER}",
                    rel(path),
                    k.as_str().unwrap_or("?")
                ));
            }
        }
        if doc.get("data").is_some() {
            problems.push(format!(
                "{}: use stringData with {PLACEHOLDER} values",
                rel(path)
            ));
        }
    }

    // kustomization.yaml applies every manifest except the examples.
    let k8s = root().join("deploy/k8s/base");
    if let Some((_, kust)) = docs.iter().find(|(_, d)| kind(d) == "Kustomization") {
        let listed: BTreeSet<String> = kust
            .get("resources")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        for (path, _) in &docs {
            let file = path
                .strip_prefix(&k8s)
                .unwrap_or(path)
                .display()
                .to_string();
            let example = file.contains(".example.");
            if file == "kustomization.yaml" {
                continue;
            }
            if example && listed.contains(&file) {
                problems.push(format!("kustomization.yaml applies the example {file}"));
            }
            if !example && !listed.contains(&file) {
                problems.push(format!("kustomization.yaml does not list {file}"));
            }
        }
        for file in &listed {
            if !k8s.join(file).is_file() {
                problems.push(format!("kustomization.yaml lists missing {file}"));
            }
        }
    }
    fail_on(problems);
}

/// YAML text without comment lines (so commented examples need no env).
pub(crate) fn without_comment_lines(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn systemd_env_example_holds_placeholders_and_every_needed_variable() {
    let example = root().join("deploy/systemd/tocsin.env.example");
    let text = read(&example);
    let mut problems = Vec::new();
    let mut mentioned = BTreeSet::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let commented = line.starts_with('#');
        let body = line.trim_start_matches('#').trim();
        let Some((name, value)) = body.split_once('=') else {
            if !commented {
                problems.push(format!("{}: {line:?} is not NAME=value", rel(&example)));
            }
            continue;
        };
        if !name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            if !commented {
                problems.push(format!("{}: {line:?} is not NAME=value", rel(&example)));
            }
            continue;
        }
        mentioned.insert(name.to_string());
        let secret = ["TOKEN", "PASSWORD", "SECRET", "KEY", "SEED"]
            .iter()
            .any(|s| name.ends_with(s));
        if secret && value != PLACEHOLDER {
            problems.push(format!("{}: {name} must be {PLACEHOLDER}", rel(&example)));
        }
    }
    let config = read(&root().join("config/tocsin.yaml"));
    for name in required_env_refs(&without_comment_lines(&config)) {
        if !mentioned.contains(&name) {
            problems.push(format!(
                "{}: config/tocsin.yaml needs ${{{name}}}; add it",
                rel(&example)
            ));
        }
    }
    fail_on(problems);
}

/// A NATS config with its `include`s inlined from `files`, without
/// comments.
fn nats_conf_resolved(text: &str, files: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for line in nats_conf_lines(text) {
        match line.strip_prefix("include") {
            Some(rest) if rest.starts_with([' ', '\t']) => {
                let file = rest.trim().trim_matches(['"', '\'']);
                let name = file.trim_start_matches("./");
                let included = files.get(name).cloned().unwrap_or_default();
                out.push_str(&nats_conf_resolved(&included, files));
            }
            _ => {
                out.push_str(&line);
                out.push('\n');
            }
        }
    }
    out
}

/// Whether a NATS config lets only known users in: an `authorization`
/// block with users, and no `no_auth_user` that would let anonymous
/// clients in as someone.
fn check_authorization(origin: &str, resolved: &str) -> Result<(), String> {
    let has_block = resolved.lines().any(|l| {
        l.strip_prefix("authorization")
            .is_some_and(|r| r.trim_start_matches([' ', ':', '=']).starts_with('{'))
    });
    let has_users = resolved.lines().any(|l| l.starts_with("users"));
    if !has_block || !has_users {
        return Err(format!(
            "{origin}: no `authorization {{ users: [...] }}`; anyone who reaches NATS could inject alerts and read pages"
        ));
    }
    if resolved.lines().any(|l| l.starts_with("no_auth_user")) {
        return Err(format!(
            "{origin}: `no_auth_user` lets clients without credentials in"
        ));
    }
    Ok(())
}

/// `key: value` lines of a (resolved) NATS config whose key is `key`, with
/// the value unquoted.
fn nats_values<'a>(resolved: &'a str, key: &str) -> Vec<&'a str> {
    resolved
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(key)?;
            if !rest.starts_with([' ', ':', '=']) {
                return None;
            }
            Some(
                rest.trim_start_matches([' ', ':', '='])
                    .trim_matches(['"', '\'', ' ']),
            )
        })
        .collect()
}

#[test]
fn every_shipped_nats_config_requires_authorization() {
    let mut problems = Vec::new();
    let configs = nats_configs();
    for (origin, text, included) in &configs {
        let resolved = nats_conf_resolved(text, included);
        problems.extend(check_authorization(origin, &resolved).err());
        // Listening: loopback on one box, an explicit address on a cluster
        // node; only a pod listens on every interface of its own (see the
        // comment in nats-statefulset.yaml).
        let pod = origin.contains("deploy/k8s") || origin.contains("deploy/compose");
        for host in nats_values(&resolved, "host")
            .into_iter()
            .chain(nats_values(&resolved, "listen"))
        {
            if ["0.0.0.0", "::", "[::]", ""].contains(&host) || host.starts_with("0.0.0.0:") {
                problems.push(format!("{origin}: listens on every interface ({host:?})"));
            }
        }
        if !pod && !resolved.lines().any(|l| l.starts_with("host")) {
            problems.push(format!(
                "{origin}: no `host`: nats-server would listen on every interface"
            ));
        }
        // A cluster outside Kubernetes crosses networks: TLS for clients,
        // mutual TLS between nodes.
        if origin.contains("deploy/nats/cluster") {
            let tls_blocks = resolved.lines().filter(|l| l.starts_with("tls")).count();
            let verify = nats_values(&resolved, "verify").contains(&"true");
            if tls_blocks < 2 || !verify {
                problems.push(format!(
                    "{origin}: a cluster node needs `tls` for clients and `cluster.tls` with `verify: true`"
                ));
            }
        }
    }
    assert!(
        configs.len() >= 5,
        "only {} NATS configs found",
        configs.len()
    );
    fail_on(problems);
}

#[test]
fn the_nats_users_are_tocsins_identities_and_kubernetes_carries_the_same_permissions() {
    let shipped = read(&permissions_conf());
    let users: BTreeSet<String> = nats_conf_lines(&shipped)
        .iter()
        .filter_map(|l| {
            let rest = l.split("user:").nth(1)?;
            Some(rest.split(',').next()?.trim().to_string())
        })
        .collect();
    let identities: BTreeSet<String> = tocsin_runtime::nats::IDENTITIES
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        users, identities,
        "deploy/nats/permissions.conf's users must be the identities Tocsin connects as"
    );
    // passwords.sh makes a password for each (and nothing else).
    let dir = tempfile::tempdir().expect("temp dir");
    let made: BTreeSet<String> = made_passwords(dir.path())
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let wanted: BTreeSet<String> = identities
        .iter()
        .map(|i| tocsin_tests::nats::password_variable(i))
        .collect();
    assert_eq!(made, wanted);

    let mut copies = 0;
    for (origin, _, included) in nats_configs() {
        if let Some(copy) = included.get("permissions.conf") {
            copies += 1;
            assert!(
                *copy == shipped,
                "{origin}: its permissions.conf differs from deploy/nats/permissions.conf; copy it again"
            );
        }
    }
    assert!(copies >= 5, "only {copies} configs carry permissions.conf");
}

#[test]
fn only_tocsins_pods_reach_nats_in_kubernetes() {
    let docs = k8s_documents();
    let labels = |v: &Value, path: &[&str]| -> BTreeMap<String, String> {
        let mut cur = v;
        for k in path {
            match cur.get(*k) {
                Some(next) => cur = next,
                None => return BTreeMap::new(),
            }
        }
        cur.as_mapping()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
            .collect()
    };
    let nats_pods = docs
        .iter()
        .find(|(_, d)| kind(d) == "StatefulSet" && str_at(d, &["metadata", "name"]) == Some("nats"))
        .map(|(_, d)| labels(d, &["spec", "template", "metadata", "labels"]))
        .expect("the nats StatefulSet");
    let tocsin_pods: Vec<BTreeMap<String, String>> = docs
        .iter()
        .filter(|(_, d)| kind(d) == "Deployment")
        .map(|(_, d)| labels(d, &["spec", "template", "metadata", "labels"]))
        .collect();
    let selects = |selector: &BTreeMap<String, String>, pod: &BTreeMap<String, String>| {
        !selector.is_empty() && selector.iter().all(|(k, v)| pod.get(k) == Some(v))
    };
    let policy = docs
        .iter()
        .find(|(_, d)| {
            kind(d) == "NetworkPolicy"
                && selects(
                    &labels(d, &["spec", "podSelector", "matchLabels"]),
                    &nats_pods,
                )
        })
        .map(|(_, d)| d)
        .expect("no NetworkPolicy selects the NATS pods: anything in the cluster could connect");
    let types = policy.get("spec").and_then(|s| s.get("policyTypes"));
    assert!(
        types
            .and_then(Value::as_sequence)
            .is_some_and(|t| t.iter().any(|t| t.as_str() == Some("Ingress"))),
        "the NATS NetworkPolicy must restrict Ingress"
    );
    // Each rule: which pods, which ports.
    let mut client_from = Vec::new();
    let mut cluster_from = Vec::new();
    for rule in policy
        .get("spec")
        .and_then(|s| s.get("ingress"))
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        let ports: Vec<u64> = rule
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("port").and_then(Value::as_u64))
            .collect();
        assert!(
            !ports.is_empty(),
            "a rule of the NATS NetworkPolicy opens every port"
        );
        let from: Vec<&Value> = rule
            .get("from")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .collect();
        assert!(
            !from.is_empty(),
            "a rule of the NATS NetworkPolicy admits everyone"
        );
        for f in from {
            assert!(
                f.get("ipBlock").is_none() && f.get("namespaceSelector").is_none(),
                "the NATS NetworkPolicy admits more than pods of this namespace: {f:?}"
            );
            let selector = labels(f, &["podSelector", "matchLabels"]);
            for port in &ports {
                match port {
                    4222 => client_from.push(selector.clone()),
                    6222 => cluster_from.push(selector.clone()),
                    other => panic!("the NATS NetworkPolicy opens port {other}"),
                }
            }
        }
    }
    // 4222: every Tocsin pod, and the NATS pods not; 6222: NATS pods only.
    for pod in &tocsin_pods {
        assert!(
            client_from.iter().any(|s| selects(s, pod)),
            "a Tocsin pod ({pod:?}) cannot reach NATS on 4222"
        );
    }
    assert!(!client_from.is_empty() && !cluster_from.is_empty());
    for s in &cluster_from {
        assert!(selects(s, &nats_pods), "6222 is open to {s:?}");
        assert!(
            tocsin_pods.iter().all(|p| !selects(s, p)),
            "6222 is open to Tocsin's pods"
        );
    }
}
