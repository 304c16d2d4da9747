//! `config/tocsin.yaml` documents every key: a walk over the config schema
//! (the serde structs behind `tocsin::config::Config`, every section and
//! every nested struct) lists each key, and the test fails naming those the
//! shipped file does not mention, either set or in a comment (`# key:`).
//!
//! The walk asks serde itself: a probing deserializer offers each struct
//! one field at a time and records the field names serde's derive passes to
//! `deserialize_struct`, so a new field is found without listing it here.

use std::{cell::RefCell, collections::BTreeSet, path::Path};

use serde::{
    de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor},
    Deserialize,
};
use tocsin::config::Config;

/// What to offer at one level of the walk.
#[derive(Clone, Debug)]
enum Step {
    /// This field of a struct.
    Field(&'static str),
    /// One element of a list.
    Elem,
    /// One entry of a map (any key).
    Entry,
}

/// What the type at the end of a walk asked for.
#[derive(Clone, Debug)]
enum Found {
    Struct(&'static str, &'static [&'static str]),
    Seq,
    Map,
    Leaf,
}

#[derive(Debug)]
struct Stop(String);

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Stop(msg.to_string())
    }
}

/// Follows `route`, then records what the type there asks for.
struct Probe<'a> {
    route: &'a [Step],
    found: &'a RefCell<Option<Found>>,
}

impl<'a> Probe<'a> {
    fn at_end(&self) -> bool {
        self.route.is_empty()
    }

    fn record(&self, f: Found) -> Stop {
        if self.found.borrow().is_none() {
            *self.found.borrow_mut() = Some(f);
        }
        Stop("probe: recorded".into())
    }

    fn next(&self) -> Probe<'a> {
        Probe {
            route: &self.route[1..],
            found: self.found,
        }
    }
}

macro_rules! leaf {
    ($($m:ident),*) => {
        $(fn $m<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, Stop> {
            Err(self.record(Found::Leaf))
        })*
    };
}

impl<'de, 'a> de::Deserializer<'de> for Probe<'a> {
    type Error = Stop;

    leaf!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_unit,
        deserialize_identifier,
        deserialize_ignored_any
    );

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Stop> {
        v.visit_some(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _v: V,
    ) -> Result<V::Value, Stop> {
        Err(self.record(Found::Leaf))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Stop> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Stop> {
        if self.at_end() {
            return Err(self.record(Found::Seq));
        }
        match self.route[0] {
            Step::Elem => v.visit_seq(OneElem(Some(self.next()))),
            _ => Err(Stop("probe: a list where the route says otherwise".into())),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, _v: V) -> Result<V::Value, Stop> {
        Err(self.record(Found::Leaf))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        _v: V,
    ) -> Result<V::Value, Stop> {
        Err(self.record(Found::Leaf))
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Stop> {
        if self.at_end() {
            return Err(self.record(Found::Map));
        }
        match self.route[0] {
            Step::Entry => v.visit_map(OneEntry {
                key: Some(Key::Any),
                value: Some(self.next()),
            }),
            _ => Err(Stop("probe: a map where the route says otherwise".into())),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Stop> {
        if self.at_end() {
            return Err(self.record(Found::Struct(name, fields)));
        }
        match self.route[0] {
            Step::Field(f) => v.visit_map(OneEntry {
                key: Some(Key::Named(f)),
                value: Some(self.next()),
            }),
            _ => Err(Stop(
                "probe: a struct where the route says otherwise".into(),
            )),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        _v: V,
    ) -> Result<V::Value, Stop> {
        Err(self.record(Found::Leaf))
    }
}

struct OneElem<'a>(Option<Probe<'a>>);

impl<'de, 'a> SeqAccess<'de> for OneElem<'a> {
    type Error = Stop;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Stop> {
        match self.0.take() {
            Some(p) => seed.deserialize(p).map(Some),
            None => Ok(None),
        }
    }
}

enum Key {
    Named(&'static str),
    /// A map key of any type: a string, or an enum's first variant.
    Any,
}

struct OneEntry<'a> {
    key: Option<Key>,
    value: Option<Probe<'a>>,
}

impl<'de, 'a> MapAccess<'de> for OneEntry<'a> {
    type Error = Stop;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        match self.key.take() {
            Some(Key::Named(f)) => seed
                .deserialize(IntoDeserializer::<Stop>::into_deserializer(f))
                .map(Some),
            Some(Key::Any) => seed.deserialize(AnyKey).map(Some),
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        seed.deserialize(self.value.take().expect("value after key"))
    }
}

/// A map key: `critical` for enums (their first variant), `x` otherwise.
struct AnyKey;

impl<'de> de::Deserializer<'de> for AnyKey {
    type Error = Stop;
    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Stop> {
        v.visit_str("x")
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Stop> {
        v.visit_enum(IntoDeserializer::<Stop>::into_deserializer(variants[0]))
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

/// What the type at `route` asks for.
fn probe(route: &[Step]) -> Option<Found> {
    let found = RefCell::new(None);
    let _ = Config::deserialize(Probe {
        route,
        found: &found,
    });
    found.into_inner()
}

/// Every key path of the schema: `notifier.email.port`, `*` for a map's
/// entries (`nats.credentials.*.user`); list elements add no segment.
fn schema_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    // (route, key path, struct names on the way: recursive types stop)
    let mut todo: Vec<(Vec<Step>, Vec<String>, Vec<&'static str>)> = vec![(vec![], vec![], vec![])];
    while let Some((route, path, structs)) = todo.pop() {
        match probe(&route) {
            Some(Found::Struct(name, fields)) => {
                if structs.contains(&name) {
                    continue;
                }
                for f in fields {
                    let mut p = path.clone();
                    p.push(f.to_string());
                    keys.insert(p.join("."));
                    let mut r = route.clone();
                    r.push(Step::Field(f));
                    let mut s = structs.clone();
                    s.push(name);
                    todo.push((r, p, s));
                }
            }
            Some(Found::Seq) => {
                let mut r = route.clone();
                r.push(Step::Elem);
                todo.push((r, path, structs));
            }
            Some(Found::Map) => {
                let mut r = route.clone();
                r.push(Step::Entry);
                let mut p = path.clone();
                p.push("*".into());
                todo.push((r, p, structs));
            }
            Some(Found::Leaf) | None => {}
        }
    }
    keys
}

/// `key` is a config key: lower-case letters, digits and `_`.
fn is_key(key: &str) -> bool {
    key.chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Keys inside a YAML flow value (`{a: 1, b: {c: 2}}`, `[{user: x}]`) under `path`.
fn flow_keys(s: &[char], i: &mut usize, path: &str, out: &mut BTreeSet<String>) {
    let ws = |i: &mut usize| {
        while *i < s.len() && s[*i] == ' ' {
            *i += 1;
        }
    };
    ws(i);
    if *i >= s.len() {
        return;
    }
    match s[*i] {
        '{' => {
            *i += 1;
            loop {
                ws(i);
                if *i >= s.len() {
                    return;
                }
                if s[*i] == '}' {
                    *i += 1;
                    return;
                }
                let start = *i;
                while *i < s.len() && !matches!(s[*i], ':' | ',' | '}') {
                    *i += 1;
                }
                let key: String = s[start..*i].iter().collect::<String>().trim().to_string();
                let child = format!("{path}.{key}");
                if *i < s.len() && s[*i] == ':' {
                    *i += 1;
                    if is_key(&key) {
                        out.insert(child.clone());
                    }
                    flow_keys(s, i, &child, out);
                }
                ws(i);
                if *i < s.len() && s[*i] == ',' {
                    *i += 1;
                }
            }
        }
        '[' => {
            *i += 1;
            loop {
                ws(i);
                if *i >= s.len() {
                    return;
                }
                if s[*i] == ']' {
                    *i += 1;
                    return;
                }
                let before = *i;
                flow_keys(s, i, path, out);
                ws(i);
                // Past a comma, or past a character nothing consumed.
                if (*i < s.len() && s[*i] == ',') || *i == before {
                    *i += 1;
                }
            }
        }
        q @ ('"' | '\'') => {
            *i += 1;
            while *i < s.len() && s[*i] != q {
                *i += 1;
            }
            *i += 1;
        }
        _ => {
            while *i < s.len() && !matches!(s[*i], ',' | '}' | ']') {
                *i += 1;
            }
        }
    }
}

/// Every key path the shipped file mentions, set or commented out
/// (`# key: value` lines count, at their indentation after the `#`).
fn documented_keys(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    for raw in text.lines() {
        let lead = raw.len() - raw.trim_start().len();
        let rest = raw.trim_start();
        // `#   key:` and `#   # key:` (an alternative inside an example).
        let (mut col, mut body) = (lead, rest);
        while let Some(after) = body.strip_prefix('#') {
            let after = after.strip_prefix(' ').unwrap_or(after);
            col += after.len() - after.trim_start().len();
            body = after.trim_start();
        }
        while let Some(item) = body.strip_prefix("- ") {
            let inner = item.len() - item.trim_start().len();
            col += 2 + inner;
            body = item.trim_start();
        }
        let body = body.split(" #").next().unwrap_or(body).trim_end();
        if body.is_empty() {
            continue;
        }
        while stack.last().is_some_and(|(c, _)| *c >= col) {
            stack.pop();
        }
        let parent: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
        let parent = parent.join(".");
        if body.starts_with('{') {
            let chars: Vec<char> = body.chars().collect();
            flow_keys(&chars, &mut 0, &parent, &mut keys);
            continue;
        }
        let Some((key, value)) = body.split_once(':') else {
            continue;
        };
        if !is_key(key) {
            continue;
        }
        let path = if parent.is_empty() {
            key.to_string()
        } else {
            format!("{parent}.{key}")
        };
        keys.insert(path.clone());
        let chars: Vec<char> = value.chars().collect();
        flow_keys(&chars, &mut 0, &path, &mut keys);
        stack.push((col, key.to_string()));
    }
    keys
}

/// Whether `key` (from the schema) is documented: the shipped file has a
/// key path ending in its last two segments (a key under its parent's
/// name, so `notifier.slack.guard.timeout` is covered by the one `guard:`
/// example that every channel takes), `*` matching any segment.
fn is_documented(key: &str, documented: &BTreeSet<String>) -> bool {
    // Every `nats.credentials.<identity>` entry takes the keys of the
    // shared credentials under `nats:`, documented once there.
    if let Some(rest) = key.strip_prefix("nats.credentials.") {
        if let Some((identity, method)) = rest.split_once('.') {
            return is_documented(&format!("nats.credentials.{identity}"), documented)
                && is_documented(&format!("nats.{method}"), documented);
        }
    }
    let want: Vec<&str> = key.split('.').collect();
    let tail = &want[want.len().saturating_sub(2)..];
    documented.iter().any(|d| {
        let have: Vec<&str> = d.split('.').collect();
        if want.len() == 1 {
            return have == want;
        }
        have.len() >= 2
            && have[have.len() - 2..]
                .iter()
                .zip(tail)
                .all(|(h, w)| *w == "*" || h == w)
    })
}

#[test]
fn the_walk_finds_nested_keys() {
    // The walk itself: known keys of several depths and shapes.
    let keys = schema_keys();
    for k in [
        "nats.url",
        "ingest.tokens.source",
        "ingest.limits.alert_bytes",
        "incidents.heartbeats.interval",
        "escalation.policies.levels.delay",
        "escalation.users.rules.*.channels",
        "notifier.email.port",
        "chatops.status.components.name",
    ] {
        assert!(keys.contains(k), "{k} not found by the walk: {keys:#?}");
    }
    // The shipped-file reader: set keys, commented keys, flow mappings.
    let doc = documented_keys(
        "a:\n  b: 1   # note\n  # c:\n  #   d: {e: 1, f: {g: 2}}\n  #   # k: 1\n  list:\n    - {name: x, h: [1, 2]}\n    - i: 1\n      j: 2\n# Prose: not: a key\n",
    );
    for k in [
        "a",
        "a.b",
        "a.c",
        "a.c.d",
        "a.c.d.e",
        "a.c.d.f.g",
        "a.c.k",
        "a.list.name",
        "a.list.h",
        "a.list.i",
        "a.list.j",
    ] {
        assert!(doc.contains(k), "{k} not read: {doc:#?}");
    }
    assert!(!doc.iter().any(|k| k.contains("not")), "{doc:#?}");
}

#[test]
fn shipped_config_documents_every_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("config/tocsin.yaml")).unwrap();
    let documented = documented_keys(&text);
    let missing: Vec<String> = schema_keys()
        .into_iter()
        .filter(|k| !is_documented(k, &documented))
        .collect();
    assert!(
        missing.is_empty(),
        "config/tocsin.yaml says it documents every key, but misses {} (add each, \
         commented out where optional, with its default):\n  {}",
        missing.len(),
        missing.join("\n  ")
    );
}
