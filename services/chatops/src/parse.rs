//! What people type: `/tocsin` commands, SMS replies, matchers and
//! durations. Pure; every error is a sentence that says what to type
//! instead, shown to the person as is.

use std::time::Duration;

use regex::Regex;
use tocsin_proto::{
    command::IncidentRef,
    incident::{IncidentStatus, RunbookRequest},
    silence::{MatchOp, Matcher},
};

/// Longest snooze (a week): longer is a silence's job.
pub const MAX_SNOOZE: Duration = Duration::from_secs(7 * 86_400);
/// Longest silence made from chat or the API (90 days).
pub const MAX_SILENCE: Duration = Duration::from_secs(90 * 86_400);
/// Longest note or comment, in characters.
pub const MAX_TEXT_CHARS: usize = 4_000;
/// Most matchers in one silence.
pub const MAX_MATCHERS: usize = 20;

/// One `/tocsin` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlashCommand {
    Ack(IncidentRef),
    Unack(IncidentRef),
    Resolve {
        incident: IncidentRef,
        note: Option<String>,
    },
    Snooze {
        incident: IncidentRef,
        seconds: u64,
    },
    Escalate {
        incident: IncidentRef,
        reason: String,
    },
    Note {
        incident: IncidentRef,
        text: String,
    },
    List {
        status: Vec<IncidentStatus>,
    },
    Show(IncidentRef),
    Oncall {
        schedule: Option<String>,
    },
    Silence {
        matchers: Vec<Matcher>,
        seconds: u64,
        comment: String,
    },
    /// `approve <run>` / `deny <run>`: decides a runbook run waiting for
    /// approval (the incident is the one the run id names).
    Runbook {
        incident: IncidentRef,
        request: RunbookRequest,
    },
    Help,
}

impl SlashCommand {
    /// Whether it changes anything (read-only users may not).
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            SlashCommand::List { .. }
                | SlashCommand::Show(_)
                | SlashCommand::Oncall { .. }
                | SlashCommand::Help
        )
    }
}

/// The `/tocsin help` text.
pub const HELP: &str = "*/tocsin* commands:\n\
• `ack 42` · `unack 42` · `resolve 42 [note]` · `snooze 42 30m` · `escalate 42 [reason]`\n\
• `note 42 text` · `show 42` · `list [open|triggered|acknowledged|resolved|all]`\n\
• `oncall [schedule]`\n\
• `silence service=payments severity=~\"high|critical\" for 2h [comment]`\n\
• `approve <run>` · `deny <run>` (a runbook run waiting for approval; the id is on the timeline)\n\
• `help`";

/// Parses the text after `/tocsin`.
pub fn parse_slash(text: &str) -> Result<SlashCommand, String> {
    let text = text.trim();
    if text.chars().count() > MAX_TEXT_CHARS + 64 {
        return Err(format!(
            "that is too long ({} characters); keep it under {MAX_TEXT_CHARS}",
            text.chars().count()
        ));
    }
    let (verb, rest) = split_word(text);
    let verb = verb.to_ascii_lowercase();
    let need_incident = |rest: &str| -> Result<(IncidentRef, String), String> {
        let (n, tail) = split_word(rest);
        if n.is_empty() {
            return Err(format!(
                "`{verb}` needs an incident number: `/tocsin {verb} 42`"
            ));
        }
        let incident = incident_ref(n).map_err(|e| format!("{e}: `/tocsin {verb} 42`"))?;
        Ok((incident, tail.trim().to_string()))
    };
    let no_more = |tail: &str, usage: &str| -> Result<(), String> {
        if tail.is_empty() {
            Ok(())
        } else {
            Err(format!("unexpected `{tail}`; usage: `{usage}`"))
        }
    };
    match verb.as_str() {
        "" | "help" | "?" => Ok(SlashCommand::Help),
        "ack" | "acknowledge" => {
            let (i, tail) = need_incident(rest)?;
            no_more(&tail, "/tocsin ack 42")?;
            Ok(SlashCommand::Ack(i))
        }
        "unack" | "unacknowledge" => {
            let (i, tail) = need_incident(rest)?;
            no_more(&tail, "/tocsin unack 42")?;
            Ok(SlashCommand::Unack(i))
        }
        "resolve" | "res" => {
            let (i, tail) = need_incident(rest)?;
            Ok(SlashCommand::Resolve {
                incident: i,
                note: (!tail.is_empty()).then(|| tail.clone()),
            })
        }
        "snooze" => {
            let (i, tail) = need_incident(rest)?;
            let (d, more) = split_word(&tail);
            if d.is_empty() {
                return Err("`snooze` needs a duration: `/tocsin snooze 42 30m`".into());
            }
            no_more(more.trim(), "/tocsin snooze 42 30m")?;
            let d = duration(d)?;
            if d.is_zero() || d > MAX_SNOOZE {
                return Err("snooze for between 1s and 7d (use `silence` for longer)".into());
            }
            Ok(SlashCommand::Snooze {
                incident: i,
                seconds: d.as_secs().max(1),
            })
        }
        "escalate" | "esc" => {
            let (i, tail) = need_incident(rest)?;
            Ok(SlashCommand::Escalate {
                incident: i,
                reason: tail,
            })
        }
        "note" => {
            let (i, tail) = need_incident(rest)?;
            if tail.is_empty() {
                return Err(
                    "`note` needs some text: `/tocsin note 42 restarted the consumer`".into(),
                );
            }
            Ok(SlashCommand::Note {
                incident: i,
                text: tail,
            })
        }
        "show" => {
            let (i, tail) = need_incident(rest)?;
            no_more(&tail, "/tocsin show 42")?;
            Ok(SlashCommand::Show(i))
        }
        "list" | "ls" => {
            let (s, tail) = split_word(rest);
            no_more(
                tail.trim(),
                "/tocsin list [open|triggered|acknowledged|resolved|all]",
            )?;
            Ok(SlashCommand::List {
                status: status_filter(s)?,
            })
        }
        "oncall" | "on-call" | "who" => {
            let (s, tail) = split_word(rest);
            no_more(tail.trim(), "/tocsin oncall [schedule]")?;
            Ok(SlashCommand::Oncall {
                schedule: (!s.is_empty()).then(|| s.to_string()),
            })
        }
        "silence" | "mute" => parse_silence(rest),
        "approve" | "deny" => {
            let (run, tail) = split_word(rest);
            no_more(tail.trim(), &format!("/tocsin {verb} <run>"))?;
            let incident = tocsin_proto::incident::run_incident(run).ok_or_else(|| {
                format!(
                    "`{verb}` needs a run id from the incident's timeline: `/tocsin {verb} <run>`"
                )
            })?;
            let run = run.to_string();
            let request = if verb == "approve" {
                RunbookRequest::Approve { run }
            } else {
                RunbookRequest::Deny { run }
            };
            Ok(SlashCommand::Runbook {
                incident: IncidentRef::Id(incident),
                request,
            })
        }
        other => Err(format!("unknown command `{other}`. Try `/tocsin help`.")),
    }
}

/// `open` (default), `triggered`, `acknowledged`, `resolved` or `all`.
pub fn status_filter(s: &str) -> Result<Vec<IncidentStatus>, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "" | "open" => vec![IncidentStatus::Triggered, IncidentStatus::Acknowledged],
        "triggered" => vec![IncidentStatus::Triggered],
        "acknowledged" | "acked" => vec![IncidentStatus::Acknowledged],
        "resolved" => vec![IncidentStatus::Resolved],
        "all" => vec![],
        other => {
            return Err(format!(
                "unknown status `{other}`; use open, triggered, acknowledged, resolved or all"
            ))
        }
    })
}

/// `<matchers> for <duration> [comment]`.
fn parse_silence(rest: &str) -> Result<SlashCommand, String> {
    const USAGE: &str =
        "/tocsin silence service=payments severity=~\"high|critical\" for 2h [comment]";
    let words = shell_words(rest)?;
    let Some(at) = words.iter().position(|w| w.eq_ignore_ascii_case("for")) else {
        return Err(format!("`silence` needs `for <duration>`: `{USAGE}`"));
    };
    let matchers = words[..at]
        .iter()
        .flat_map(|w| w.split(','))
        .filter(|w| !w.is_empty())
        .map(parse_matcher)
        .collect::<Result<Vec<_>, _>>()?;
    check_matchers(&matchers)?;
    let Some(d) = words.get(at + 1) else {
        return Err(format!("`for` needs a duration: `{USAGE}`"));
    };
    let seconds = silence_duration(d)?;
    let comment = words[at + 2..].join(" ");
    if comment.chars().count() > MAX_TEXT_CHARS {
        return Err(format!("the comment is over {MAX_TEXT_CHARS} characters"));
    }
    Ok(SlashCommand::Silence {
        matchers,
        seconds,
        comment,
    })
}

/// Checks a silence's matchers: at least one, at most [`MAX_MATCHERS`],
/// and not one that matches every alert.
pub fn check_matchers(matchers: &[Matcher]) -> Result<(), String> {
    if matchers.is_empty() {
        return Err("a silence needs at least one matcher, e.g. service=payments".into());
    }
    if matchers.len() > MAX_MATCHERS {
        return Err(format!(
            "{} matchers; at most {MAX_MATCHERS}",
            matchers.len()
        ));
    }
    if matchers.iter().all(matches_empty) {
        return Err(
            "these matchers match every alert (each matches an empty label); name a label value"
                .into(),
        );
    }
    Ok(())
}

fn matches_empty(m: &Matcher) -> bool {
    compile(m).map(|c| c.matches("")).unwrap_or(false)
}

/// A silence's length: between 1 minute and [`MAX_SILENCE`].
pub fn silence_duration(s: &str) -> Result<u64, String> {
    let d = duration(s)?;
    if d < Duration::from_secs(60) || d > MAX_SILENCE {
        return Err(format!("silence for between 1m and 90d, not {s}"));
    }
    Ok(d.as_secs())
}

/// `30m`, `2h`, `1h30m`, `7d`.
pub fn duration(s: &str) -> Result<Duration, String> {
    tocsin_runtime::config::parse_duration(s)
}

/// `42`, `#42` or an incident UUID.
pub fn incident_ref(s: &str) -> Result<IncidentRef, String> {
    let t = s.trim().trim_start_matches('#');
    if let Ok(n) = t.parse::<u64>() {
        return Ok(IncidentRef::Number(n));
    }
    t.parse::<uuid::Uuid>()
        .map(IncidentRef::Id)
        .map_err(|_| format!("`{s}` is not an incident number (42, #42) or id"))
}

/// The first word and the rest.
fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

/// Words split on white space, with double quotes grouping (kept in the
/// word, so `severity=~"high|critical"` stays one matcher). Slack sends
/// typographic quotes when people type straight ones; they count too.
fn shell_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in s.chars() {
        let c = if matches!(c, '“' | '”') { '"' } else { c };
        if escaped {
            cur.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => {
                cur.push(c);
                escaped = true;
            }
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if quoted {
        return Err("a double quote is not closed".into());
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    Ok(words)
}

/// One Alertmanager matcher: `name=value`, `name!=value`, `name=~regex`,
/// `name!~regex`, the value optionally in double quotes (`\"` and `\\`
/// escaped). The regex is checked here.
pub fn parse_matcher(s: &str) -> Result<Matcher, String> {
    let bad = |why: &str| {
        format!("invalid matcher `{s}`: {why} (write e.g. service=payments or severity=~\"high|critical\")")
    };
    let t = s.trim();
    let end = t
        .find(|c: char| matches!(c, '=' | '!' | '~') || c.is_whitespace())
        .unwrap_or(t.len());
    let name = &t[..end];
    if name.is_empty()
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        || name.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(bad("a label name is letters, digits and _"));
    }
    let rest = &t[end..];
    let (op, raw) = [MatchOp::Re, MatchOp::NotEq, MatchOp::NotRe, MatchOp::Eq]
        .into_iter()
        .find_map(|op| rest.strip_prefix(op.as_str()).map(|r| (op, r)))
        .ok_or_else(|| bad("expected =, !=, =~ or !~"))?;
    let value = match raw.strip_prefix('"') {
        Some(inner) => {
            let inner = inner
                .strip_suffix('"')
                .ok_or_else(|| bad("the closing quote is missing"))?;
            let mut v = String::new();
            let mut esc = false;
            for c in inner.chars() {
                match (esc, c) {
                    (true, '"' | '\\') => {
                        v.push(c);
                        esc = false;
                    }
                    (true, c) => {
                        v.push('\\');
                        v.push(c);
                        esc = false;
                    }
                    (false, '\\') => esc = true,
                    (false, '"') => return Err(bad("an unescaped quote inside the value")),
                    (false, c) => v.push(c),
                }
            }
            v
        }
        None => raw.to_string(),
    };
    let m = Matcher {
        name: name.to_string(),
        op,
        value,
    };
    compile(&m).map_err(|e| bad(&e))?;
    Ok(m)
}

/// A matcher ready to test label values (regexes anchored, as
/// Alertmanager's).
#[derive(Debug, Clone)]
pub struct CompiledMatcher {
    pub name: String,
    op: MatchOp,
    value: String,
    re: Option<Regex>,
}

impl CompiledMatcher {
    /// Whether a label value (`""` when absent) matches.
    pub fn matches(&self, v: &str) -> bool {
        match self.op {
            MatchOp::Eq => v == self.value,
            MatchOp::NotEq => v != self.value,
            MatchOp::Re => self.re.as_ref().is_some_and(|r| r.is_match(v)),
            MatchOp::NotRe => !self.re.as_ref().is_some_and(|r| r.is_match(v)),
        }
    }
}

/// Compiles `m` (the regex anchored, size-limited).
pub fn compile(m: &Matcher) -> Result<CompiledMatcher, String> {
    let re = match m.op {
        MatchOp::Re | MatchOp::NotRe => {
            // Checked alone first, so `a)|(b` cannot escape the anchors.
            let build = |p: &str| {
                regex::RegexBuilder::new(p)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| {
                        let t = e.to_string();
                        t.lines()
                            .find_map(|l| l.strip_prefix("error: "))
                            .map(|l| format!("regex: {l}"))
                            .unwrap_or_else(|| t.split_whitespace().collect::<Vec<_>>().join(" "))
                    })
            };
            build(&m.value)?;
            Some(build(&format!("^(?:{})$", m.value))?)
        }
        _ => None,
    };
    Ok(CompiledMatcher {
        name: m.name.clone(),
        op: m.op,
        value: m.value.clone(),
        re,
    })
}

/// Whether every matcher matches `labels`.
pub fn all_match(ms: &[CompiledMatcher], labels: &tocsin_proto::alert::Labels) -> bool {
    ms.iter().all(|m| {
        m.matches(
            labels
                .iter()
                .find(|(k, _)| k.as_str() == m.name)
                .map(|(_, v)| v.as_str())
                .unwrap_or(""),
        )
    })
}

/// What an SMS reply asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmsAction {
    Ack,
    Resolve,
    Escalate,
}

/// An SMS reply: the action and, unless left out, the incident number.
/// `all`: every open incident that paged the sender (`ACK ALL`, `AA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmsCommand {
    pub action: SmsAction,
    pub number: Option<u64>,
    pub all: bool,
}

/// The help an SMS sender gets for anything else.
pub const SMS_HELP: &str =
    "Reply ACK 42, RES 42 or ESC 42 (the number may be left out when you have one open page); ACK ALL acknowledges all your pages.";

/// `ACK 42`, `res #42`, `Esc`, `acknowledge 42` (any case, extra spaces).
pub fn parse_sms(body: &str) -> Result<SmsCommand, String> {
    let words: Vec<&str> = body.split_whitespace().collect();
    let help = || SMS_HELP.to_string();
    let (verb, rest) = match words.split_first() {
        Some(x) => x,
        None => return Err(help()),
    };
    let verb = verb.to_ascii_lowercase();
    let verb = verb.trim_end_matches(['.', '!']);
    // GoAlert's shorthand for "acknowledge all".
    if verb == "aa" && rest.is_empty() {
        return Ok(SmsCommand {
            action: SmsAction::Ack,
            number: None,
            all: true,
        });
    }
    let action = match verb {
        "ack" | "acknowledge" | "a" => SmsAction::Ack,
        "res" | "resolve" | "resolved" | "r" => SmsAction::Resolve,
        "esc" | "escalate" | "e" => SmsAction::Escalate,
        _ => return Err(help()),
    };
    if let [word] = rest {
        if word.to_ascii_lowercase().trim_end_matches(['.', '!']) == "all" {
            return match action {
                SmsAction::Ack => Ok(SmsCommand {
                    action,
                    number: None,
                    all: true,
                }),
                _ => Err(help()),
            };
        }
    }
    let number = match rest {
        [] => None,
        [n] => Some(
            n.trim_start_matches('#')
                .trim_end_matches(['.', '!'])
                .parse::<u64>()
                .map_err(|_| help())?,
        ),
        _ => return Err(help()),
    };
    Ok(SmsCommand {
        action,
        number,
        all: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(x: u64) -> IncidentRef {
        IncidentRef::Number(x)
    }

    fn m(name: &str, op: MatchOp, value: &str) -> Matcher {
        Matcher {
            name: name.into(),
            op,
            value: value.into(),
        }
    }

    #[test]
    fn approve_and_deny_name_a_run() {
        let id = "0191e0a455f27c1e9a6b2b1b8d0e4f11";
        let run = format!("{id}.restart-api.42");
        let inc = IncidentRef::Id(id.parse().unwrap());
        assert_eq!(
            parse_slash(&format!("approve {run}")),
            Ok(SlashCommand::Runbook {
                incident: inc.clone(),
                request: RunbookRequest::Approve { run: run.clone() }
            })
        );
        assert_eq!(
            parse_slash(&format!("DENY {run}")),
            Ok(SlashCommand::Runbook {
                incident: inc,
                request: RunbookRequest::Deny { run: run.clone() }
            })
        );
        for bad in [
            "approve",
            "approve 42",
            "deny x.y.z",
            &format!("approve {run} now"),
        ] {
            assert!(parse_slash(bad).is_err(), "{bad}");
        }
        assert!(parse_slash(&format!("approve {run}")).unwrap().writes());
        // A run started by an entry stored with others (a `paged` receipt
        // in a message of several) is named by the entry's place in it.
        let packed = format!("{id}.restart-api.42.3");
        assert_eq!(
            parse_slash(&format!("approve {packed}")),
            Ok(SlashCommand::Runbook {
                incident: IncidentRef::Id(id.parse().unwrap()),
                request: RunbookRequest::Approve {
                    run: packed.clone()
                }
            })
        );
    }

    #[test]
    fn every_slash_form() {
        let id = "0191e0a4-55f2-7c1e-9a6b-2b1b8d0e4f11";
        let ack_id = format!("ack {id}");
        let table: Vec<(&str, SlashCommand)> = vec![
            ("ack 42", SlashCommand::Ack(n(42))),
            ("ACK #42", SlashCommand::Ack(n(42))),
            ("  acknowledge   7 ", SlashCommand::Ack(n(7))),
            (
                &ack_id,
                SlashCommand::Ack(IncidentRef::Id(id.parse().unwrap())),
            ),
            ("unack 42", SlashCommand::Unack(n(42))),
            (
                "resolve 42",
                SlashCommand::Resolve {
                    incident: n(42),
                    note: None,
                },
            ),
            (
                "resolve 42 rolled back the deploy",
                SlashCommand::Resolve {
                    incident: n(42),
                    note: Some("rolled back the deploy".into()),
                },
            ),
            (
                "snooze 42 30m",
                SlashCommand::Snooze {
                    incident: n(42),
                    seconds: 1800,
                },
            ),
            (
                "snooze 42 1h30m",
                SlashCommand::Snooze {
                    incident: n(42),
                    seconds: 5400,
                },
            ),
            (
                "escalate 42",
                SlashCommand::Escalate {
                    incident: n(42),
                    reason: String::new(),
                },
            ),
            (
                "esc 42 no progress",
                SlashCommand::Escalate {
                    incident: n(42),
                    reason: "no progress".into(),
                },
            ),
            (
                "note 42 restarted the consumer",
                SlashCommand::Note {
                    incident: n(42),
                    text: "restarted the consumer".into(),
                },
            ),
            (
                "list",
                SlashCommand::List {
                    status: vec![IncidentStatus::Triggered, IncidentStatus::Acknowledged],
                },
            ),
            (
                "list resolved",
                SlashCommand::List {
                    status: vec![IncidentStatus::Resolved],
                },
            ),
            ("list all", SlashCommand::List { status: vec![] }),
            ("show #42", SlashCommand::Show(n(42))),
            ("oncall", SlashCommand::Oncall { schedule: None }),
            (
                "oncall payments",
                SlashCommand::Oncall {
                    schedule: Some("payments".into()),
                },
            ),
            (
                "silence service=payments for 2h",
                SlashCommand::Silence {
                    matchers: vec![m("service", MatchOp::Eq, "payments")],
                    seconds: 7200,
                    comment: String::new(),
                },
            ),
            (
                "silence service=payments severity=~\"high|critical\" for 2h deploy window",
                SlashCommand::Silence {
                    matchers: vec![
                        m("service", MatchOp::Eq, "payments"),
                        m("severity", MatchOp::Re, "high|critical"),
                    ],
                    seconds: 7200,
                    comment: "deploy window".into(),
                },
            ),
            (
                "silence env!=dev,team=\"a b\" FOR 30m",
                SlashCommand::Silence {
                    matchers: vec![
                        m("env", MatchOp::NotEq, "dev"),
                        m("team", MatchOp::Eq, "a b"),
                    ],
                    seconds: 1800,
                    comment: String::new(),
                },
            ),
            (
                "silence host!~“db.*” env=prod for 1h",
                SlashCommand::Silence {
                    matchers: vec![
                        m("host", MatchOp::NotRe, "db.*"),
                        m("env", MatchOp::Eq, "prod"),
                    ],
                    seconds: 3600,
                    comment: String::new(),
                },
            ),
            ("help", SlashCommand::Help),
            ("", SlashCommand::Help),
        ];
        for (text, want) in table {
            assert_eq!(parse_slash(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn slash_junk_gets_a_helpful_answer() {
        let table: &[(&str, &str)] = &[
            ("dance", "unknown command `dance`. Try `/tocsin help`"),
            ("ack", "`ack` needs an incident number"),
            ("ack forty-two", "`forty-two` is not an incident number"),
            ("ack 42 43", "unexpected `43`"),
            ("snooze 42", "`snooze` needs a duration"),
            ("snooze 42 soon", "invalid duration"),
            ("snooze 42 30d", "between 1s and 7d"),
            ("note 42", "`note` needs some text"),
            ("list pending", "unknown status `pending`"),
            ("silence service=payments", "needs `for <duration>`"),
            ("silence for 2h", "at least one matcher"),
            ("silence service=~\".*\" for 2h", "match every alert"),
            ("silence service=payments for 10s", "between 1m and 90d"),
            ("silence service=payments for", "needs a duration"),
            ("silence host!~db.* for 1h", "match every alert"),
            ("silence service=~\"(\" for 1h", "regex"),
            ("silence 9x=1 for 1h", "label name"),
            ("silence service=\"payments for 1h", "not closed"),
            ("show", "needs an incident number"),
            ("oncall a b", "unexpected `b`"),
        ];
        for (text, want) in table {
            let got = parse_slash(text).expect_err(text);
            assert!(got.contains(want), "{text:?}: {got}");
        }
        let long = format!("note 1 {}", "x".repeat(5000));
        assert!(parse_slash(&long).unwrap_err().contains("too long"));
    }

    #[test]
    fn every_sms_form() {
        use SmsAction::*;
        let table: &[(&str, SmsAction, Option<u64>)] = &[
            ("ACK 42", Ack, Some(42)),
            ("ack 42", Ack, Some(42)),
            ("Ack #42", Ack, Some(42)),
            ("  ack   42  ", Ack, Some(42)),
            ("ACK", Ack, None),
            ("ack.", Ack, None),
            ("acknowledge 7", Ack, Some(7)),
            ("RES 42", Resolve, Some(42)),
            ("resolve 42", Resolve, Some(42)),
            ("res", Resolve, None),
            ("ESC 42", Escalate, Some(42)),
            ("escalate", Escalate, None),
            ("Esc 9.", Escalate, Some(9)),
        ];
        for (body, action, number) in table {
            assert_eq!(
                parse_sms(body),
                Ok(SmsCommand {
                    action: *action,
                    number: *number,
                    all: false,
                }),
                "{body:?}"
            );
        }
        for body in ["ACK ALL", "ack all.", "Acknowledge All", "AA", "aa!"] {
            assert_eq!(
                parse_sms(body),
                Ok(SmsCommand {
                    action: Ack,
                    number: None,
                    all: true,
                }),
                "{body:?}"
            );
        }
        for junk in [
            "",
            "   ",
            "hello",
            "ACK forty",
            "ACK 42 43",
            "STOP",
            "ack -1",
            "ack 99999999999999999999999",
            "RES ALL",
            "esc all",
            "ack all 42",
            "aa 42",
        ] {
            assert_eq!(parse_sms(junk), Err(SMS_HELP.to_string()), "{junk:?}");
        }
    }

    #[test]
    fn matchers() {
        let c = compile(&parse_matcher("severity=~\"high|critical\"").unwrap()).unwrap();
        assert!(c.matches("high") && c.matches("critical") && !c.matches("highish"));
        let c = compile(&parse_matcher("env!=dev").unwrap()).unwrap();
        assert!(c.matches("prod") && c.matches("") && !c.matches("dev"));
        let esc = parse_matcher(r#"msg="say \"hi\"""#).unwrap();
        assert_eq!(esc.value, "say \"hi\"");
        assert!(parse_matcher("a=~\"a)|(b\"").is_err());
    }
}
