//! Templates (handlebars, strict mode: a name that is not there is an
//! error, never an empty string) over the run's context: `incident`,
//! `labels`, `annotations`, `params`, `steps.<id>.*`, `run`, and in a
//! check's `until`, `result`.
//!
//! Alert values only ever become data: each argv element is rendered on its
//! own (one argument, whatever it holds), JSON body strings stay JSON
//! strings, and in a URL `{{x}}` is percent-encoded as one component.

use std::collections::BTreeSet;

use handlebars::Handlebars;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

/// Everything but the unreserved characters of RFC 3986 is encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The incident fields a template may read.
pub const INCIDENT_FIELDS: [&str; 7] = [
    "id",
    "number",
    "title",
    "severity",
    "status",
    "dedup_key",
    "opened_at",
];

/// The fields of `steps.<id>` (and of a check's `result`).
pub const OUTPUT_FIELDS: [&str; 10] = [
    "status",
    "exit_code",
    "stdout",
    "stderr",
    "http_status",
    "body",
    "json",
    "captures",
    "duration_ms",
    "attempts",
];

const HELPERS: [&str; 17] = [
    "if", "unless", "each", "with", "lookup", "eq", "ne", "gt", "gte", "lt", "lte", "and", "or",
    "not", "len", "else", "this",
];

fn registry(url: bool) -> Handlebars<'static> {
    let mut h = Handlebars::new();
    h.set_strict_mode(true);
    if url {
        h.register_escape_fn(|s| utf8_percent_encode(s, COMPONENT).to_string());
    } else {
        h.register_escape_fn(handlebars::no_escape);
    }
    h
}

/// Renders `t` over `ctx`.
pub fn render(t: &str, ctx: &Value) -> Result<String, String> {
    thread_local! {
        static PLAIN: Handlebars<'static> = registry(false);
    }
    if !t.contains("{{") {
        return Ok(t.to_string());
    }
    PLAIN.with(|h| h.render_template(t, ctx).map_err(|e| describe(t, e)))
}

/// Renders a URL template: `{{x}}` percent-encoded, `{{{x}}}` as is.
pub fn render_url(t: &str, ctx: &Value) -> Result<String, String> {
    thread_local! {
        static URL: Handlebars<'static> = registry(true);
    }
    URL.with(|h| h.render_template(t, ctx).map_err(|e| describe(t, e)))
}

fn describe(t: &str, e: handlebars::RenderError) -> String {
    let mut m = e.to_string();
    m.truncate(300);
    format!("template {t:?}: {m}")
}

/// Renders a condition: `true`/`false` (also `yes`/`no`, `1`/`0`, and
/// empty as false).
pub fn condition(t: &str, ctx: &Value) -> Result<bool, String> {
    let r = render(t, ctx)?;
    match r.trim() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" | "" | "null" => Ok(false),
        other => Err(format!(
            "condition {t:?} rendered {other:?}; it must render true or false"
        )),
    }
}

/// Every problem with template `t`, found without rendering: it must parse,
/// and every name it reads must exist (`params.<declared>`,
/// `steps.<earlier step>`, `incident.<field>`, `result` only in `until`).
pub fn check(t: &str, params: &BTreeSet<String>, steps: &[String], result: bool) -> Vec<String> {
    let mut out = Vec::new();
    if let Err(e) = handlebars::Template::compile(t) {
        out.push(format!("template does not parse: {e}"));
        return out;
    }
    let mut rest = t;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else { break };
        let inner = after[..j].trim_start_matches(['{', '#', '/', '~', '&', '^', '>']);
        rest = &after[j + 2..];
        if inner.starts_with('!') {
            continue;
        }
        for tok in tokens(inner) {
            if let Some(p) = check_path(&tok, params, steps, result) {
                out.push(p);
            }
        }
    }
    out
}

/// The words of a mustache's inside, quoted strings left out.
fn tokens(inner: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in inner.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                cur.clear();
            }
            None if c.is_whitespace() || c == '(' || c == ')' || c == '}' || c == '~' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            None => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn check_path(
    tok: &str,
    params: &BTreeSet<String>,
    steps: &[String],
    result: bool,
) -> Option<String> {
    if tok.starts_with('@')
        || tok.starts_with("../")
        || tok.parse::<f64>().is_ok()
        || tok.contains('=')
        || matches!(tok, "true" | "false" | "null" | "else")
    {
        return None;
    }
    let mut parts = tok.split('.');
    let root = parts.next().unwrap_or("");
    let second = parts.next();
    match root {
        "labels" | "annotations" | "run" => None,
        "incident" => match second {
            Some(f) if !INCIDENT_FIELDS.contains(&f) => Some(format!(
                "unknown field incident.{f} (known: {})",
                INCIDENT_FIELDS.join(", ")
            )),
            _ => None,
        },
        "params" => match second {
            Some(p) if !params.contains(p) => Some(format!(
                "params.{p} is not declared under params (declared: {})",
                if params.is_empty() {
                    "none".to_string()
                } else {
                    params.iter().cloned().collect::<Vec<_>>().join(", ")
                }
            )),
            _ => None,
        },
        "steps" => match second {
            Some(s) if !steps.iter().any(|x| x == s) => Some(format!(
                "no earlier step {s:?} (steps read only the outputs of steps before them)"
            )),
            Some(_) => match parts.next() {
                Some(f) if !OUTPUT_FIELDS.contains(&f) => Some(format!(
                    "unknown step output {tok} (known: {})",
                    OUTPUT_FIELDS.join(", ")
                )),
                _ => None,
            },
            None => None,
        },
        "result" if result => match second {
            Some(f) if !OUTPUT_FIELDS.contains(&f) => Some(format!(
                "unknown field {tok} (known: {})",
                OUTPUT_FIELDS.join(", ")
            )),
            _ => None,
        },
        "result" => {
            Some("`result` exists only in a check's `until` and a nats step's `expect`".into())
        }
        h if second.is_none() && HELPERS.contains(&h) => None,
        _ => Some(format!(
            "unknown field {tok}; templates read incident, labels, annotations, params, steps{}",
            if result { ", result" } else { "" }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_stay_data() {
        let ctx = json!({"labels": {"x": "a; rm -rf / $(reboot)", "p": "a/b?c=d&e"}});
        assert_eq!(
            render("{{labels.x}}", &ctx).unwrap(),
            "a; rm -rf / $(reboot)"
        );
        assert_eq!(
            render_url("http://h/svc/{{labels.p}}?q={{labels.x}}", &ctx).unwrap(),
            "http://h/svc/a%2Fb%3Fc%3Dd%26e?q=a%3B%20rm%20-rf%20%2F%20%24%28reboot%29"
        );
        assert_eq!(render_url("{{{labels.p}}}", &ctx).unwrap(), "a/b?c=d&e");
    }

    #[test]
    fn strict_and_conditions() {
        let ctx = json!({"steps": {"a": {"exit_code": 0, "status": "succeeded"}}});
        assert!(render("{{steps.b.exit_code}}", &ctx).is_err());
        assert!(condition("{{eq steps.a.exit_code 0}}", &ctx).unwrap());
        assert!(!condition("{{ne steps.a.status \"succeeded\"}}", &ctx).unwrap());
        assert!(condition("{{steps.a.status}}", &ctx).is_err());
    }

    #[test]
    fn static_check() {
        let params: BTreeSet<String> = ["replicas".to_string()].into();
        let steps = vec!["scale".to_string()];
        let ok = |t: &str| check(t, &params, &steps, false);
        assert!(ok(
            "{{params.replicas}} {{labels.any}} {{#if (eq steps.scale.exit_code 0)}}x{{/if}}"
        )
        .is_empty());
        assert!(ok("{{eq labels.a \"two words\"}}").is_empty());
        assert_eq!(ok("{{params.nope}}").len(), 1);
        assert_eq!(ok("{{steps.later.stdout}}").len(), 1);
        assert_eq!(ok("{{steps.scale.bogus}}").len(), 1);
        assert_eq!(ok("{{incdent.title}}").len(), 1);
        assert_eq!(ok("{{result.status}}").len(), 1);
        assert!(check("{{result.status}}", &params, &steps, true).is_empty());
        assert_eq!(ok("{{#if}").len(), 1);
    }
}
