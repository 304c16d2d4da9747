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
    form::form_decode,
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

/// `/2010-04-01/Accounts/{sid}/Messages.json`: `POST` creates, `GET` lists.
pub(super) fn messages(ctx: &mut Ctx<'_>) -> Reply {
    let req = ctx.req;
    let authed = basic_auth(req).is_some_and(|(u, p)| {
        u == FakeProviders::TWILIO_SID && p == FakeProviders::TWILIO_TOKEN && req.param == u
    });
    if !authed {
        return twilio_error(401, 20003, "Authenticate");
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

/// A `DateSent` bound: a whole UTC day or an instant.
enum DateBound {
    Day(jiff::civil::Date),
    At(jiff::Timestamp),
}

fn list(state: &State, req: &Req) -> Reply {
    let query = form_decode(&req.query);
    let get = |k: &str| {
        query
            .iter()
            .find(|(qk, _)| qk == k)
            .map(|(_, v)| v.as_str())
    };
    let mut bounds = Vec::new();
    for key in ["DateSent", "DateSent>", "DateSent<"] {
        if let Some(v) = get(key) {
            let b = if let Ok(t) = v.parse::<jiff::Timestamp>() {
                DateBound::At(t)
            } else if let Ok(d) = v.parse::<jiff::civil::Date>() {
                DateBound::Day(d)
            } else {
                return twilio_error(
                    400,
                    20001,
                    &format!("Invalid value for {key}: {v:?} is not a date (YYYY-MM-DD)"),
                );
            };
            bounds.push((key, b));
        }
    }
    let page_size = get("PageSize")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(50)
        .clamp(1, 1000);
    let to = get("To");
    let from = get("From");
    let messages: Vec<Value> = state
        .messages
        .iter()
        .rev()
        .filter(|m| to.is_none_or(|t| m.sms.to == t))
        .filter(|m| from.is_none_or(|f| m.sms.from.as_deref() == Some(f)))
        .filter(|m| {
            let day = m.created.to_zoned_datetime(jiff::tz::TimeZone::UTC).date();
            bounds.iter().all(|(key, b)| {
                let ord = match b {
                    DateBound::Day(d) => day.cmp(d),
                    DateBound::At(t) => m.created.cmp(t),
                };
                match *key {
                    "DateSent>" => ord.is_ge(),
                    "DateSent<" => ord.is_le(),
                    _ => ord.is_eq(),
                }
            })
        })
        .take(page_size)
        .map(|m| twilio_json(m, true))
        .collect();
    let uri = format!(
        "/2010-04-01/Accounts/{}/Messages.json?PageSize={page_size}&Page=0",
        FakeProviders::TWILIO_SID
    );
    Reply::json(
        200,
        json!({"messages": messages, "next_page_uri": null, "previous_page_uri": null,
               "first_page_uri": uri, "uri": uri, "page": 0, "page_size": page_size,
               "start": 0, "end": messages.len().saturating_sub(1)}),
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
