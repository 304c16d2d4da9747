//! Property tests of the core's exactly-once rule: the service publishes an
//! input's entries one at a time and folds each in once JetStream has it,
//! so a crash can leave any prefix applied. Deciding the input again must
//! then give exactly the rest; and the projection must be what replaying
//! the log gives.

use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use tocsin_proto::{
    command::{Action, Command, IncidentRef},
    incident::{Actor, Cause, EventKind, LogEntry},
    Alert, AlertStatus, Envelope, Fingerprint, Labels, Origin, SourceKind,
};

use crate::{
    compile,
    core::{join_run, AlertPos, CoreConfig, Decider, Projection},
    IncidentsConfig,
};

#[derive(Clone, Debug)]
enum Op {
    Alert {
        group: u8,
        instance: u8,
        firing: bool,
    },
    Ack(u64),
    Resolve(u64),
    Snooze {
        number: u64,
        minutes: u64,
    },
    Reopen(u64),
    Unack(u64),
    /// Moves the clock this many minutes and fires what is due.
    Tick(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 0u8..3, any::<bool>()).prop_map(|(group, instance, firing)| Op::Alert {
            group,
            instance,
            firing
        }),
        1 => (1u64..6).prop_map(Op::Ack),
        1 => (1u64..6).prop_map(Op::Resolve),
        1 => (1u64..6, 1u64..90).prop_map(|(number, minutes)| Op::Snooze { number, minutes }),
        1 => (1u64..6).prop_map(Op::Reopen),
        1 => (1u64..6).prop_map(Op::Unack),
        2 => (1i64..200).prop_map(Op::Tick),
    ]
}

fn alert(group: u8, instance: u8, firing: bool, at: Timestamp) -> Alert {
    let labels: Labels = [
        ("alertname".to_string(), format!("Group{group}")),
        ("instance".to_string(), format!("host{instance}:9100")),
        // Severities differ, so an incident's is the highest of several.
        (
            "severity".to_string(),
            ["critical", "warning", "info"][instance as usize % 3].to_string(),
        ),
    ]
    .into_iter()
    .collect();
    let group_labels: Labels = labels
        .iter()
        .filter(|(k, _)| k.as_str() == "alertname")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let status = if firing {
        AlertStatus::Firing
    } else {
        AlertStatus::Resolved
    };
    Alert {
        fingerprint: Fingerprint::from_labels(&labels),
        status,
        labels,
        annotations: Labels::new(),
        starts_at: at,
        ends_at: (!firing).then_some(at),
        generator_url: None,
        dedup_key: None,
        origin: Origin {
            kind: Some(SourceKind::Alertmanager),
            group_labels,
            ..Default::default()
        },
    }
}

/// The default config with two inhibition rules: firing `Group0` alerts
/// inhibit every critical alert of their instance (themselves included on
/// both sides, so the two-sided case is at work), and `Group1` alerts
/// inhibit `Group2` alerts whatever their labels.
fn config() -> IncidentsConfig {
    let inhibit_rules = serde_json::from_str(
        r#"[
            {"source_matchers": ["alertname=\"Group0\""], "target_matchers": ["severity=\"critical\""], "equal": ["instance"]},
            {"name": "any", "source_matchers": ["alertname=\"Group1\""], "target_matchers": ["alertname=\"Group2\""]}
        ]"#,
    )
    .expect("the rules parse");
    IncidentsConfig {
        inhibit_rules,
        ..Default::default()
    }
}

fn command(n: u64, action: impl Fn(IncidentRef) -> Action) -> Command {
    Command::new(Actor::new("ana", "cli"), action(IncidentRef::Number(n)))
}

/// One input, decided against `proj`.
fn decide(cfg: &CoreConfig, proj: &Projection, input: &Input, now: Timestamp) -> Vec<LogEntry> {
    decide_with(&Decider::new(cfg, proj), input, now)
}

fn decide_with(d: &Decider<'_>, input: &Input, now: Timestamp) -> Vec<LogEntry> {
    match input {
        Input::Alert(cause, env) => d.alert(cause.clone(), env),
        Input::Command(cmd) => d.command(cmd, now).0,
        Input::Timers => d.timers(now, |_| false),
    }
}

enum Input {
    Alert(Cause, Envelope<Alert>),
    Command(Command),
    Timers,
}

fn run(ops: &[Op], cuts: &[prop::sample::Index]) -> Result<(), TestCaseError> {
    let cfg = compile(&config()).expect("the test config compiles");
    let mut proj = Projection::new();
    proj.set_inhibitor(cfg.inhibitor.clone());
    // Tallies kept, so a resolving alert takes the summary-only way (each
    // use checked against the full recomputation in debug builds).
    proj.set_severity(cfg.severity.clone());
    let mut log: Vec<LogEntry> = Vec::new();
    let mut now: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
    let mut alert_seq = 0;
    // The same inputs against a projection that evicts every incident it
    // can after each input (as the service does past the reopen window for
    // resolved ones, and beyond `max_in_memory` for any) and reads it back
    // from a store when a decision misses it.
    let mut lean = Projection::new();
    lean.set_inhibitor(cfg.inhibitor.clone());
    lean.set_severity(cfg.severity.clone());
    // The service's store (sled), so what it writes of an incident and
    // reads back is what the lean projection decides from.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = crate::store::Store::open(dir.path()).expect("the store opens");
    let stored = |id: &uuid::Uuid| {
        store
            .incident(id)
            .expect("the store reads")
            .expect("an evicted incident is stored")
    };
    for (i, op) in ops.iter().enumerate() {
        now += SignedDuration::from_secs(10);
        let input = match op {
            Op::Alert {
                group,
                instance,
                firing,
            } => {
                alert_seq += 1;
                Input::Alert(
                    Cause::alert(alert_seq),
                    Envelope::new("am", now, alert(*group, *instance, *firing, now)),
                )
            }
            Op::Ack(n) => Input::Command(command(*n, |incident| Action::Ack { incident })),
            Op::Resolve(n) => Input::Command(command(*n, |incident| Action::Resolve { incident })),
            Op::Reopen(n) => Input::Command(command(*n, |incident| Action::Reopen { incident })),
            Op::Unack(n) => Input::Command(command(*n, |incident| Action::Unack { incident })),
            Op::Snooze { number, minutes } => {
                Input::Command(command(*number, |incident| Action::Snooze {
                    incident,
                    seconds: minutes * 60,
                }))
            }
            Op::Tick(minutes) => {
                now += SignedDuration::from_mins(*minutes);
                Input::Timers
            }
        };
        let entries = decide(&cfg, &proj, &input, now);
        // A crash after any prefix of the entries was stored: deciding
        // again gives exactly the rest.
        let cut = cuts[i % cuts.len()].index(entries.len() + 1);
        let mut crashed = proj.clone();
        for (k, e) in entries[..cut].iter().enumerate() {
            crashed.apply(e, (log.len() + k + 1) as u64);
        }
        let rest = decide(&cfg, &crashed, &input, now);
        prop_assert_eq!(
            &rest[..],
            &entries[cut..],
            "op {} ({:?}): after {} of {} entries were stored",
            i,
            op,
            cut,
            entries.len()
        );
        let lean_entries = loop {
            let d = Decider::new(&cfg, &lean);
            let decided = decide_with(&d, &input, now);
            match d.missed.get() {
                Some(id) => lean.restore(stored(&id)),
                None => break decided,
            }
        };
        prop_assert_eq!(
            &lean_entries,
            &entries,
            "op {} ({:?}): eviction changed the decision",
            i,
            op
        );
        for e in &entries {
            log.push(e.clone());
            proj.apply(e, log.len() as u64);
            if let Some(id) = lean.cold_target(e) {
                lean.restore(stored(&id));
            }
            lean.apply(e, log.len() as u64);
        }
        store.save(&mut lean).expect("the store saves");
        lean.evict(Timestamp::MAX);
        // Open ones too, all but the snoozed.
        lean.evict_over(0);
        prop_assert!(lean
            .incidents
            .values()
            .all(|st| st.summary.snoozed_until.is_some()));
        // The index of inhibiting sources answers as going through every
        // firing alert (of the projection holding them all) does, in both.
        let mut firing: Vec<_> = proj.firing_alerts().collect();
        firing.sort_by(|a, b| a.0.cmp(b.0));
        for target in (0..4).flat_map(|g| (0..3).map(move |i| alert(g, i, true, now).labels)) {
            let scanned = cfg.inhibitor.inhibited_by(&target, firing.iter().copied());
            for p in [&proj, &lean] {
                prop_assert_eq!(
                    p.sources.inhibited_by(&target),
                    scanned.clone(),
                    "op {} ({:?}): inhibition of {:?}",
                    i,
                    op,
                    target
                );
            }
        }
        prop_assert!(lean
            .incidents
            .values()
            .all(|st| st.summary.status != tocsin_proto::incident::IncidentStatus::Resolved));
    }
    // Every incident reads back from the store as it is in memory.
    for (id, st) in &proj.incidents {
        prop_assert_eq!(&stored(id), &**st, "incident {} as stored", id);
    }
    prop_assert_eq!(lean.open_count, proj.open_count);
    prop_assert_eq!(&lean.by_number, &proj.by_number);
    prop_assert_eq!(&lean.snoozes, &proj.snoozes);
    // Replaying the log gives the same projection.
    let mut replayed = Projection::new();
    for (k, e) in log.iter().enumerate() {
        replayed.apply(e, (k + 1) as u64);
    }
    prop_assert_eq!(&replayed.incidents, &proj.incidents);
    prop_assert_eq!(&replayed.by_key, &proj.by_key);
    prop_assert_eq!(&replayed.by_number, &proj.by_number);
    prop_assert_eq!(replayed.next_number, proj.next_number);
    prop_assert_eq!(replayed.open_count, proj.open_count);
    prop_assert_eq!(&replayed.snoozes, &proj.snoozes);
    // Every entry but a receipt moves its incident's revision on by one,
    // so of two copies of an incident the newer has the higher revision
    // wherever each was stored.
    let mut revisions = std::collections::HashMap::new();
    for e in &log {
        let LogEntry::Incident(ev) = e else { continue };
        let before: u64 = revisions.get(&ev.incident.id).copied().unwrap_or(0);
        let want = if e.is_receipt() { before } else { before + 1 };
        prop_assert_eq!(ev.incident.revision, want, "{:?}", ev.kind.name());
        revisions.insert(ev.incident.id, ev.incident.revision);
    }
    Ok(())
}

/// Messages of several alerts (group, instance, firing), as ingest stores
/// a request, decided as the service does: alert by alert, each folded in
/// at once, a lone `opened` or `alert_firing` entry joined to the run of
/// such entries before it ([`join_run`]). Replaying the joined entries
/// gives the projection deciding gave; and after a crash with any prefix of
/// them stored, deciding again from where the service resumes gives the
/// same projection, with nothing decided twice.
fn run_joined(
    messages: &[Vec<(u8, u8, bool)>],
    cuts: &[prop::sample::Index],
) -> Result<(), TestCaseError> {
    let cfg = compile(&config()).expect("the test config compiles");
    let mut proj = Projection::new();
    proj.set_inhibitor(cfg.inhibitor.clone());
    let mut stored = 0usize;
    let mut now: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
    for (m, alerts) in messages.iter().enumerate() {
        now += SignedDuration::from_secs(10);
        let seq = m as u64 + 1;
        let before = proj.clone();
        let inputs: Vec<(AlertPos, Input)> = alerts
            .iter()
            .enumerate()
            .map(|(i, (g, inst, firing))| {
                let at = AlertPos {
                    seq,
                    index: i as u32,
                };
                let env = Envelope::new("am", now, alert(*g, *inst, *firing, now));
                (at, Input::Alert(at.cause(), env))
            })
            .collect();
        let mut joined: Vec<LogEntry> = Vec::new();
        let mut open = false;
        for (_, input) in &inputs {
            let mut entries = decide(&cfg, &proj, input, now);
            for e in &entries {
                proj.apply(e, 0);
            }
            let lone = matches!(entries.as_slice(), [LogEntry::Incident(e)]
                if matches!(e.kind, EventKind::Opened { .. } | EventKind::AlertFiring { .. } | EventKind::AlertResolved { .. }));
            if lone {
                let e = entries.pop().expect("one entry");
                let back = match joined.last_mut().filter(|_| open) {
                    Some(run) => join_run(run, e),
                    None => Some(e),
                };
                joined.extend(back);
                open = true;
            } else {
                open = false;
                joined.extend(entries);
            }
        }
        // Replayed: the projection deciding gave.
        let mut replayed = before.clone();
        for (k, e) in joined.iter().enumerate() {
            replayed.apply(e, (stored + k + 1) as u64);
        }
        prop_assert_eq!(&replayed.incidents, &proj.incidents, "message {}", m);
        prop_assert_eq!(&replayed.by_key, &proj.by_key);
        prop_assert_eq!(replayed.open_count, proj.open_count);
        for target in (0..4).flat_map(|g| (0..4).map(move |i| alert(g, i, true, now).labels)) {
            prop_assert_eq!(
                replayed.sources.inhibited_by(&target),
                proj.sources.inhibited_by(&target),
                "message {}: inhibition of {:?}",
                m,
                &target
            );
        }
        // A crash with a prefix stored: decided again from where the
        // service resumes, each alert the stored prefix covers (before
        // its last) changes nothing, and the rest complete the projection.
        let cut = cuts[m % cuts.len()].index(joined.len() + 1);
        let mut crashed = before.clone();
        for (k, e) in joined[..cut].iter().enumerate() {
            crashed.apply(e, (stored + k + 1) as u64);
        }
        let covered = joined[..cut].last().and_then(|e| AlertPos::of(e.cause()));
        let resume = crashed.alerts_resume_from();
        for (at, input) in &inputs {
            if *at < resume {
                continue;
            }
            let entries = decide(&cfg, &crashed, input, now);
            if covered.is_some_and(|c| *at < c) {
                prop_assert!(
                    entries.is_empty(),
                    "message {}: alert {:?} decided again after a crash: {:?}",
                    m,
                    at,
                    entries
                );
            }
            for e in &entries {
                crashed.apply(e, 0);
            }
        }
        prop_assert_eq!(
            &crashed.incidents,
            &proj.incidents,
            "message {} after a crash",
            m
        );
        stored += joined.len();
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_runs_of_a_messages_alerts_written_as_one_entry_replay_and_resume_exactly(
        messages in prop::collection::vec(
            prop::collection::vec((0u8..4, 0u8..4, prop::bool::weighted(0.8)), 1..12),
            1..12,
        ),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 1..8),
    ) {
        run_joined(&messages, &cuts)?;
    }

    #[test]
    fn a_half_stored_input_gets_exactly_its_missing_part_and_replay_and_eviction_agree(
        ops in prop::collection::vec(op(), 1..60),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 1..8),
    ) {
        run(&ops, &cuts)?;
    }
}
