//! SMS encodings and segments (3GPP TS 23.038).
//!
//! A message made only of GSM-7 characters costs one segment up to 160
//! septets (153 per segment when concatenated; the extension characters
//! `^{}\[~]|€` and form feed take two). One character outside GSM-7 (an
//! emoji, most accented letters) makes the whole message UCS-2: 70 code
//! units in one segment, 67 per concatenated segment, so a 160-character
//! page becomes three or four segments. [`fit`] keeps a page within its
//! budget: transliterated to GSM-7 (accents stripped, typographic quotes
//! and dashes made plain, emoji dropped) or counted as UCS-2, then cut.

use unicode_normalization::UnicodeNormalization;

/// GSM 03.38 basic character set (escape excluded).
const BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
/// The extension table: each costs two septets.
const EXTENSION: &str = "^{}\\[~]|€\u{000C}";

/// How SMS bodies are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Transliterate to GSM-7 (the cheapest: 160 characters a segment).
    Gsm7,
    /// Keep every character; segments are counted as UCS-2 when needed.
    Unicode,
}

fn is_basic(c: char) -> bool {
    BASIC.contains(c)
}

fn is_extension(c: char) -> bool {
    EXTENSION.contains(c)
}

/// Whether every character is GSM-7.
pub fn is_gsm7(s: &str) -> bool {
    s.chars().all(|c| is_basic(c) || is_extension(c))
}

/// Septets of a GSM-7 string.
fn septets(s: &str) -> usize {
    s.chars().map(|c| if is_extension(c) { 2 } else { 1 }).sum()
}

/// Segments a body costs.
pub fn segments(s: &str) -> usize {
    if is_gsm7(s) {
        let n = septets(s);
        if n <= 160 {
            1
        } else {
            n.div_ceil(153)
        }
    } else {
        let n = s.encode_utf16().count();
        if n <= 70 {
            1
        } else {
            n.div_ceil(67)
        }
    }
}

/// Replaces what GSM-7 lacks: typographic punctuation by its plain form,
/// accented letters by their base letter (where GSM-7 has no accented
/// form of its own), other characters (emoji, symbols, other scripts)
/// dropped. Runs of spaces left behind are folded.
pub fn transliterate(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if is_basic(c) || is_extension(c) {
            out.push(c);
            continue;
        }
        let plain = match c {
            '‘' | '’' | '‚' | '′' | '`' | '´' => Some("'"),
            '“' | '”' | '„' | '″' | '«' | '»' => Some("\""),
            '–' | '—' | '‐' | '‑' | '−' => Some("-"),
            '…' => Some("..."),
            '\u{00A0}' | '\u{2009}' | '\u{202F}' | '\t' => Some(" "),
            '•' | '·' => Some("*"),
            '×' => Some("x"),
            '÷' => Some("/"),
            '©' => Some("(c)"),
            '®' => Some("(R)"),
            '™' => Some("TM"),
            _ => None,
        };
        if let Some(p) = plain {
            out.push_str(p);
            continue;
        }
        // Decompose (é -> e + ´) and keep what GSM-7 has.
        let base: String = c.nfd().filter(|b| is_basic(*b)).collect();
        out.push_str(&base);
    }
    // Folding spaces that dropped characters leave (`🚨 [CRIT]`).
    let mut folded = String::with_capacity(out.len());
    let mut last_space = false;
    for c in out.chars() {
        if c == ' ' && last_space {
            continue;
        }
        last_space = c == ' ';
        folded.push(c);
    }
    folded.trim().to_string()
}

/// `body` within `max_segments` segments in `encoding`, cut with `...`
/// when it would cost more.
pub fn fit(body: &str, encoding: Encoding, max_segments: usize) -> String {
    let s = match encoding {
        Encoding::Gsm7 => transliterate(body),
        Encoding::Unicode => body.to_string(),
    };
    let max_segments = max_segments.max(1);
    if segments(&s) <= max_segments {
        return s;
    }
    // The largest prefix (plus the marker) that fits.
    let chars: Vec<char> = s.chars().collect();
    let (mut lo, mut hi) = (0usize, chars.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let cand: String = chars[..mid].iter().collect::<String>() + "...";
        if segments(&cand) <= max_segments {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    chars[..lo]
        .iter()
        .collect::<String>()
        .trim_end()
        .to_string()
        + "..."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_segments_like_the_carriers() {
        assert_eq!(segments(&"a".repeat(160)), 1);
        assert_eq!(segments(&"a".repeat(161)), 2);
        assert_eq!(segments(&"a".repeat(306)), 2);
        assert_eq!(segments(&"a".repeat(307)), 3);
        // Extension characters take two septets.
        assert_eq!(segments(&"€".repeat(80)), 1);
        assert_eq!(segments(&"€".repeat(81)), 2);
        // One emoji makes it UCS-2 (an emoji is two UTF-16 units).
        assert_eq!(segments(&("a".repeat(68) + "🚨")), 1);
        assert_eq!(segments(&("a".repeat(69) + "🚨")), 2);
        assert_eq!(segments(&("a".repeat(158) + "🚨")), 3);
    }

    #[test]
    fn transliterates_to_gsm7() {
        // é and à are GSM-7; û and ï are not.
        assert_eq!(transliterate("Crème brûlée, naïve"), "Crème brulée, naive");
        assert_eq!(
            transliterate("🚨 [CRIT] “db” – down…"),
            "[CRIT] \"db\" - down..."
        );
        assert_eq!(transliterate("Zürich Ñandú ÅØ"), "Zürich Ñandu ÅØ");
        // ł has no decomposition: dropped.
        assert_eq!(transliterate("łódź"), "odz");
        assert!(is_gsm7(&transliterate("日本語 ✓ ☃ 𝔘")));
    }

    #[test]
    fn fits_one_segment_whatever_the_input() {
        let title = "🔥 Ünïcødé “title” with emoji 🚀 and accents é è ê ë and more text to make it long enough";
        let body = format!("[CRITICAL] #42 {title}. Reply ACK 42 to +15005550006");
        let g = fit(&body, Encoding::Gsm7, 1);
        assert!(is_gsm7(&g), "{g}");
        assert_eq!(segments(&g), 1, "{g}");
        let u = fit(&body, Encoding::Unicode, 1);
        assert_eq!(segments(&u), 1, "{u}");
        assert!(u.ends_with("..."), "{u}");
        assert!(u.chars().count() <= 70);
        // Short enough: unchanged.
        assert_eq!(fit("ACK 42", Encoding::Gsm7, 1), "ACK 42");
        // Two segments allowed.
        let two = fit(&"x".repeat(400), Encoding::Gsm7, 2);
        assert_eq!(segments(&two), 2);
        assert_eq!(two.chars().count(), 306);
    }
}
