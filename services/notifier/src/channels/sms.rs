//! SMS through Twilio's Messages API: HTTP Basic auth, a form body with
//! `To`, `From` or `MessagingServiceSid`, and `Body` (at most 1,600
//! characters; the shipped template fits one 160-character segment).

use serde_json::Value;
use tocsin_proto::notify::ProviderRef;
use tocsin_runtime::config::Secret;

use super::{classify_http, exchange, http_client, Outgoing, SendError};
use crate::config::SmsConfig;

/// Twilio's limit on `Body`.
pub const BODY_MAX: usize = 1600;

pub struct Sms {
    client: reqwest::Client,
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

    pub async fn send(&self, out: &Outgoing, body: &str) -> Result<ProviderRef, SendError> {
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
            });
        }
        Err(classify_http(status, after, reason))
    }

    /// After a crash mid-request: was this SMS sent? Lists the messages to
    /// this number since the attempt and compares bodies.
    pub async fn find_sent(
        &self,
        out: &Outgoing,
        body: &str,
        since: jiff::Timestamp,
    ) -> Result<Option<ProviderRef>, SendError> {
        let day = since
            .checked_sub(jiff::SignedDuration::from_hours(24))
            .unwrap_or(since)
            .strftime("%Y-%m-%d")
            .to_string();
        let mut query = vec![
            ("To", out.address.clone()),
            ("DateSent>", day),
            ("PageSize", "100".to_string()),
        ];
        if let Some(f) = &self.from {
            query.push(("From", f.clone()));
        }
        let (status, after, text) = exchange(
            self.client
                .get(self.url())
                .basic_auth(&self.sid, Some(self.token.expose()))
                .query(&query),
        )
        .await?;
        if !(200..300).contains(&status) {
            return Err(classify_http(
                status,
                after,
                format!("Twilio message list: HTTP {status}"),
            ));
        }
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let body = cut(body);
        let found = answer["messages"].as_array().and_then(|ms| {
            ms.iter().find(|m| {
                m["body"].as_str() == Some(body.as_str())
                    && m["date_created"]
                        .as_str()
                        .and_then(parse_rfc2822)
                        .is_some_and(|t| t.as_second() + 60 >= since.as_second())
            })
        });
        Ok(found
            .and_then(|m| m["sid"].as_str())
            .map(|sid| ProviderRef::Sms {
                sid: sid.to_string(),
            }))
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
