//! Label and annotation sets.

use std::{
    borrow::Borrow,
    fmt,
    ops::{Deref, DerefMut, Index},
};

use litemap::LiteMap;
use serde::{
    de::{MapAccess, Visitor},
    ser::SerializeMap,
    Deserialize, Deserializer, Serialize, Serializer,
};

/// A label or annotation set, ordered by name (bytewise), as Alertmanager
/// sorts them.
///
/// Held as one sorted vector of pairs ([`LiteMap`]), not a `BTreeMap`: a
/// `BTreeMap`'s node has room for eleven pairs however few it holds (some
/// 540 bytes), where the four labels of a typical alert take 192 bytes
/// here. The incidents service holds every alert of the incidents it
/// keeps in memory, so in a storm of distinct alerts this is most of its
/// memory. It reads like a map (`get`, `insert`, `iter`, ... through
/// [`Deref`] to the [`LiteMap`]); a look-up is a binary search.
///
/// Building one from many pairs at once sorts them once (`collect`,
/// `extend`, decoding), while `insert` shifts the pairs after the new one:
/// build a set from outside data with `collect` or `extend`, never with
/// `insert` in a loop, whose cost grows with the square of the count.
///
/// On the wire it is a map, in name order, as a `BTreeMap` was, so what
/// is stored and sent is unchanged. Decoding takes only a map (not a list
/// of pairs), and a name given twice keeps its last value.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(LiteMap<String, String>);

impl Labels {
    pub const fn new() -> Self {
        Labels(LiteMap::new_vec())
    }

    /// A set from name/value pairs given as text (a fixed set, a test's).
    pub fn from_strs(pairs: &[(&str, &str)]) -> Self {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The pairs sorted by name, the last of a name given twice kept,
    /// with no spare capacity. Pairs already in order (what this
    /// encodes, so what is read back) are taken as they are, with no
    /// second allocation.
    fn from_pairs(mut pairs: Vec<(String, String)>) -> Self {
        if !pairs.windows(2).all(|w| w[0].0 < w[1].0) {
            // Reversed, a stable sort puts the last of each name first,
            // and `dedup_by` keeps the first of a run.
            pairs.reverse();
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            pairs.dedup_by(|later, kept| later.0 == kept.0);
        }
        pairs.shrink_to_fit();
        Labels(LiteMap::from_sorted_store_unchecked(pairs))
    }
}

impl Deref for Labels {
    type Target = LiteMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Labels {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<Q: Ord + ?Sized> Index<&Q> for Labels
where
    String: Borrow<Q>,
{
    type Output = String;

    /// The value of a name that must be there, as a map's `[]`: panics
    /// when it is not.
    fn index(&self, name: &Q) -> &String {
        self.0.get(name).expect("no label of that name")
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Labels::from_pairs(iter.into_iter().collect())
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl Extend<(String, String)> for Labels {
    fn extend<I: IntoIterator<Item = (String, String)>>(&mut self, iter: I) {
        self.0.extend(iter)
    }
}

impl IntoIterator for Labels {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_tuple_vec().into_iter()
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter = <&'a LiteMap<String, String> as IntoIterator>::IntoIter;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Always a map, even when empty (LiteMap's own form would be a
        // list in JSON for an empty set).
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = Labels;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut access: M) -> Result<Labels, M::Error> {
                // The count a message claims is not trusted beyond a few
                // pairs: the pairs themselves must be there to be kept.
                let mut pairs = Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
                while let Some(pair) = access.next_entry()? {
                    pairs.push(pair);
                }
                Ok(Labels::from_pairs(pairs))
            }
        }
        deserializer.deserialize_map(Pairs)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn encodes_as_the_map_it_replaced_in_both_codecs() {
        let labels = Labels::from_strs(&[("severity", "critical"), ("alertname", "Up"), ("b", "")]);
        let map: BTreeMap<String, String> = labels.clone().into_iter().collect();
        assert_eq!(
            rmp_serde::to_vec(&labels).unwrap(),
            rmp_serde::to_vec(&map).unwrap()
        );
        assert_eq!(
            rmp_serde::to_vec_named(&labels).unwrap(),
            rmp_serde::to_vec_named(&map).unwrap()
        );
        assert_eq!(
            serde_json::to_string(&labels).unwrap(),
            serde_json::to_string(&map).unwrap()
        );
        let back: Labels = rmp_serde::from_slice(&rmp_serde::to_vec(&map).unwrap()).unwrap();
        assert_eq!(back, labels);
        // Empty is an empty map, not a list.
        assert_eq!(serde_json::to_string(&Labels::new()).unwrap(), "{}");
        assert_eq!(
            rmp_serde::to_vec(&Labels::new()).unwrap(),
            rmp_serde::to_vec(&BTreeMap::<String, String>::new()).unwrap()
        );
    }

    #[test]
    fn decoding_sorts_keeps_the_last_of_a_repeated_name_and_takes_only_a_map() {
        let l: Labels = serde_json::from_str(r#"{"z":"1","a":"2","m":"3","a":"4"}"#).unwrap();
        let got: Vec<(&str, &str)> = l.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, [("a", "4"), ("m", "3"), ("z", "1")]);
        let m: BTreeMap<String, String> =
            serde_json::from_str(r#"{"z":"1","a":"2","m":"3","a":"4"}"#).unwrap();
        assert_eq!(l.into_iter().collect::<BTreeMap<_, _>>(), m);
        let l: Labels = serde_json::from_str(r#"{"a":"1","a":"2","b":"3"}"#).unwrap();
        assert_eq!((l["a"].as_str(), l.len()), ("2", 2));
        let e = serde_json::from_str::<Labels>(r#"[["a","b"]]"#).unwrap_err();
        assert!(e.to_string().contains("expected a map"), "{e}");
    }

    #[test]
    fn many_names_in_reverse_order_decode_without_quadratic_work() {
        // 200,000 names, each smaller than the last: a sort, not 200,000
        // shifting inserts (which would move some 10^12 bytes).
        let n = 200_000;
        let body = format!(
            "{{{}}}",
            (0..n)
                .rev()
                .map(|i| format!("\"l{i:07}\":\"v\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        let l: Labels = serde_json::from_str(&body).unwrap();
        assert_eq!(l.len(), n);
        assert_eq!(l.first().unwrap().0, "l0000000");
        assert!(l.iter().zip(l.iter().skip(1)).all(|(a, b)| a.0 < b.0));
    }

    #[test]
    fn reads_like_a_map() {
        let mut l: Labels = [("b".to_string(), "2".to_string())].into();
        assert_eq!(l.insert("a".into(), "1".into()), None);
        assert_eq!(l.insert("a".into(), "3".into()), Some("1".into()));
        assert_eq!(l.get("a").map(String::as_str), Some("3"));
        l.extend(Labels::from_strs(&[("c", "4"), ("0", "5")]));
        assert_eq!(
            l.keys().map(String::as_str).collect::<Vec<_>>(),
            ["0", "a", "b", "c"]
        );
        assert_eq!(
            format!("{l:?}"),
            r#"{"0": "5", "a": "3", "b": "2", "c": "4"}"#
        );
    }
}
