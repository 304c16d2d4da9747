//! The Twilio Messages fake: `POST` and `GET`
//! `/twilio/2010-04-01/Accounts/{sid}/Messages.json`, with HTTP basic auth
//! (account sid and auth token).
//!
//! Messages are checked as Twilio does (E.164 numbers, `From` or
//! `MessagingServiceSid`, the 1600-character body limit) and answered with
//! Twilio's message resource and error shapes
//! (`{"code":…,"message":…,"more_info":…,"status":…}`).

use std::time::Instant;

use axum::http::Method;
use base64::Engine as _;
use serde_json::{json, Value};

use super::{
    form::{form_decode, form_encode},
    server::{b64, reason, Ctx, Reply, Req},
    FakeProviders,
};

/// An accepted Twilio message.
#[derive(Clone, Debug)]
pub struct Sms {
    /// Message sid (`SM` + 32 hex digits).
    pub sid: String,
    /// The `To` parameter.
    pub to: String,
    /// The `From` parameter, if given.
    pub from: Option<String>,
    /// The `MessagingServiceSid` parameter, if given.
    pub messaging_service_sid: Option<String>,
    /// The `Body` parameter.
    pub body: String,
    /// When it arrived.
    pub at: Instant,
}

/// What the Twilio fake holds.
#[derive(Clone, Default)]
pub(super) struct State {
    messages: Vec<TwilioMessage>,
}

#[derive(Clone)]
struct TwilioMessage {
    sms: Sms,
    created: jiff::Timestamp,
    segments: usize,
}

impl FakeProviders {
    /// Twilio API base; append `/2010-04-01/Accounts/{sid}/Messages.json`.
    pub fn twilio_url(&self) -> String {
        format!("{}/twilio", self.base_url())
    }

    /// Accepted Twilio messages, in arrival order.
    pub fn sms(&self) -> Vec<Sms> {
        self.lock()
            .twilio
            .messages
            .iter()
            .map(|m| m.sms.clone())
            .collect()
    }
}

/// Twilio's answer to an injected failure with HTTP `code`.
pub(super) fn status_reply(code: u16) -> Reply {
    let tw = match code {
        401 => 20003,
        404 => 20404,
        429 => 20429,
        500.. => 20500,
        _ => 21000 + code as u32 % 1000,
    };
    twilio_error(code, tw, reason(code))
}

pub(super) fn twilio_error(status: u16, code: u32, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"code": code, "message": message,
               "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
               "status": status}),
    )
}

fn basic_auth(req: &Req) -> Option<(String, String)> {
    let h = req.header("authorization")?;
    let (scheme, cred) = h.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = b64().decode(cred.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (u, p) = decoded.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// The `To` number of a message sent, or of a list's `To` filter (`""` if none).
pub(super) fn describe(req: &Req) -> String {
    let pairs = if req.method == Method::POST {
        form_decode(&String::from_utf8_lossy(&req.body))
    } else {
        form_decode(&req.query)
    };
    pairs
        .into_iter()
        .find(|(k, _)| k == "To")
        .map(|(_, v)| v)
        .unwrap_or_default()
}

/// `/2010-04-01/Accounts/{sid}/Messages.json`: `POST` creates, `GET` lists.
///
/// Twilio answers error 20429 (HTTP 429 "Too Many Requests") when an
/// account exceeds its REST API concurrency; "Requests that receive 429
/// responses aren't processed and are safe to retry after backing off",
/// and no `Retry-After` is documented. A limit set with
/// [`FakeProviders::set_rate_limit`] (sending, operation `POST`) or
/// [`FakeProviders::set_operation_rate_limit`] (`GET` for listing) applies
/// once the request is authenticated, before the message's checks.
pub(super) fn messages(ctx: &mut Ctx<'_>) -> Reply {
    let req = ctx.req;
    let authed = basic_auth(req).is_some_and(|(u, p)| {
        u == FakeProviders::TWILIO_SID && p == FakeProviders::TWILIO_TOKEN && req.param == u
    });
    if !authed {
        return twilio_error(401, 20003, "Authenticate");
    }
    if ctx.throttled().is_some() {
        return status_reply(429).throttled();
    }
    match req.method {
        Method::POST => create(&mut ctx.rec.twilio, req),
        Method::GET => list(&ctx.rec.twilio, req),
        _ => twilio_error(405, 20004, "Method not allowed"),
    }
}

fn is_e164(s: &str) -> bool {
    let s = s.strip_prefix("whatsapp:").unwrap_or(s);
    s.strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Twilio's segment count: GSM-7 (160, or 153 per part) else UCS-2 (70, or 67 per part).
fn sms_segments(body: &str) -> usize {
    const GSM: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
                       ¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
    const GSM_EXT: &str = "^{}\\[~]|€\u{c}";
    let mut septets = 0usize;
    for c in body.chars() {
        if GSM.contains(c) {
            septets += 1;
        } else if GSM_EXT.contains(c) {
            septets += 2;
        } else {
            let units = body.encode_utf16().count();
            return if units <= 70 { 1 } else { units.div_ceil(67) };
        }
    }
    if septets <= 160 {
        1
    } else {
        septets.div_ceil(153)
    }
}

fn create(state: &mut State, req: &Req) -> Reply {
    let params = if req.media_type().as_deref() == Some("application/x-www-form-urlencoded") {
        form_decode(&String::from_utf8_lossy(&req.body))
    } else {
        vec![]
    };
    let get = |k: &str| {
        params
            .iter()
            .find(|(pk, _)| pk == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let Some(to) = get("To") else {
        return twilio_error(400, 21604, "A 'To' phone number is required.");
    };
    if !is_e164(&to) {
        return twilio_error(
            400,
            21211,
            &format!("The 'To' number {to} is not a valid phone number."),
        );
    }
    let from = get("From");
    let mss = get("MessagingServiceSid");
    if from.is_none() && mss.is_none() {
        return twilio_error(400, 21603, "A 'From' phone number is required.");
    }
    if let Some(m) = &mss {
        if !(m.starts_with("MG") && m.len() == 34) {
            return twilio_error(
                400,
                21701,
                &format!("The Messaging Service Sid {m} is invalid."),
            );
        }
    }
    let Some(body) = get("Body") else {
        return twilio_error(400, 21602, "Message body is required.");
    };
    if body.chars().count() > 1600 {
        return twilio_error(
            400,
            21617,
            "The concatenated message body exceeds the 1600 character limit.",
        );
    }
    let msg = TwilioMessage {
        segments: sms_segments(&body),
        sms: Sms {
            sid: format!("SM{}", uuid::Uuid::new_v4().simple()),
            to,
            from,
            messaging_service_sid: mss,
            body,
            at: Instant::now(),
        },
        created: jiff::Timestamp::now(),
    };
    let answer = twilio_json(&msg, false);
    state.messages.push(msg);
    Reply::json(201, answer)
}

fn rfc2822(t: jiff::Timestamp) -> String {
    t.strftime("%a, %d %b %Y %H:%M:%S +0000").to_string()
}

/// The message resource; `listed` shows it as sent (as a later GET would).
fn twilio_json(m: &TwilioMessage, listed: bool) -> Value {
    let sid = &m.sms.sid;
    let acc = FakeProviders::TWILIO_SID;
    let created = rfc2822(m.created);
    json!({
        "sid": sid,
        "account_sid": acc,
        "api_version": "2010-04-01",
        "status": if listed { "sent" } else { "queued" },
        "direction": "outbound-api",
        "from": m.sms.from,
        "to": m.sms.to,
        "body": m.sms.body,
        "num_segments": m.segments.to_string(),
        "num_media": "0",
        "price": null,
        "price_unit": null,
        "error_code": null,
        "error_message": null,
        "messaging_service_sid": m.sms.messaging_service_sid,
        "date_created": created,
        "date_sent": if listed { Value::String(created.clone()) } else { Value::Null },
        "date_updated": created,
        "uri": format!("/2010-04-01/Accounts/{acc}/Messages/{sid}.json"),
        "subresource_uris": {"media": format!("/2010-04-01/Accounts/{acc}/Messages/{sid}/Media.json")},
    })
}

/// The message list's filters, in the order Twilio writes them into the
/// page URIs.
const FILTERS: [&str; 5] = ["To", "From", "DateSent", "DateSent<", "DateSent>"];

/// The `DateSent` filters' date: Twilio's reference documents "GMT dates
/// in the following formats: YYYY-MM-DD (to find Messages with a specific
/// sent_date), <=YYYY-MM-DD (to find Messages with sent_dates on and
/// before a specific date), and >=YYYY-MM-DD (to find Messages with
/// sent_dates on and after a specific date)". A date-time (as the helper
/// libraries send) counts as its GMT date: the filters never narrow below
/// a day.
fn sent_date(v: &str) -> Option<jiff::civil::Date> {
    if let Ok(d) = v.parse::<jiff::civil::Date>() {
        return Some(d);
    }
    let t = v.parse::<jiff::Timestamp>().ok()?;
    Some(t.to_zoned_datetime(jiff::tz::TimeZone::UTC).date())
}

/// `GET …/Messages.json`, as Twilio's reference describes it: "Results
/// are sorted by the DateSent field, with the most recent messages
/// appearing first", filtered by `To`, `From` and the `DateSent` dates,
/// `PageSize` messages a page ("The default is 50, and the maximum is
/// 1000"; larger values are answered as 1000). Every page carries the
/// envelope `first_page_uri`, `next_page_uri` (`null` on the last page),
/// `previous_page_uri` (`null` on the first), `uri`, `page`, `page_size`,
/// `start` and `end`. The next and previous URIs repeat the filters and
/// add `Page` and a `PageToken` (`PA` + the last message's sid, `PB` +
/// the first's), so that paging is not thrown off by messages sent
/// meanwhile; a page other than the first needs its token, as at Twilio
/// (400, code 70002).
fn list(state: &State, req: &Req) -> Reply {
    let query = form_decode(&req.query);
    let get = |k: &str| {
        query
            .iter()
            .find(|(qk, _)| qk == k)
            .map(|(_, v)| v.as_str())
    };
    let mut dates = Vec::new();
    for key in ["DateSent", "DateSent>", "DateSent<"] {
        if let Some(v) = get(key) {
            let Some(d) = sent_date(v) else {
                return twilio_error(
                    400,
                    20001,
                    &format!("Invalid value for {key}: {v:?} is not a date (YYYY-MM-DD)"),
                );
            };
            dates.push((key, d));
        }
    }
    let page_size = get("PageSize")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(50)
        .clamp(1, 1000);
    let page = get("Page")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(0);
    let token = get("PageToken").filter(|t| !t.is_empty());
    let to = get("To");
    let from = get("From");
    let found: Vec<&TwilioMessage> = state
        .messages
        .iter()
        .rev()
        .filter(|m| to.is_none_or(|t| m.sms.to == t))
        .filter(|m| from.is_none_or(|f| m.sms.from.as_deref() == Some(f)))
        .filter(|m| {
            let day = m.created.to_zoned_datetime(jiff::tz::TimeZone::UTC).date();
            dates.iter().all(|(key, d)| match *key {
                "DateSent>" => day >= *d,
                "DateSent<" => day <= *d,
                _ => day == *d,
            })
        })
        .collect();
    let position = |sid: &str| found.iter().position(|m| m.sms.sid == sid);
    // The slice of `found` this page holds.
    let (from_idx, to_idx) = match token {
        None if page > 0 => {
            return twilio_error(400, 70002, "Paged requests must include a PageToken")
        }
        None => (0, page_size.min(found.len())),
        Some(t) => {
            let after = t.strip_prefix("PA").and_then(position);
            let before = t.strip_prefix("PB").and_then(position);
            match (after, before) {
                (Some(i), _) => (i + 1, (i + 1 + page_size).min(found.len())),
                (_, Some(i)) => (i.saturating_sub(page_size), i),
                _ => return twilio_error(400, 20001, &format!("Invalid PageToken: {t:?}")),
            }
        }
    };
    let items = &found[from_idx..to_idx];
    // The page URIs: the filters as given, then PageSize, Page, PageToken.
    let mut filters: Vec<(&str, &str)> = FILTERS
        .iter()
        .filter_map(|k| get(k).map(|v| (*k, v)))
        .collect();
    filters.push(("PageSize", ""));
    let page_uri = |page: usize, token: Option<String>| {
        let size = page_size.to_string();
        let page = page.to_string();
        let mut pairs: Vec<(&str, &str)> = filters
            .iter()
            .map(|(k, v)| {
                if *k == "PageSize" {
                    (*k, size.as_str())
                } else {
                    (*k, *v)
                }
            })
            .collect();
        pairs.push(("Page", &page));
        if let Some(t) = &token {
            pairs.push(("PageToken", t));
        }
        format!(
            "/2010-04-01/Accounts/{}/Messages.json?{}",
            FakeProviders::TWILIO_SID,
            form_encode(&pairs)
        )
    };
    let next = match items.last() {
        Some(last) if to_idx < found.len() => {
            Value::String(page_uri(page + 1, Some(format!("PA{}", last.sms.sid))))
        }
        _ => Value::Null,
    };
    let previous = match items.first() {
        Some(first) if from_idx > 0 => Value::String(page_uri(
            page.saturating_sub(1),
            Some(format!("PB{}", first.sms.sid)),
        )),
        _ => Value::Null,
    };
    let start = page * page_size;
    let messages: Vec<Value> = items.iter().map(|m| twilio_json(m, true)).collect();
    Reply::json(
        200,
        json!({"messages": messages,
               "first_page_uri": page_uri(0, None),
               "next_page_uri": next,
               "previous_page_uri": previous,
               "uri": page_uri(page, token.map(str::to_string)),
               "page": page, "page_size": page_size,
               "start": start, "end": start + items.len().max(1) - 1}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments() {
        assert_eq!(sms_segments(&"a".repeat(160)), 1);
        assert_eq!(sms_segments(&"a".repeat(161)), 2);
        assert_eq!(sms_segments(&"a".repeat(306)), 2);
        assert_eq!(sms_segments(&"a".repeat(307)), 3);
        assert_eq!(sms_segments(&"€".repeat(80)), 1);
        assert_eq!(sms_segments(&"€".repeat(81)), 2);
        assert_eq!(sms_segments(&"é".repeat(160)), 1);
        assert_eq!(sms_segments(&"ł".repeat(70)), 1);
        assert_eq!(sms_segments(&"ł".repeat(71)), 2);
    }
}
