//! SMS through Twilio's Messages API: HTTP Basic auth, a form body with
//! `To`, `From` or `MessagingServiceSid`, and `Body` (at most 1,600
//! characters). Bodies are kept within `sms.max_segments` segments (one
//! by default): transliterated to GSM-7, or counted as UCS-2 with
//! `encoding: unicode` ([`super::gsm`]).

use futures::future::BoxFuture;
use serde_json::Value;
use tocsin_proto::notify::ProviderRef;
use tocsin_runtime::config::Secret;

use super::{
    classify_http, exchange, gsm, http_client, Lookup, Outgoing, Provider, Rendered, SendError,
};
use crate::{config::SmsConfig, templates::Templates};

/// Pages of the message list read when looking for a message whose answer
/// was lost, and messages per page (Twilio allows up to 1,000).
pub const LOOKUP_PAGES: usize = 10;
pub const LOOKUP_PAGE_SIZE: usize = 1000;

/// Twilio's limit on `Body`.
pub const BODY_MAX: usize = 1600;

pub struct Sms {
    client: reqwest::Client,
    timeout: std::time::Duration,
    encoding: gsm::Encoding,
    max_segments: usize,
    base: String,
    sid: String,
    token: Secret,
    from: Option<String>,
    service: Option<String>,
}

impl Sms {
    pub fn new(cfg: &SmsConfig) -> Result<Sms, String> {
        let from = cfg.from.as_ref().map(|s| s.0.clone());
        let service = cfg.messaging_service_sid.as_ref().map(|s| s.0.clone());
        if from.is_none() && service.is_none() {
            return Err("sms: set `from` (a Twilio number) or `messaging_service_sid`".into());
        }
        let sid = cfg.account_sid.0.clone();
        if !sid.starts_with("AC") && !sid.starts_with("SK") {
            return Err(format!(
                "sms: account_sid {sid:?} does not look like a Twilio account sid (AC…)"
            ));
        }
        Ok(Sms {
            client: http_client(cfg.guard.timeout.get()),
            timeout: cfg.guard.timeout.get(),
            encoding: cfg.encoding.unwrap_or(gsm::Encoding::Gsm7),
            max_segments: cfg.max_segments.unwrap_or(1).clamp(1, 10),
            base: cfg
                .api_url
                .as_ref()
                .map(|u| u.0.trim_end_matches('/').to_string())
                .unwrap_or_else(|| "https://api.twilio.com".into()),
            sid,
            token: cfg.auth_token().map_err(|e| format!("sms: {e}"))?,
            from,
            service,
        })
    }

    pub fn from(&self) -> Option<&str> {
        self.from.as_deref()
    }

    fn url(&self) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            self.base, self.sid
        )
    }

    /// The form fields of a message (exposed for tests).
    pub fn form(&self, to: &str, body: &str) -> Vec<(&'static str, String)> {
        let mut form = vec![("To", to.to_string())];
        if let Some(f) = &self.from {
            form.push(("From", f.clone()));
        }
        if let Some(s) = &self.service {
            form.push(("MessagingServiceSid", s.clone()));
        }
        form.push(("Body", cut(body)));
        form
    }

    pub async fn send_body(&self, out: &Outgoing, body: &str) -> Result<ProviderRef, SendError> {
        if out.address.is_empty() {
            return Err(SendError::permanent("no phone number for this SMS"));
        }
        let (status, after, text) = exchange(
            self.client
                .post(self.url())
                .basic_auth(&self.sid, Some(self.token.expose()))
                .form(&self.form(&out.address, body)),
        )
        .await?;
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return match answer["sid"].as_str() {
                Some(sid) => Ok(ProviderRef::Sms {
                    sid: sid.to_string(),
                }),
                None => Err(SendError::permanent(
                    "Twilio answered without a message sid",
                )),
            };
        }
        let reason = match (answer["code"].as_u64(), answer["message"].as_str()) {
            (Some(code), Some(m)) => format!("Twilio: HTTP {status}: error {code}: {m}"),
            _ => format!("Twilio: HTTP {status}"),
        };
        // 20429: Twilio's own "too many requests".
        if answer["code"].as_u64() == Some(20429) {
            return Err(SendError::Retry {
                reason,
                retry_after: after,
                maybe_arrived: false,
                rate_limited: true,
            });
        }
        Err(classify_http(status, after, reason))
    }

    /// After a crash mid-request: was this SMS sent? Pages through the
    /// messages sent to this number since the day before the attempt
    /// (newest first, following `next_page_uri`) and compares bodies and
    /// times. Bounded: past [`LOOKUP_PAGES`] pages it cannot decide.
    pub async fn find_body(&self, out: &Outgoing, body: &str, since: jiff::Timestamp) -> Lookup {
        let day = since
            .checked_sub(jiff::SignedDuration::from_hours(24))
            .unwrap_or(since)
            .strftime("%Y-%m-%d")
            .to_string();
        let mut query = vec![
            ("To", out.address.clone()),
            ("DateSent>", day),
            ("PageSize", LOOKUP_PAGE_SIZE.to_string()),
        ];
        if let Some(f) = &self.from {
            query.push(("From", f.clone()));
        }
        let body = cut(body);
        let mut next: Option<String> = None;
        for _ in 0..LOOKUP_PAGES {
            let req = match &next {
                None => self.client.get(self.url()).query(&query),
                Some(uri) => self.client.get(format!("{}{uri}", self.base)),
            };
            let (status, after, text) =
                match exchange(req.basic_auth(&self.sid, Some(self.token.expose()))).await {
                    Ok(x) => x,
                    Err(e) => return Lookup::Unreachable(e),
                };
            if !(200..300).contains(&status) {
                return match classify_http(
                    status,
                    after,
                    format!("Twilio message list: HTTP {status}"),
                ) {
                    e @ SendError::Retry { .. } => Lookup::Unreachable(e),
                    e => Lookup::Undecided(e.reason().to_string()),
                };
            }
            let answer: Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => return Lookup::Undecided(format!("Twilio message list: not JSON: {e}")),
            };
            let messages = answer["messages"].as_array().cloned().unwrap_or_default();
            let found = messages.iter().find(|m| {
                m["body"].as_str() == Some(body.as_str())
                    && m["date_created"]
                        .as_str()
                        .and_then(parse_rfc2822)
                        .is_some_and(|t| t.as_second() + 60 >= since.as_second())
            });
            if let Some(sid) = found.and_then(|m| m["sid"].as_str()) {
                return Lookup::Found(ProviderRef::Sms {
                    sid: sid.to_string(),
                });
            }
            // Newest first: once a page ends before the attempt, older
            // pages cannot hold it.
            let older = messages.last().and_then(|m| {
                m["date_created"]
                    .as_str()
                    .and_then(parse_rfc2822)
                    .map(|t| t.as_second() + 60 < since.as_second())
            });
            match answer["next_page_uri"].as_str() {
                Some(uri) if !uri.is_empty() && older != Some(true) => next = Some(uri.to_string()),
                _ => return Lookup::NotFound,
            }
        }
        Lookup::Undecided(format!(
            "more than {} messages to {} since the attempt",
            LOOKUP_PAGES * LOOKUP_PAGE_SIZE,
            out.address
        ))
    }
}

impl Provider for Sms {
    fn name(&self) -> &str {
        "sms"
    }

    fn timeout(&self) -> std::time::Duration {
        self.timeout
    }

    /// Kept within its segment budget, so the body sent is the body
    /// rendered (and found again by [`Sms::find_body`]).
    fn render(&self, t: &Templates, out: &Outgoing) -> Result<Rendered, String> {
        let text = super::render_default(t, out)?.text();
        Ok(Rendered::Text(gsm::fit(
            &text,
            self.encoding,
            self.max_segments,
        )))
    }

    fn send<'a>(
        &'a self,
        out: &'a Outgoing,
        r: &'a Rendered,
    ) -> BoxFuture<'a, Result<ProviderRef, SendError>> {
        Box::pin(async move { self.send_body(out, &r.text()).await })
    }

    fn find_sent<'a>(
        &'a self,
        out: &'a Outgoing,
        r: &'a Rendered,
        since: jiff::Timestamp,
    ) -> BoxFuture<'a, Lookup> {
        Box::pin(async move { self.find_body(out, &r.text(), since).await })
    }
}

fn cut(body: &str) -> String {
    super::pagerduty::cut(body, BODY_MAX)
}

fn parse_rfc2822(s: &str) -> Option<jiff::Timestamp> {
    jiff::fmt::rfc2822::parse(s).ok().map(|z| z.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_never_exceeds_1600_and_messaging_service_is_used_when_set() {
        let cfg: SmsConfig = serde_yaml_ng::from_str(
            "account_sid: AC123\nauth_token: t\nmessaging_service_sid: MG123\n",
        )
        .unwrap();
        let sms = Sms::new(&cfg).unwrap();
        let form = sms.form("+14155550100", &"x".repeat(5000));
        assert_eq!(form[0], ("To", "+14155550100".to_string()));
        assert_eq!(form[1], ("MessagingServiceSid", "MG123".to_string()));
        assert_eq!(form[2].1.chars().count(), BODY_MAX);
    }

    #[test]
    fn a_sender_is_required() {
        let cfg: SmsConfig =
            serde_yaml_ng::from_str("account_sid: AC123\nauth_token: t\n").unwrap();
        assert!(Sms::new(&cfg).err().unwrap().contains("from"));
    }
}
