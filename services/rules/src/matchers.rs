//! Alertmanager label matchers: parsing (`name="value"`, `name=~"re"`, ...),
//! compiling, and matching against label sets.
//!
//! Users compare us to Alertmanager, so the semantics are its semantics:
//! - a missing label matches as the empty string, so `foo=""` matches an
//!   alert without `foo` and `foo!=""` requires `foo` to be present;
//! - regexes are anchored at both ends (`^(?:re)$`), so `job=~"api"` does not
//!   match `api-2`;
//! - values are parsed like Alertmanager's classic parser (the one its
//!   default "fallback" mode ends up accepting): optional double quotes,
//!   `\"`, `\\` and `\n` escapes, and any other backslash kept literally, so
//!   regexes such as `=~"a\.b"` keep their backslash.

use std::fmt;

use regex::Regex;
use serde::{de::Error as _, Deserialize, Deserializer};
use tocsin_proto::{
    silence::{MatchOp, Matcher},
    Labels,
};

/// Characters that end a label name: whitespace and these. Anything else is
/// allowed, because Alertmanager 0.27+ accepts UTF-8 label names.
const NAME_TERMINATORS: &str = "=!~\"{},";

/// Parses one Alertmanager matcher, e.g. `severity=~"critical|page"`.
///
/// The regex of `=~`/`!~` is validated here, so a parsed matcher always
/// compiles.
pub fn parse_matcher(s: &str) -> Result<Matcher, String> {
    let invalid = |problem: String| format!("invalid matcher {s:?}: {problem}");
    let t = s.trim();
    let name_end = t
        .find(|c: char| c.is_whitespace() || NAME_TERMINATORS.contains(c))
        .unwrap_or(t.len());
    let name = &t[..name_end];
    if name.is_empty() {
        let problem = match t.chars().next() {
            None => "empty matcher".to_string(),
            Some('{') => "braces are not supported; give one matcher per list entry".to_string(),
            Some('"') => "quoted label names are not supported".to_string(),
            Some(_) => "missing label name".to_string(),
        };
        return Err(invalid(problem));
    }
    let rest = t[name_end..].trim_start();
    // Longest operators first: `=~` before `=`.
    let (op, raw) = [MatchOp::Re, MatchOp::NotEq, MatchOp::NotRe, MatchOp::Eq]
        .into_iter()
        .find_map(|op| rest.strip_prefix(op.as_str()).map(|raw| (op, raw)))
        .ok_or_else(|| {
            invalid(format!(
                "expected one of =, !=, =~, !~ after label name {name:?}"
            ))
        })?;
    let value = unescape_value(raw.trim()).map_err(invalid)?;
    let m = Matcher {
        name: name.to_string(),
        op,
        value,
    };
    compile_regex(&m).map_err(invalid)?;
    Ok(m)
}

/// Alertmanager's classic value unescaping (pkg/labels/parse.go): an optional
/// pair of surrounding double quotes; `\"`, `\\` and `\n` are escapes; any
/// other backslash is kept as is (so `\.` in a regex survives); an unescaped
/// `"` anywhere but at the end of a quoted value is an error.
fn unescape_value(raw: &str) -> Result<String, String> {
    let (body, quoted) = match raw.strip_prefix('"') {
        Some(body) => (body, true),
        None => (raw, false),
    };
    let mut expect_closing_quote = quoted;
    let mut value = String::with_capacity(body.len());
    let mut escaped = false;
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        let last = chars.peek().is_none();
        if escaped {
            escaped = false;
            match c {
                'n' => value.push('\n'),
                '"' | '\\' => value.push(c),
                _ => {
                    value.push('\\');
                    value.push(c);
                }
            }
            continue;
        }
        match c {
            // A trailing lone backslash is literal, as in Alertmanager.
            '\\' if !last => escaped = true,
            '"' if expect_closing_quote && last => expect_closing_quote = false,
            '"' => return Err("value contains an unescaped double quote".to_string()),
            _ => value.push(c),
        }
    }
    if expect_closing_quote {
        return Err("value is missing its closing double quote".to_string());
    }
    Ok(value)
}

/// Checks the name and, for regex operators, compiles the anchored regex.
/// The error is the bare problem; callers say which matcher it is.
fn compile_regex(m: &Matcher) -> Result<Option<Regex>, String> {
    if m.name.is_empty() {
        return Err("empty label name".to_string());
    }
    if m.name
        .contains(|c: char| c.is_whitespace() || NAME_TERMINATORS.contains(c))
    {
        return Err(format!(
            "label name {:?} contains whitespace or one of {NAME_TERMINATORS}",
            m.name
        ));
    }
    match m.op {
        MatchOp::Eq | MatchOp::NotEq => Ok(None),
        MatchOp::Re | MatchOp::NotRe => {
            // Validate the value on its own first: anchoring by string
            // concatenation would otherwise accept a value such as `a)|(b`,
            // which turns `^(?:a)|(b)$` into a half-anchored regex.
            Regex::new(&m.value).map_err(regex_problem)?;
            Regex::new(&format!("^(?:{})$", m.value))
                .map(Some)
                .map_err(regex_problem)
        }
    }
}

/// The regex crate's syntax errors span several lines (pattern, caret,
/// message); config and API errors are one line, so keep the message.
fn regex_problem(e: regex::Error) -> String {
    let text = e.to_string();
    match text.lines().find_map(|l| l.strip_prefix("error: ")) {
        Some(msg) => format!("regex parse error: {msg}"),
        None => text.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// Renders a matcher in Alertmanager syntax with a quoted value, such that
/// [`parse_matcher`] gives the same matcher back.
pub fn format_matcher(m: &Matcher) -> String {
    let mut out = String::with_capacity(m.name.len() + m.value.len() + 4);
    out.push_str(&m.name);
    out.push_str(m.op.as_str());
    out.push('"');
    for c in m.value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A matcher ready to match: its regex (if any) compiled once.
#[derive(Clone, Debug)]
pub struct CompiledMatcher {
    matcher: Matcher,
    re: Option<Regex>,
}

impl CompiledMatcher {
    /// Validates the label name and compiles the regex, anchored as
    /// Alertmanager does (`^(?:value)$`).
    pub fn new(m: &Matcher) -> Result<Self, String> {
        let re = compile_regex(m)
            .map_err(|problem| format!("invalid matcher {}: {problem}", format_matcher(m)))?;
        Ok(CompiledMatcher {
            matcher: m.clone(),
            re,
        })
    }

    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    /// Whether the label set matches; a missing label is the empty string.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.matches_value(labels.get(&self.matcher.name).map_or("", String::as_str))
    }

    /// Whether a label value matches.
    pub fn matches_value(&self, v: &str) -> bool {
        match (self.matcher.op, &self.re) {
            (MatchOp::Eq, _) => v == self.matcher.value,
            (MatchOp::NotEq, _) => v != self.matcher.value,
            (MatchOp::Re, Some(re)) => re.is_match(v),
            (MatchOp::NotRe, Some(re)) => !re.is_match(v),
            // `new` compiles a regex for every regex operator.
            (MatchOp::Re | MatchOp::NotRe, None) => unreachable!("regex matcher without regex"),
        }
    }
}

impl fmt::Display for CompiledMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_matcher(&self.matcher))
    }
}

/// A conjunction of matchers: matches when every matcher does, so the empty
/// set matches every label set.
#[derive(Clone, Debug, Default)]
pub struct MatcherSet(Vec<CompiledMatcher>);

impl MatcherSet {
    pub fn new(matchers: &[Matcher]) -> Result<Self, String> {
        matchers
            .iter()
            .map(CompiledMatcher::new)
            .collect::<Result<_, _>>()
            .map(MatcherSet)
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|m| m.matches(labels))
    }

    pub fn iter(&self) -> std::slice::Iter<'_, CompiledMatcher> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a MatcherSet {
    type Item = &'a CompiledMatcher;
    type IntoIter = std::slice::Iter<'a, CompiledMatcher>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// `#[serde(deserialize_with = "deserialize_matchers")]` for config fields
/// written like Alertmanager's `matchers: ['alertname="NodeDown"']`: a list
/// of matcher strings, one matcher each.
pub fn deserialize_matchers<'de, D>(d: D) -> Result<Vec<Matcher>, D::Error>
where
    D: Deserializer<'de>,
{
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| parse_matcher(s).map_err(D::Error::custom))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Ok((name, op, value))`, or `Err(substring of the error)`.
    fn check_parse(input: &str, expected: Result<(&str, MatchOp, &str), &str>) {
        let got = parse_matcher(input);
        match (&got, expected) {
            (Ok(m), Ok((name, op, value))) => {
                assert_eq!(
                    (m.name.as_str(), m.op, m.value.as_str()),
                    (name, op, value),
                    "{input}"
                );
                // Rendering and parsing again is the identity.
                assert_eq!(parse_matcher(&format_matcher(m)).as_ref(), Ok(m), "{input}");
            }
            (Err(e), Err(want)) => {
                assert!(e.contains(want), "{input}: error {e:?} lacks {want:?}");
                assert!(
                    e.starts_with(&format!("invalid matcher {input:?}: ")),
                    "{input}: error {e:?} does not show the input"
                );
                assert!(!e.contains('\n'), "{input}: multi-line error {e:?}");
            }
            _ => panic!("{input}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn parse() {
        use MatchOp::*;
        check_parse("a=b", Ok(("a", Eq, "b")));
        check_parse(r#"a="b""#, Ok(("a", Eq, "b")));
        check_parse(r#"a!="b""#, Ok(("a", NotEq, "b")));
        check_parse(r#"a=~"b.*""#, Ok(("a", Re, "b.*")));
        check_parse(r#"a!~"b|c""#, Ok(("a", NotRe, "b|c")));
        check_parse("a!~b", Ok(("a", NotRe, "b")));
        // Spaces around the operator and the whole matcher.
        check_parse(
            r#"  alertname  =  "NodeDown"  "#,
            Ok(("alertname", Eq, "NodeDown")),
        );
        check_parse(r#"a =~ "x""#, Ok(("a", Re, "x")));
        // Spaces inside quotes are kept; unquoted values are trimmed.
        check_parse(r#"a=" b ""#, Ok(("a", Eq, " b ")));
        check_parse("a= b c ", Ok(("a", Eq, "b c")));
        // Empty values.
        check_parse("a=", Ok(("a", Eq, "")));
        check_parse(r#"a="""#, Ok(("a", Eq, "")));
        check_parse(r#"a!="""#, Ok(("a", NotEq, "")));
        // Escapes: \" \\ \n; other backslashes stay (regex escapes survive).
        check_parse(r#"a="say \"hi\"""#, Ok(("a", Eq, r#"say "hi""#)));
        check_parse(r#"a="back\\slash""#, Ok(("a", Eq, r"back\slash")));
        check_parse(r#"a="two\nlines""#, Ok(("a", Eq, "two\nlines")));
        check_parse(r#"a=~"10\.0\.0\.\d+""#, Ok(("a", Re, r"10\.0\.0\.\d+")));
        check_parse(r"a=trailing\", Ok(("a", Eq, r"trailing\")));
        // `=` after the operator belongs to the value, as in Alertmanager.
        check_parse("a==b", Ok(("a", Eq, "=b")));
        check_parse("a=~=b", Ok(("a", Re, "=b")));
        // Label names: Prometheus ones, and UTF-8/colon names.
        check_parse("_a:b_9=x", Ok(("_a:b_9", Eq, "x")));
        check_parse("Stufe=kritisch", Ok(("Stufe", Eq, "kritisch")));
        check_parse("höhe.m=1", Ok(("höhe.m", Eq, "1")));

        check_parse("", Err("empty matcher"));
        check_parse("   ", Err("empty matcher"));
        check_parse(r#"="x""#, Err("missing label name"));
        check_parse(r#""a"="x""#, Err("quoted label names are not supported"));
        check_parse(r#"{a="x"}"#, Err("braces are not supported"));
        check_parse(
            "alertname",
            Err("expected one of =, !=, =~, !~ after label name \"alertname\""),
        );
        check_parse("a b=c", Err("after label name \"a\""));
        check_parse("a~b", Err("after label name \"a\""));
        check_parse("a<b", Err("after label name \"a<b\""));
        check_parse(r#"a="x"#, Err("missing its closing double quote"));
        check_parse(r#"a="x\""#, Err("missing its closing double quote"));
        check_parse(r#"a="x"y""#, Err("unescaped double quote"));
        check_parse(r#"a=x"y"#, Err("unescaped double quote"));
        check_parse(r#"a=x""#, Err("unescaped double quote"));
        check_parse(r#"sev=~"(""#, Err("regex parse error: unclosed group"));
        check_parse(r#"sev!~"[a-""#, Err("regex parse error"));
        // Valid once wrapped in ^(?:…)$, but not as written: rejected.
        check_parse(r#"a=~"x)|(y""#, Err("regex parse error"));
    }

    #[test]
    fn parse_error_example() {
        assert_eq!(
            parse_matcher(r#"sev=~"(""#).unwrap_err(),
            r#"invalid matcher "sev=~\"(\"": regex parse error: unclosed group"#
        );
    }

    /// Matches `matcher` against `pairs`.
    fn check(matcher: &str, pairs: &[(&str, &str)], expected: bool) {
        let m = CompiledMatcher::new(&parse_matcher(matcher).unwrap()).unwrap();
        assert_eq!(
            m.matches(&Labels::from_strs(pairs)),
            expected,
            "{matcher} vs {pairs:?}"
        );
    }

    #[test]
    fn matches() {
        let api = &[("job", "api")][..];
        let api2 = &[("job", "api-2")][..];
        let none = &[("other", "x")][..];

        check(r#"job="api""#, api, true);
        check(r#"job="api""#, api2, false);
        check(r#"job="api""#, none, false);
        check(r#"job="API""#, api, false);
        check(r#"job!="api""#, api, false);
        check(r#"job!="api""#, api2, true);
        check(r#"job!="api""#, none, true);

        // Anchoring: the whole value must match.
        check(r#"job=~"api""#, api, true);
        check(r#"job=~"api""#, api2, false);
        check(r#"job=~"pi""#, api, false);
        check(r#"job=~"api.*""#, api2, true);
        check(r#"job=~".*-2""#, api2, true);
        check(r#"job!~"api""#, api2, true);
        check(r#"job!~"api.*""#, api2, false);
        // Alternation stays inside the anchors: `^(?:api|web)$`.
        check(r#"job=~"api|web""#, api, true);
        check(r#"job=~"api|web""#, api2, false);
        check(r#"job=~"web|api-2""#, api2, true);
        check(r#"job!~"api|web""#, api, false);
        check(r#"job=~"(?i)API""#, api, true);

        // Missing label == empty string.
        check(r#"job="""#, none, true);
        check(r#"job="""#, api, false);
        check(r#"job!="""#, none, false);
        check(r#"job!="""#, api, true);
        check(r#"job=~".*""#, none, true);
        check(r#"job=~".+""#, none, false);
        check(r#"job!~".+""#, none, true);
        check(r#"job!~"api""#, none, true);
        check(r#"job=~"api""#, none, false);
        // A present but empty label behaves the same as a missing one.
        check(r#"job="""#, &[("job", "")], true);

        // Escaped values match literally.
        check(r#"msg="say \"hi\"""#, &[("msg", r#"say "hi""#)], true);
        check(r#"path="C:\\tmp""#, &[("path", r"C:\tmp")], true);
        check(r#"ip=~"10\.0\.0\.\d+""#, &[("ip", "10.0.0.7")], true);
        check(r#"ip=~"10\.0\.0\.\d+""#, &[("ip", "10x0.0.7")], false);
        // `.` does not match a newline (Go's default as well).
        check(r#"m=~".*""#, &[("m", "a\nb")], false);
        check(r#"m=~"(?s).*""#, &[("m", "a\nb")], true);
    }

    #[test]
    fn compiled_matcher_validates_wire_matchers() {
        let bad = |name: &str, op, value: &str| {
            CompiledMatcher::new(&Matcher {
                name: name.into(),
                op,
                value: value.into(),
            })
            .unwrap_err()
        };
        assert_eq!(
            bad("sev", MatchOp::Re, "("),
            r#"invalid matcher sev=~"(": regex parse error: unclosed group"#
        );
        assert!(bad("", MatchOp::Eq, "x").contains("empty label name"));
        assert!(bad("a b", MatchOp::Eq, "x").contains("contains whitespace"));
        assert!(bad("a=b", MatchOp::Eq, "x").contains("contains whitespace or one of"));
    }

    /// `matchers` (matcher strings) against `pairs`.
    fn check_set(matchers: &[&str], pairs: &[(&str, &str)], expected: bool) {
        let ms: Vec<Matcher> = matchers.iter().map(|s| parse_matcher(s).unwrap()).collect();
        let set = MatcherSet::new(&ms).unwrap();
        assert_eq!(set.len(), ms.len());
        assert_eq!(
            set.matches(&Labels::from_strs(pairs)),
            expected,
            "{matchers:?} vs {pairs:?}"
        );
    }

    #[test]
    fn matcher_set_is_a_conjunction() {
        let l = &[("alertname", "NodeDown"), ("severity", "critical")][..];
        check_set(&[], l, true);
        check_set(&[], &[], true);
        check_set(&[r#"alertname="NodeDown""#], l, true);
        check_set(
            &[r#"alertname="NodeDown""#, r#"severity=~"crit.*""#],
            l,
            true,
        );
        check_set(
            &[r#"alertname="NodeDown""#, r#"severity="warning""#],
            l,
            false,
        );
        check_set(&[r#"alertname="NodeDown""#, r#"instance="""#], l, true);
        check_set(&[r#"alertname="NodeDown""#, r#"instance!="""#], l, false);
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(deserialize_with = "deserialize_matchers")]
        matchers: Vec<Matcher>,
    }

    /// A JSON config (same data model as YAML) -> matchers or error substring.
    fn check_de(json: &str, expected: Result<&[&str], &str>) {
        let got = serde_json::from_str::<Cfg>(json);
        match (got, expected) {
            (Ok(cfg), Ok(want)) => {
                let want: Vec<Matcher> = want.iter().map(|s| parse_matcher(s).unwrap()).collect();
                assert_eq!(cfg.matchers, want, "{json}");
            }
            (Err(e), Err(want)) => {
                assert!(e.to_string().contains(want), "{json}: {e} lacks {want:?}")
            }
            (got, _) => panic!("{json}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn deserialize() {
        check_de(r#"{"matchers": []}"#, Ok(&[]));
        check_de(
            r#"{"matchers": ["alertname=\"NodeDown\"", "severity=~\"warn|crit\""]}"#,
            Ok(&[r#"alertname="NodeDown""#, r#"severity=~"warn|crit""#]),
        );
        check_de(
            r#"{"matchers": ["a=b", "sev=~\"(\""]}"#,
            Err(r#"invalid matcher "sev=~\"(\"": regex parse error"#),
        );
        check_de(r#"{"matchers": "a=b"}"#, Err("expected a sequence"));
    }
}
