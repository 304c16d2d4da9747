//! Chat-ops in tests: requests signed as Slack and Twilio sign them (with
//! this kit's own HMACs, so a test checks the scheme rather than echo the
//! service's code), the bodies Slack and Twilio send, and a config.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::json;
use tocsin_chatops::ChatopsConfig;

use crate::fakes::FakeProviders;

/// The Slack app's signing secret in tests.
pub const SLACK_SECRET: &str = "test-slack-signing-secret-0123";
/// The Twilio auth token chat-ops verifies inbound SMS with.
pub const TWILIO_TOKEN: &str = "test-twilio-auth-token-456789";
/// The URL Twilio is told to call (what it signs).
pub const TWILIO_URL: &str = "https://tocsin.example.com/twilio/sms";
/// API tokens: a read one and a write one.
pub const READ_TOKEN: &str = "read-token-0123456789abcdef";
pub const WRITE_TOKEN: &str = "write-token-0123456789abcdef";

/// `X-Slack-Signature` for `body` at `timestamp`.
pub fn slack_signature(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:{body}").as_bytes());
    format!("v0={}", hex_lower(&mac.finalize().into_bytes()))
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `X-Twilio-Signature`: base64 HMAC-SHA1 of the URL and the sorted
/// parameters, each name followed by its value.
pub fn twilio_signature(token: &str, url: &str, params: &[(&str, &str)]) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut data = url.to_string();
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()).unwrap();
    mac.update(data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

/// The form body of a `block_actions` interaction: `user` pressed the
/// button `action_id` whose value is `value`.
pub fn block_actions_body(user: &str, action_id: &str, value: &str, response_url: &str) -> String {
    let payload = json!({
        "type": "block_actions",
        "user": {"id": user, "username": user.to_lowercase(), "team_id": "T000"},
        "api_app_id": "A000",
        "team": {"id": "T000", "domain": "example"},
        "container": {"type": "message", "message_ts": "1700000000.000100", "channel_id": "C0INCIDENTS"},
        "channel": {"id": "C0INCIDENTS", "name": "incidents"},
        "trigger_id": "1.2.3",
        "response_url": response_url,
        "actions": [{
            "type": "button", "action_id": action_id, "block_id": "tocsin", "value": value,
            "action_ts": "1700000001.000200"
        }]
    });
    form(&[("payload", &payload.to_string())])
}

/// The form body of `/tocsin <text>` from `user`.
pub fn slash_body(user: &str, text: &str, response_url: &str) -> String {
    form(&[
        ("token", "legacy-verification-token"),
        ("team_id", "T000"),
        ("team_domain", "example"),
        ("channel_id", "C0INCIDENTS"),
        ("channel_name", "incidents"),
        ("user_id", user),
        ("user_name", &user.to_lowercase()),
        ("command", "/tocsin"),
        ("text", text),
        ("response_url", response_url),
        ("trigger_id", "1.2.3"),
    ])
}

/// Posts `body` to `url` signed as Slack signs at `timestamp` (seconds).
pub async fn post_slack(url: &str, body: &str, timestamp: i64) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", timestamp.to_string())
        .header(
            "x-slack-signature",
            slack_signature(SLACK_SECRET, timestamp, body),
        )
        .body(body.to_string())
        .send()
        .await
        .expect("chatops answered")
}

/// Posts an inbound SMS from `from` saying `text`, signed as Twilio signs.
pub async fn post_sms(url: &str, from: &str, text: &str) -> reqwest::Response {
    let params = [
        ("MessageSid", "SM00000000000000000000000000000001"),
        ("AccountSid", "AC00000000000000000000000000000001"),
        ("From", from),
        ("To", "+15005550006"),
        ("Body", text),
        ("NumMedia", "0"),
    ];
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header(
            "x-twilio-signature",
            twilio_signature(TWILIO_TOKEN, TWILIO_URL, &params),
        )
        .body(form(&params))
        .send()
        .await
        .expect("chatops answered")
}

/// A chat-ops config: Slack with [`SLACK_SECRET`] and the fakes' response
/// URLs allowed, SMS with [`TWILIO_TOKEN`] at [`TWILIO_URL`], the read and
/// write API tokens, no status cache.
pub fn config(fakes: &FakeProviders) -> ChatopsConfig {
    let mut c = ChatopsConfig::with(
        Some(SLACK_SECRET),
        Some((TWILIO_TOKEN, TWILIO_URL)),
        &[
            ("dashboard", READ_TOKEN, false),
            ("grafana", WRITE_TOKEN, true),
        ],
    );
    if let Some(s) = c.slack.as_mut() {
        s.response_url_prefixes = vec![format!("{}/slack/actions/", fakes.base_url())];
    }
    c.status.cache_for = tocsin_runtime::config::HumanDuration(std::time::Duration::ZERO);
    c
}

/// The harness config for chat-ops tests: every channel of
/// [`crate::notifier::ALL_CHANNELS`], the notifier on `fakes` (its data in
/// `data_dir`) and chat-ops, with chat-ops' users taken from escalation's.
pub fn harness_config(
    nats: &crate::NatsServer,
    fakes: &FakeProviders,
    data_dir: &std::path::Path,
) -> tocsin::config::Config {
    let mut config = crate::TocsinHarness::config(nats);
    config.escalation = serde_yaml_ng::from_str(crate::notifier::ALL_CHANNELS).unwrap();
    config.notifier = Some(crate::notifier::config(fakes, None, data_dir));
    config.chatops = Some(self::config(fakes));
    config.compose_chatops_users();
    config
}
