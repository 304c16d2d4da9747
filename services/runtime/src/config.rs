//! Configuration loading.
//!
//! The pipeline (listeners, tokens, streams, later routes and policies) comes
//! from one YAML file, `config/tocsin.yaml` by default. Runtime knobs (log
//! level, grace period, admin address) come from flags and environment.
//!
//! - Every config struct uses `deny_unknown_fields`, so a typo is an error,
//!   not a silently ignored setting.
//! - Secrets are never written in the file: [`Secret`] expands `${ENV_VAR}`
//!   (with `${VAR:-default}`), and every secret field has a `*_file` twin
//!   read through [`SecretFile`] (relative paths are relative to the config
//!   file's folder). `Debug` of a secret prints `***`.
//! - Errors carry file, line and column and say how to fix the problem:
//!   `config/tocsin.yaml:12:7: ingest.tokens[0]: unknown field `tokn`, ...`.

use std::{
    cell::RefCell,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{de, de::DeserializeOwned, Deserialize, Deserializer};

/// A configuration problem, located where possible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl ConfigError {
    /// An error about the file as a whole (no line), e.g. a missing section.
    pub fn whole_file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            line: None,
            column: None,
            message: message.into(),
        }
    }
}

thread_local! {
    /// Folder of the config file being deserialized on this thread, so
    /// `*_file` paths can be resolved relative to it.
    static CONFIG_DIR: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// Reads and deserializes a YAML config file.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::whole_file(
            path,
            format!(
                "cannot read config file: {e}; pass the right file with --config \
                 (or TOCSIN_CONFIG), or start from the shipped config/tocsin.yaml"
            ),
        )
    })?;
    from_str(path, &text)
}

/// Deserializes YAML `text` as if read from `path` (used by [`load`] and tests).
pub fn from_str<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .map(Path::to_path_buf);
    CONFIG_DIR.with(|d| *d.borrow_mut() = dir);
    let result = serde_yaml_ng::from_str::<T>(text);
    CONFIG_DIR.with(|d| *d.borrow_mut() = None);
    result.map_err(|e| yaml_error(path, text, &e))
}

fn yaml_error(path: &Path, text: &str, e: &serde_yaml_ng::Error) -> ConfigError {
    let mut message = e.to_string();
    // serde_yaml appends " at line L column C"; we print the place up front.
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    if message.contains("unknown field") {
        message.push_str("; check the spelling, or remove the key");
    }
    let mut at = e.location().map(|l| (l.line(), l.column()));
    // A section's own checks run once it is read, where serde_yaml can only
    // name the start of the document; their messages begin with the path of
    // the key at fault (`ingest.idle_timeout is 0`), which is then looked
    // up. A place serde_yaml found inside that key's value stays.
    if let Some(key) = leading_path(&message).and_then(|p| locate_key(text, p)) {
        let inside = at.is_some_and(|(line, _)| line >= key.line && line < key.end);
        if !inside {
            at = Some((key.line, key.column));
        }
    }
    ConfigError {
        file: path.to_path_buf(),
        line: at.map(|a| a.0),
        column: at.map(|a| a.1),
        message,
    }
}

/// The dotted key path a message starts with (`ingest.limits.alert_bytes`,
/// `ingest.tokens[1].source`), if it starts with one.
fn leading_path(message: &str) -> Option<&str> {
    let word = message.split_whitespace().next()?;
    let word = word.trim_end_matches([':', ',', ';']);
    (word.contains('.') && is_key_path(word)).then_some(word)
}

/// Whether `word` can name a key of the config: a key (`max_in_memory`) or
/// a path of them (`ingest.tokens[1].source`).
pub fn is_key_path(word: &str) -> bool {
    word.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'))
}

/// Where a key stands in a YAML file ([`locate_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPlace {
    /// 1-based line and column of the key.
    pub line: usize,
    pub column: usize,
    /// The 1-based line after the key's block (its value's last line + 1).
    pub end: usize,
}

/// Where the key a dotted path names (`ingest.limits.alert_bytes`,
/// `ingest.tokens[1].source`) is written in YAML `text` in block style; a
/// key written in flow style (`limits: {a: 1}`) or left out gives its
/// nearest ancestor that is found. None when not even the first key is.
/// A reading of the text's lines and indentation, enough for config files
/// (no anchors, multi-line scalars are passed over as their lines).
pub fn locate_key(text: &str, path: &str) -> Option<KeyPlace> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found: Option<KeyPlace> = None;
    // The lines to search, and whether the first is a sequence item whose
    // first key stands after its dash.
    let (mut from, mut to, mut item) = (0, lines.len(), false);
    for step in path_steps(path) {
        let content = content_lines(&lines, from, to, item);
        let Some(&(_, indent, _)) = content.first() else {
            break;
        };
        let hit = match step {
            Step::Key(key) => content
                .iter()
                .find(|(_, i, rest)| *i == indent && key_starts(rest, key))
                .map(|(n, i, _)| (*n, *i)),
            Step::Index(n) => content
                .iter()
                .filter(|(_, i, rest)| *i == indent && is_item(rest))
                .nth(n)
                .map(|(n, i, _)| (*n, *i)),
        };
        let Some((line, column)) = hit else { break };
        // The block ends at the next line as shallow: for a key, a
        // sibling key (its sequence's items may stand at its own
        // indentation); for an item, the next item or a sibling key.
        let end = content
            .iter()
            .find(|(n, i, rest)| {
                *n > line
                    && match step {
                        Step::Key(_) => *i < column || (*i == column && !is_item(rest)),
                        Step::Index(_) => *i <= column,
                    }
            })
            .map_or(to, |(n, _, _)| *n);
        found = Some(KeyPlace {
            line: line + 1,
            column: column + 1,
            end: end + 1,
        });
        (from, to, item) = match step {
            Step::Key(_) => (line + 1, end, false),
            Step::Index(_) => (line, end, true),
        };
    }
    found
}

enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// `a.b[2].c` as `Key(a) Key(b) Index(2) Key(c)`.
fn path_steps(path: &str) -> Vec<Step<'_>> {
    let mut steps = Vec::new();
    for part in path.split('.') {
        let mut rest = part;
        if let Some(i) = rest.find('[') {
            if i > 0 {
                steps.push(Step::Key(&rest[..i]));
            }
            rest = &rest[i..];
            while let Some(inner) = rest.strip_prefix('[') {
                let Some(close) = inner.find(']') else { break };
                if let Ok(n) = inner[..close].parse() {
                    steps.push(Step::Index(n));
                }
                rest = &inner[close + 1..];
            }
        } else if !rest.is_empty() {
            steps.push(Step::Key(rest));
        }
    }
    steps
}

/// The lines `from..to` that hold something (not blank, not only a
/// comment): (index, indentation, text after it). With `item`, the first
/// line is a sequence item (`- key: value`), read as what follows its
/// dash, indented as far as that stands.
fn content_lines<'a>(
    lines: &[&'a str],
    from: usize,
    to: usize,
    item: bool,
) -> Vec<(usize, usize, &'a str)> {
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate().take(to).skip(from) {
        let mut rest = line.trim_start();
        let mut indent = line.len() - rest.len();
        if item && n == from {
            if let Some(after) = rest.strip_prefix('-') {
                let value = after.trim_start();
                indent += 1 + after.len() - value.len();
                rest = value;
            }
        }
        if rest.is_empty() || rest.starts_with('#') {
            continue;
        }
        out.push((n, indent, rest));
    }
    out
}

/// Whether `rest` (a line after its indentation) is the key `key`.
fn key_starts(rest: &str, key: &str) -> bool {
    let bare = rest.strip_prefix(key);
    let double = rest
        .strip_prefix('"')
        .and_then(|r| r.strip_prefix(key))
        .and_then(|r| r.strip_prefix('"'));
    let single = rest
        .strip_prefix('\'')
        .and_then(|r| r.strip_prefix(key))
        .and_then(|r| r.strip_prefix('\''));
    [bare, double, single]
        .into_iter()
        .flatten()
        .any(|after| after.trim_start().starts_with(':'))
}

/// Whether `rest` is a sequence item (`- x`, or `-` alone).
fn is_item(rest: &str) -> bool {
    rest == "-" || rest.starts_with("- ")
}

/// Resolves `p` against the folder of the config file being loaded.
pub fn resolve_path(p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    CONFIG_DIR.with(|d| match &*d.borrow() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    })
}

/// Expands `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`.
pub fn expand_env(input: &str) -> Result<String, String> {
    expand_with(input, |name| std::env::var(name).ok())
}

fn expand_with(input: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let end = after.find('}').ok_or_else(|| {
                format!("unclosed `${{` in {input:?}; write ${{NAME}}, or $$ for a literal $")
            })?;
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!(
                    "`${{{inner}}}` is not a valid environment variable reference; names use A-Z, 0-9 and _"
                ));
            }
            match (lookup(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (referenced as ${{{name}}}); \
                         export it, give a default with ${{{name}:-value}}, or use the *_file form"
                    ))
                }
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Deserializes a string and converts it inside the scalar's visitor, so an
/// error carries the line and column of the value itself (serde_yaml only
/// locates errors raised while the scalar is being visited).
fn from_scalar<'de, D, T, F>(d: D, expecting: &'static str, f: F) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(&str) -> Result<T, String>,
{
    struct V<F>(Option<F>, &'static str);
    impl<'de, T, F: FnOnce(&str) -> Result<T, String>> de::Visitor<'de> for V<F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.1)
        }
        fn visit_str<E: de::Error>(mut self, v: &str) -> Result<T, E> {
            match self.0.take() {
                Some(f) => f(v).map_err(E::custom),
                None => Err(E::custom("value visited twice")),
            }
        }
    }
    d.deserialize_str(V(Some(f), expecting))
}

// Which optional top-level sections a load reads (`None`: all).
thread_local! {
    static READ_SECTIONS: std::cell::RefCell<Option<Vec<String>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `load` (a config load) reading, of the sections deserialized
/// through [`section`], only those named in `sections`; the others are
/// skipped as if absent (their syntax, secrets and `${ENV}` references
/// unread), so a host needs only the secrets of the services it runs.
/// `check-config` reads them all.
pub fn reading_sections<T>(sections: &[&str], load: impl FnOnce() -> T) -> T {
    READ_SECTIONS
        .with(|r| *r.borrow_mut() = Some(sections.iter().map(|s| s.to_string()).collect()));
    let out = load();
    READ_SECTIONS.with(|r| *r.borrow_mut() = None);
    out
}

/// Deserializes the optional top-level section `name` (a
/// `deserialize_with` helper for a service's own section): its value, or,
/// when [`reading_sections`] leaves it out, its default (absent).
pub fn section<'de, D, T>(name: &'static str, d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    let read = READ_SECTIONS.with(|r| {
        r.borrow()
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    });
    if read {
        T::deserialize(d)
    } else {
        de::IgnoredAny::deserialize(d)?;
        Ok(T::default())
    }
}

/// A string with `${ENV}` references expanded (for non-secret values such as URLs).
#[derive(Clone, PartialEq, Eq)]
pub struct EnvString(pub String);

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_scalar(d, "a string", |s| expand_env(s).map(EnvString))
    }
}

impl fmt::Debug for EnvString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for EnvString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A secret value: `${ENV}` expanded, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself. Call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Secret::deserialize_checked(d, |_| Ok(()))
    }
}

impl Secret {
    /// Deserializes a secret and applies `check` (e.g. a shortest length)
    /// to its value, so an error points at the line that sets it.
    pub fn deserialize_checked<'de, D: Deserializer<'de>>(
        d: D,
        check: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<Secret, D::Error> {
        from_scalar(d, "a secret string", |raw| {
            let value = expand_env(raw)?;
            if value.is_empty() {
                return Err(
                    "secret is empty; set it (e.g. from an environment variable) or remove the key"
                        .into(),
                );
            }
            check(&value)?;
            Ok(Secret(value))
        })
    }
}

/// A secret read from a file (the `*_file` form). The path may use `${ENV}`
/// and is relative to the config file's folder; trailing white space and
/// newlines are trimmed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretFile {
    pub path: PathBuf,
    secret: Secret,
}

impl SecretFile {
    pub fn secret(&self) -> &Secret {
        &self.secret
    }
}

impl fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretFile({})", self.path.display())
    }
}

impl<'de> Deserialize<'de> for SecretFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        SecretFile::deserialize_checked(d, |_| Ok(()))
    }
}

impl SecretFile {
    /// Deserializes a secret file and applies `check` to the secret it
    /// holds, so an error points at the line that names the file.
    pub fn deserialize_checked<'de, D: Deserializer<'de>>(
        d: D,
        check: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<SecretFile, D::Error> {
        from_scalar(d, "a path to a file holding a secret", |raw| {
            let path = resolve_path(Path::new(&expand_env(raw)?));
            let content = std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "cannot read secret file {}: {e}; create it or fix the path",
                    path.display()
                )
            })?;
            let value = content.trim_end().to_string();
            if value.is_empty() {
                return Err(format!("secret file {} is empty", path.display()));
            }
            check(&value).map_err(|e| format!("secret file {}: {e}", path.display()))?;
            Ok(SecretFile {
                path,
                secret: Secret(value),
            })
        })
    }
}

/// Picks the one secret given as `name` or `name_file`.
pub fn one_secret(
    name: &str,
    inline: Option<Secret>,
    file: Option<SecretFile>,
) -> Result<Option<Secret>, String> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(format!(
            "both `{name}` and `{name}_file` are set; keep one of them"
        )),
        (Some(s), None) => Ok(Some(s)),
        (None, Some(f)) => Ok(Some(f.secret)),
        (None, None) => Ok(None),
    }
}

/// A path in the config, `${ENV}` expanded and resolved against the config file's folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigPath(pub PathBuf);

impl<'de> Deserialize<'de> for ConfigPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_scalar(d, "a file path", |raw| {
            Ok(ConfigPath(resolve_path(Path::new(&expand_env(raw)?))))
        })
    }
}

/// A duration written as `500ms`, `5s`, `2m`, `1h`, `7d`, `1w` or a
/// combination like `1h30m`. The default is zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }
    pub fn get(self) -> Duration {
        self.0
    }
}

/// The error for `key` set to `d` below its bound `least`: `"{key} is {d};
/// use at least {least} (default {default})"`, the one wording every
/// section's checks use.
pub fn at_least(
    key: &str,
    d: HumanDuration,
    least: HumanDuration,
    default: &str,
) -> Option<String> {
    (d.0 < least.0).then(|| format!("{key} is {d}; use at least {least} (default {default})"))
}

/// Parses a [`HumanDuration`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let hint = "write a duration like 500ms, 30s, 5m, 1h30m, 7d or 2w";
    let s = s.trim();
    if s.is_empty() {
        return Err(format!("empty duration; {hint}"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("invalid duration {s:?}; {hint}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("number too large in duration {s:?}"))?;
        rest = rest[digits..].trim_start();
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            "w" => Duration::from_secs(n.saturating_mul(7 * 86_400)),
            "" => return Err(format!("duration {s:?} lacks a unit; {hint}")),
            other => return Err(format!("unknown unit {other:?} in duration {s:?}; {hint}")),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_scalar(d, "a duration such as 30s or 5m", |s| {
            parse_duration(s).map(HumanDuration)
        })
    }
}

/// As a person writes it (and [`parse_duration`] reads it): `500ms`,
/// `30s`, `1m30s`, `1h`, `30d`.
impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_millis() != 0 || d.as_secs() == 0 {
            return write!(f, "{}ms", d.as_millis());
        }
        let mut rest = d.as_secs();
        for (unit, secs) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
            if rest >= secs {
                write!(f, "{}{unit}", rest / secs)?;
                rest %= secs;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn durations_are_shown_as_written_and_read_back() {
        for (secs, millis, shown) in [
            (0, 0, "0ms"),
            (0, 250, "250ms"),
            (1, 500, "1500ms"),
            (30, 0, "30s"),
            (90, 0, "1m30s"),
            (3_600, 0, "1h"),
            (5_400, 0, "1h30m"),
            (2_592_000, 0, "30d"),
            (90_061, 0, "1d1h1m1s"),
        ] {
            let d = Duration::from_secs(secs) + Duration::from_millis(millis);
            assert_eq!(HumanDuration(d).to_string(), shown);
            assert_eq!(parse_duration(shown), Ok(d), "{shown} reads back");
        }
    }

    #[test]
    fn expansion() {
        let check = |input: &str, expected: Result<&str, &str>| {
            let got = expand_with(input, env);
            match expected {
                Ok(e) => assert_eq!(got.as_deref(), Ok(e), "{input}"),
                Err(fragment) => {
                    let err = got.expect_err(input);
                    assert!(err.contains(fragment), "{input}: {err}");
                }
            }
        };
        check("plain", Ok("plain"));
        check("${TOKEN}", Ok("s3cret"));
        check("a-${TOKEN}-b", Ok("a-s3cret-b"));
        check("${MISSING:-dflt}", Ok("dflt"));
        check("${TOKEN:-dflt}", Ok("s3cret"));
        check("$$5", Ok("$5"));
        check("cost $5", Ok("cost $5"));
        check("${EMPTY}", Ok(""));
        check("${MISSING}", Err("environment variable MISSING is not set"));
        check("${TOKEN", Err("unclosed"));
        check("${bad-name}", Err("not a valid environment variable"));
    }

    #[test]
    fn durations() {
        let ok =
            |s: &str, secs: f64| assert_eq!(parse_duration(s).unwrap().as_secs_f64(), secs, "{s}");
        ok("500ms", 0.5);
        ok("5s", 5.0);
        ok("2m", 120.0);
        ok("1h30m", 5400.0);
        ok("7d", 604_800.0);
        ok("1w", 604_800.0);
        ok("0", 0.0);
        for bad in ["", "5", "5x", "m", "1.5s", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
        #[serde(default)]
        secret: Option<Secret>,
        #[serde(default)]
        secret_file: Option<SecretFile>,
        #[serde(default)]
        timeout: Option<HumanDuration>,
    }

    #[test]
    fn errors_are_located() {
        let path = Path::new("conf/x.yaml");
        let err = from_str::<Sample>(path, "name: a\nnmae: b\n").unwrap_err();
        assert_eq!((err.line, err.column), (Some(2), Some(1)), "{err}");
        assert!(
            err.to_string()
                .starts_with("conf/x.yaml:2:1: unknown field `nmae`"),
            "{err}"
        );

        let err = from_str::<Sample>(path, "name: a\ntimeout: 5 parsecs\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.message.contains("unknown unit"), "{err}");

        let err = from_str::<Sample>(path, "name: a\nsecret: ${TOCSIN_TEST_SURELY_UNSET_VAR}\n")
            .unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(
            err.message
                .contains("TOCSIN_TEST_SURELY_UNSET_VAR is not set"),
            "{err}"
        );

        let err = from_str::<Sample>(path, "name: [a\n").unwrap_err();
        assert!(err.line.is_some(), "{err}");
    }

    /// A section checked after it is read, as the services' sections are
    /// (`#[serde(try_from)]`): its errors name the key by its path.
    #[derive(Debug, Deserialize)]
    #[serde(try_from = "RawSection")]
    struct Section;

    #[derive(Deserialize)]
    struct RawSection {
        a: u32,
        #[serde(default)]
        items: Vec<RawItem>,
        #[serde(default)]
        limits: std::collections::BTreeMap<String, u32>,
    }

    #[derive(Deserialize)]
    struct RawItem {
        b: String,
    }

    impl TryFrom<RawSection> for Section {
        type Error = String;
        fn try_from(r: RawSection) -> Result<Section, String> {
            if r.a == 0 {
                return Err("sect.a is 0; use at least 1".into());
            }
            if let Some(i) = r.items.iter().position(|i| i.b.is_empty()) {
                return Err(format!("sect.items[{i}].b is empty"));
            }
            if let Some((k, _)) = r.limits.iter().find(|(_, v)| **v == 0) {
                return Err(format!("sect.limits.{k} is 0"));
            }
            Ok(Section)
        }
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Top {
        first: String,
        sect: Section,
    }

    #[test]
    fn errors_found_after_a_section_is_read_point_at_the_key_they_name() {
        let path = Path::new("t.yaml");
        let at = |text: &str| {
            let e = from_str::<Top>(path, text).unwrap_err();
            (e.line, e.column, e.message)
        };
        let text = "# comment\nfirst: x\nsect:\n  # a: 1\n  items: []\n  a: 0   # zero\n";
        let (line, column, message) = at(text);
        assert_eq!((line, column), (Some(6), Some(3)), "{message}");
        let text = "first: x\nsect:\n  a: 1\n  items:\n    - b: x\n    -   b: \"\"\n    - b: y\n";
        let (line, column, message) = at(text);
        assert_eq!((line, column), (Some(6), Some(9)), "{message}");
        let text = "first: x\nsect:\n  a: 1\n  limits:\n    one: 1\n    two: 0\n";
        assert_eq!(at(text).0, Some(6));
        // Items at their key's own indentation.
        let text = "first: x\nsect:\n  items:\n  - b: x\n  - b: \"\"\n  a: 1\n";
        assert_eq!((at(text).0, at(text).1), (Some(5), Some(5)));
        // A key written in flow style: the nearest key found, its parent.
        let text = "first: x\nsect:\n  a: 1\n  limits: {one: 1, two: 0}\n";
        assert_eq!(at(text).0, Some(4));
        // A key left out (its default was checked): the section.
        let text = "first: x\nsect: {a: 0}\n";
        assert_eq!(at(text).0, Some(2));
    }

    #[test]
    fn secret_files_resolve_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "from-file\n").unwrap();
        let cfg: Sample = from_str(
            &dir.path().join("tocsin.yaml"),
            "name: a\nsecret_file: tok\n",
        )
        .unwrap();
        let f = cfg.secret_file.unwrap();
        assert_eq!(f.secret().expose(), "from-file");
        assert!(!format!("{f:?}").contains("from-file"));

        let err = from_str::<Sample>(&dir.path().join("t.yaml"), "name: a\nsecret_file: nope\n")
            .unwrap_err();
        assert!(err.message.contains("cannot read secret file"), "{err}");
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(***)");
    }

    /// The loader over hostile text: whatever the file holds, loading
    /// returns a value or a located error, never a panic. Cases: 256, or
    /// `PROPTEST_CASES`; a failure prints its seed and minimal input.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            let cases = std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(256);
            ProptestConfig {
                cases,
                ..ProptestConfig::default()
            }
        }

        /// YAML made of the pieces real config files use, in any order.
        fn yaml_soup() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                prop::sample::select(vec![
                    "name: ",
                    "secret: ",
                    "secret_file: ",
                    "timeout: ",
                    "nmae: ",
                    "\n",
                    "  ",
                    "- ",
                    ": ",
                    "[",
                    "]",
                    "{",
                    "}",
                    ",",
                    "\"",
                    "'",
                    "#",
                    "&a ",
                    "*a",
                    "!!str ",
                    "${",
                    "}",
                    "$$",
                    "${TOKEN:-x}",
                    "${UNSET_TOCSIN_FUZZ_VAR}",
                    "5s",
                    "1h30m",
                    "99999999999999999999s",
                    "ms",
                    "~",
                    "null",
                    "true",
                    "0x1F",
                    "\t",
                    "|\n  ",
                    ">-\n  ",
                    "---\n",
                    "...\n",
                    "? ",
                    "\u{feff}",
                    "é",
                    "\u{0}",
                ])
                .prop_map(String::from),
                ".{0,6}",
            ];
            prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn loading_arbitrary_text_never_panics(text in ".{0,200}") {
                let _ = from_str::<Sample>(Path::new("f.yaml"), &text);
                let _ = from_str::<serde_yaml_ng::Value>(Path::new("f.yaml"), &text);
            }

            #[test]
            fn loading_yaml_like_text_never_panics(text in yaml_soup()) {
                if let Err(e) = from_str::<Sample>(Path::new("dir/f.yaml"), &text) {
                    prop_assert!(e.to_string().starts_with("dir/f.yaml"), "{e}");
                    prop_assert!(!e.message.is_empty());
                }
                let _ = from_str::<Vec<Sample>>(Path::new("f.yaml"), &text);
            }

            #[test]
            fn scalars_never_panic(text in ".{0,40}") {
                let _ = parse_duration(&text);
                let _ = expand_with(&text, env);
            }
        }

        #[test]
        fn deep_nesting_and_alias_bombs_are_errors() {
            for text in [
                "[".repeat(10_000),
                "{a: ".repeat(5_000),
                "- ".repeat(5_000),
                // Billion laughs: each level doubles the previous.
                (1..32).fold("a0: &a0 [x, x]\n".to_string(), |t, i| {
                    format!("{t}a{i}: &a{i} [*a{p}, *a{p}]\n", p = i - 1)
                }),
            ] {
                let _ = from_str::<Sample>(Path::new("f.yaml"), &text);
                let _ = from_str::<serde_yaml_ng::Value>(Path::new("f.yaml"), &text);
            }
        }
    }
}
