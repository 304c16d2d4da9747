//! `bench all`'s scale-out scenario: the partitioned layout that
//! ARCHITECTURE.md's "Scaling out" designs, measured as a model on this
//! machine. Tocsin does not partition incidents yet; what can be measured
//! is what the design rests on: dedup keys that never meet can be decided
//! by independent writers, each with its own stream leader. So each
//! partition here is a complete `bench incidents` run in a process of its
//! own (its own nats-server, incidents service and sled store) over its
//! own groups, as if ingest had routed the alerts by the hash of their
//! dedup key; 1 partition decides all the alerts, 2 partitions half each,
//! started together once both pre-loads are in. A second layout puts the 2
//! partitions on one nats-server, each in an account of its own (its own
//! JetStream: streams of the same names, apart), as the design's
//! per-partition streams would share the one server of a small box: its
//! CPU and its disk's syncs. What the model leaves out
//! (and a built partitioning would pay): silences and inhibition read
//! across partitions, incident numbers from one sequence, consumers that
//! read every partition. So the ratio is an upper bound for this machine.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{bail, Context as _};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

use super::{
    all::{Figure, Outcome},
    READY,
};

const TOCSIN_SIDE: &str = "2 partitions by dedup key (each its own nats-server and incidents service, half the groups each, started together)";
const SHARED_SIDE: &str = "2 partitions by dedup key on one nats-server (an account each: their own streams; each its own incidents service, half the groups each, started together)";
const PEER: &str = "1 partition (all the groups)";
/// A partition's run, pre-load and nats-server start included.
const RUN_LIMIT: Duration = Duration::from_secs(900);

pub async fn scale_out(quick: bool, reps: u32) -> anyhow::Result<Outcome> {
    let (alerts, groups) = if quick {
        (10_000, 1_000)
    } else {
        (100_000, 10_000)
    };
    println!(
        "{alerts} alerts over {groups} groups (`bench incidents`' load, a message per alert) decided by 1 partition, \
         then by 2 partitions with half of each; alerts/s = all the alerts over the time until the last partition decided its last"
    );
    let mut rate = Figure::new(
        "scale-out, incidents alone",
        "alerts/s decided",
        "alerts/s",
        "higher",
        PEER,
    )
    .side(TOCSIN_SIDE);
    let mut shared_rate = Figure::new(
        "scale-out, incidents alone, one nats-server",
        "alerts/s decided",
        "alerts/s",
        "higher",
        PEER,
    )
    .side(SHARED_SIDE);
    let mut outcome = Outcome::default();
    for rep in 1..=reps {
        for (partitions, shared) in [(1u32, false), (2, false), (2, true)] {
            let run = partitions_run(partitions, alerts, groups, shared).await?;
            println!(
                "  {rep:>3}  {partitions} partition(s){}: {:.0} alerts/s ({})",
                if shared { " on one nats-server" } else { "" },
                run.rate,
                run.each
                    .iter()
                    .map(|(n, secs)| format!("{n} in {secs:.2}s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            match (partitions, shared) {
                (1, _) => {
                    rate.push(false, run.rate);
                    shared_rate.push(false, run.rate);
                }
                (_, false) => rate.push(true, run.rate),
                (_, true) => shared_rate.push(true, run.rate),
            }
            // Each partition's share and its sentinel.
            let expected = u64::from(alerts / partitions + 1) * u64::from(partitions);
            if run.decided != expected {
                outcome.problems.push(format!(
                    "scale-out, {partitions} partition(s){}: {} alerts decided, not {expected} (with a sentinel each)",
                    if shared { " on one nats-server" } else { "" },
                    run.decided,
                ));
            }
        }
    }
    outcome.figures.push(rate);
    outcome.figures.push(shared_rate);
    Ok(outcome)
}

struct PartitionsRun {
    /// Alerts decided by every partition over the slowest one's time.
    rate: f64,
    decided: u64,
    /// Per partition: alerts decided, seconds.
    each: Vec<(u64, f64)>,
}

/// Runs `partitions` copies of `bench incidents`, each over its share of
/// the alerts and groups, and starts their services together; each with a
/// private nats-server, or with `shared` all on one ([`SharedNats`]).
async fn partitions_run(
    partitions: u32,
    alerts: u32,
    groups: u32,
    shared: bool,
) -> anyhow::Result<PartitionsRun> {
    let exe = std::env::current_exe().context("the bench binary's path")?;
    let dir = tempfile::Builder::new()
        .prefix("tocsin-bench-scale-")
        .tempdir()
        .context("temp dir")?;
    let nats = match shared {
        true => Some(SharedNats::start(dir.path(), partitions).await?),
        false => None,
    };
    let mut children = Vec::new();
    for p in 0..partitions {
        children.push(spawn(
            &exe,
            p,
            alerts / partitions,
            groups / partitions,
            dir.path(),
            nats.as_ref().map(|n| n.url(p)),
        )?);
    }
    let work = async {
        // Every pre-load in, then all start at once.
        let mut outputs = Vec::new();
        for (child, lines) in &mut children {
            match read_until_ready(child, lines).await {
                Ok(out) => outputs.push(out),
                Err(e) => bail!("{e:#}{}", stderr_tail(dir.path())),
            }
        }
        for (child, _) in &mut children {
            let stdin = child.stdin.as_mut().context("a partition's stdin")?;
            stdin.write_all(b"go\n").await?;
            stdin.flush().await?;
        }
        let mut each = Vec::new();
        for ((child, lines), mut out) in children.iter_mut().zip(outputs) {
            while let Some(line) = lines.next_line().await? {
                out.push_str(&line);
                out.push('\n');
            }
            let status = child.wait().await?;
            if !status.success() {
                bail!(
                    "a partition's `bench incidents` failed ({status}):\n{out}{}",
                    stderr_tail(dir.path())
                );
            }
            each.push(
                decided(&out).with_context(|| format!("no `alerts decided` line in:\n{out}"))?,
            );
        }
        anyhow::Ok(each)
    };
    let each = tokio::time::timeout(RUN_LIMIT, work)
        .await
        .with_context(|| format!("{partitions} partition(s) not done within {RUN_LIMIT:?}"))??;
    let decided: u64 = each.iter().map(|(n, _)| n).sum();
    let slowest = each.iter().map(|(_, s)| *s).fold(0.0, f64::max);
    Ok(PartitionsRun {
        rate: decided as f64 / slowest,
        decided,
        each,
    })
}

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

fn spawn(
    exe: &Path,
    partition: u32,
    alerts: u32,
    groups: u32,
    dir: &Path,
    nats_url: Option<String>,
) -> anyhow::Result<(Child, Lines)> {
    let log = dir.join(format!("partition-{partition}.stderr"));
    let mut command = Command::new(exe);
    command.args(["incidents", "--live-alerts", "0", "--receipts", "0"]);
    if let Some(url) = nats_url {
        command.args(["--nats-url", &url]);
    }
    let mut child = command
        .args([
            "--alerts",
            &alerts.to_string(),
            "--groups",
            &groups.to_string(),
        ])
        .arg("--start-on-stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(
            std::fs::File::create(&log)
                .with_context(|| format!("cannot create {}", log.display()))?,
        )
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let stdout = child.stdout.take().context("the child's stdout")?;
    Ok((child, BufReader::new(stdout).lines()))
}

/// One nats-server for every partition of a run, each partition an
/// account of its own with JetStream (`sync_interval: always`, as the
/// tests' servers), so their streams share the server's CPU and its
/// disk's syncs but not their names. Killed when dropped.
struct SharedNats {
    _child: Child,
    port: u16,
    passwords: Vec<String>,
}

impl SharedNats {
    async fn start(dir: &Path, partitions: u32) -> anyhow::Result<SharedNats> {
        let bin = tocsin_tests::nats::nats_server_bin().map_err(anyhow::Error::msg)?;
        let port = tocsin_tests::ports::free_port();
        let passwords: Vec<String> = (0..partitions)
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect();
        let accounts: String = passwords
            .iter()
            .enumerate()
            .map(|(p, pw)| {
                format!(
                    "  P{p}: {{ jetstream: enabled, users: [{{user: p{p}, password: \"{pw}\"}}] }}\n"
                )
            })
            .collect();
        let conf = dir.join("shared-nats.conf");
        std::fs::write(
            &conf,
            format!(
                "host: 127.0.0.1\nport: {port}\n\
                 jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n}}\n\
                 accounts {{\n{accounts}}}\n",
                store = dir.join("shared-js").display(),
            ),
        )
        .with_context(|| format!("cannot write {}", conf.display()))?;
        let log = dir.join("shared-nats.log");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&log)
                    .with_context(|| format!("cannot create {}", log.display()))?,
            )
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let nats = SharedNats {
            _child: child,
            port,
            passwords,
        };
        // Ready once every account's JetStream answers.
        for p in 0..partitions {
            let url = nats.url(p);
            let ready = tocsin_tests::eventually_within(Duration::from_secs(20), || async {
                let client = tocsin_tests::nats::connect_url(&url)
                    .await
                    .map_err(|e| e.to_string())?;
                async_nats::jetstream::new(client)
                    .query_account()
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
            if let Err(e) = ready {
                bail!(
                    "the shared nats-server did not answer within 20s ({e}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
        Ok(nats)
    }

    /// Partition `p`'s URL, with its account's user and password.
    fn url(&self, p: u32) -> String {
        format!(
            "nats://p{p}:{}@127.0.0.1:{}",
            self.passwords[p as usize], self.port
        )
    }
}

/// Reads a partition's output until it says it is ready; what it printed.
async fn read_until_ready(child: &mut Child, lines: &mut Lines) -> anyhow::Result<String> {
    let mut out = String::new();
    while let Some(line) = lines.next_line().await? {
        let ready = line.starts_with(READY);
        out.push_str(&line);
        out.push('\n');
        if ready {
            return Ok(out);
        }
    }
    let status = child.wait().await?;
    bail!("a partition's `bench incidents` ended ({status}) before its pre-load was in:\n{out}")
}

/// The last lines the partitions wrote to stderr, to show with a failure.
fn stderr_tail(dir: &Path) -> String {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "stderr") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("\n{}:\n", path.display()));
            for l in &lines[lines.len().saturating_sub(20)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

/// `  service: N alerts decided in X.XXs: ...` -> (N, X).
fn decided(out: &str) -> Option<(u64, f64)> {
    out.lines().find_map(|line| {
        let rest = line.trim_start().strip_prefix("service:")?.trim_start();
        let (n, rest) = rest.split_once(" alerts decided in ")?;
        let (secs, _) = rest.split_once('s')?;
        Some((n.trim().parse().ok()?, secs.trim().parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_decided_line_is_read() {
        let out = "service: incidents alone, in-process\n  service: 10001 alerts decided in 2.50s: 4000 alerts/s\n";
        assert_eq!(super::decided(out), Some((10_001, 2.5)));
    }
}
