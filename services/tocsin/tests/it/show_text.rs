//! `tocsin show`'s timeline text for entries that carry several alerts.

use jiff::{tz::TimeZone, Timestamp};
use tocsin::ops::{describe_event, Style};
use tocsin_proto::{
    incident::{AlertInfo, Cause, EventKind, IncidentEvent, IncidentSummary, ResolvedAlert},
    AlertStatus, Fingerprint,
};

fn fp(i: usize) -> Fingerprint {
    Fingerprint::parse(&format!("{i:016x}")).unwrap()
}

fn at() -> Timestamp {
    "2026-03-01T00:00:00Z".parse().unwrap()
}

fn info(i: usize) -> AlertInfo {
    AlertInfo {
        fingerprint: fp(i),
        status: AlertStatus::Firing,
        labels: Default::default(),
        annotations: Default::default(),
        starts_at: at(),
        ends_at: None,
        generator_url: None,
        suppressed: None,
    }
}

fn line(kind: EventKind) -> String {
    let e = IncidentEvent {
        kind,
        at: at(),
        actor: None,
        cause: Cause::Alert { seq: 1, index: 0 },
        incident: IncidentSummary::new(uuid::Uuid::nil(), 1, "k", "t", at()),
    };
    let style = Style {
        json: false,
        colour: false,
        tz: TimeZone::UTC,
    };
    describe_event(&e, &style)
}

/// A request's alerts joining one incident are one INCIDENTS entry;
/// `tocsin show` gives it one timeline line naming every alert, up to
/// eight of the rest and then how many more.
#[test]
fn a_run_of_alerts_written_as_one_entry_is_one_line_naming_them() {
    let f = |i: usize| fp(i).to_string();
    assert_eq!(
        line(EventKind::Opened {
            alert: info(1),
            more: vec![]
        }),
        format!("opened by alert {}", f(1))
    );
    assert_eq!(
        line(EventKind::Opened {
            alert: info(1),
            more: (2..=3).map(info).collect()
        }),
        format!("opened by alert {} and 2 more: {}, {}", f(1), f(2), f(3))
    );
    let shown: Vec<String> = (2..=9).map(f).collect();
    assert_eq!(
        line(EventKind::AlertFiring {
            alert: info(1),
            more: (2..=11).map(info).collect()
        }),
        format!(
            "11 alerts firing: {}, {}, … (2 more)",
            f(1),
            shown.join(", ")
        )
    );
    assert_eq!(
        line(EventKind::AlertResolved {
            fingerprint: fp(1),
            ends_at: at(),
            more: vec![ResolvedAlert {
                fingerprint: fp(2),
                ends_at: at(),
            }],
        }),
        format!("2 alerts resolved: {}, {}", f(1), f(2))
    );
}
