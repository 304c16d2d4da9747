//! Connecting to NATS.
//!
//! Tocsin connects as one NATS identity per service ([`IDENTITIES`]): each
//! has its own user on the server, with publish/subscribe permissions
//! limited to what that service does (`deploy/nats/permissions.conf`), and
//! its own inbox prefix `_INBOX.<identity>`, the only inbox it may
//! subscribe to. `nats.credentials.<identity>` holds its credentials; an
//! identity without an entry uses the shared ones of the `nats:` section.

use std::{cell::RefCell, collections::BTreeMap, time::Duration};

use async_nats::{Client, ConnectOptions, Event};
use serde::{de::IgnoredAny, Deserialize, Deserializer};

use crate::{
    admin::Metrics,
    config::{one_secret, ConfigPath, EnvString, HumanDuration, Secret, SecretFile},
    RuntimeError,
};

/// Who Tocsin connects to NATS as: the services (also those being built),
/// the operator CLI and the admin (used only to create or update streams).
/// Each is a user in the shipped NATS configs and a key of
/// `nats.credentials`.
pub const IDENTITIES: [&str; 8] = [
    "ingest",
    "incidents",
    "escalation",
    "notifier",
    "remediation",
    "chatops",
    "operator",
    "admin",
];

/// Shortest NATS password or token Tocsin accepts. The shipped placeholders
/// (`REPLACE_ME`) are shorter, so a copy nobody filled in stops Tocsin at
/// start instead of running with a known password.
pub const MIN_SECRET_CHARS: usize = 16;

/// `nats:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawNatsConfig")]
pub struct NatsConfig {
    /// Server URL(s), comma separated. Default `nats://127.0.0.1:4222`.
    /// Credentials written in a URL (`nats://user:password@host`) are moved
    /// to `auth`, so this never holds a password.
    pub url: EnvString,
    /// The shared credentials: for every identity without its own entry in
    /// `credentials`.
    pub auth: NatsAuth,
    /// Per-identity credentials (`nats.credentials.<identity>`).
    pub credentials: BTreeMap<&'static str, Credential>,
    pub tls: Option<TlsConfig>,
    /// Default 5s.
    pub connect_timeout: HumanDuration,
    /// Longest wait between reconnect attempts. Default 2s.
    pub reconnect_max_delay: HumanDuration,
}

/// How Tocsin authenticates to NATS; at most one method.
#[derive(Debug, Clone, Default)]
pub enum NatsAuth {
    #[default]
    None,
    Token(Secret),
    UserPassword {
        user: String,
        password: Secret,
    },
    NkeySeed(Secret),
    CredsFile(ConfigPath),
}

impl NatsAuth {
    /// The NATS user name, for messages (never the secret).
    pub fn user(&self) -> &str {
        match self {
            NatsAuth::None => "(none)",
            NatsAuth::Token(_) => "(token)",
            NatsAuth::UserPassword { user, .. } => user,
            NatsAuth::NkeySeed(_) => "(nkey)",
            NatsAuth::CredsFile(_) => "(creds file)",
        }
    }
}

/// One entry of `nats.credentials`.
#[derive(Debug, Clone)]
pub enum Credential {
    /// Read and checked.
    Read(NatsAuth),
    /// Present in the file but not read (its variables not expanded, its
    /// files not opened), because this process does not connect as that
    /// identity: see [`reading_credentials_of`].
    NotRead,
}

/// `nats.tls:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA bundle (PEM) to trust for the server certificate.
    #[serde(default)]
    pub ca_file: Option<ConfigPath>,
    /// Client certificate and key (PEM) for mutual TLS; both or neither.
    #[serde(default)]
    pub cert_file: Option<ConfigPath>,
    #[serde(default)]
    pub key_file: Option<ConfigPath>,
    /// Refuse to connect without TLS. Default true when this section exists.
    #[serde(default = "yes")]
    pub required: bool,
    /// TLS before the NATS INFO (servers with `handshake_first`). Default false.
    #[serde(default)]
    pub handshake_first: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNatsConfig {
    #[serde(default = "default_url")]
    url: EnvString,
    #[serde(default)]
    token: Option<Secret>,
    #[serde(default)]
    token_file: Option<SecretFile>,
    #[serde(default)]
    user: Option<EnvString>,
    #[serde(default)]
    password: Option<Secret>,
    #[serde(default)]
    password_file: Option<SecretFile>,
    #[serde(default)]
    nkey_seed: Option<Secret>,
    #[serde(default)]
    nkey_seed_file: Option<SecretFile>,
    #[serde(default)]
    creds_file: Option<ConfigPath>,
    #[serde(default)]
    credentials: RawCredentials,
    #[serde(default)]
    tls: Option<TlsConfig>,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: HumanDuration,
    #[serde(default = "default_reconnect_max_delay")]
    reconnect_max_delay: HumanDuration,
}

/// The authentication keys, shared by the `nats:` section and each entry
/// of `nats.credentials`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    token: Option<Secret>,
    #[serde(default)]
    token_file: Option<SecretFile>,
    #[serde(default)]
    user: Option<EnvString>,
    #[serde(default)]
    password: Option<Secret>,
    #[serde(default)]
    password_file: Option<SecretFile>,
    #[serde(default)]
    nkey_seed: Option<Secret>,
    #[serde(default)]
    nkey_seed_file: Option<SecretFile>,
    #[serde(default)]
    creds_file: Option<ConfigPath>,
}

/// The same keys, checked by name only: nothing expanded or opened.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct UnreadAuth {
    token: Option<IgnoredAny>,
    token_file: Option<IgnoredAny>,
    user: Option<IgnoredAny>,
    password: Option<IgnoredAny>,
    password_file: Option<IgnoredAny>,
    nkey_seed: Option<IgnoredAny>,
    nkey_seed_file: Option<IgnoredAny>,
    creds_file: Option<IgnoredAny>,
}

impl RawAuth {
    /// The one method set (or none); `at` names the section in errors.
    fn into_auth(self, at: &str) -> Result<NatsAuth, String> {
        let token = one_secret(&format!("{at}.token"), self.token, self.token_file)?;
        let password = one_secret(&format!("{at}.password"), self.password, self.password_file)?;
        let seed = one_secret(
            &format!("{at}.nkey_seed"),
            self.nkey_seed,
            self.nkey_seed_file,
        )?;
        let long_enough = |what: &str, s: &Secret| {
            let n = s.expose().chars().count();
            if n < MIN_SECRET_CHARS {
                Err(format!(
                    "{at}.{what} is {n} characters long; use at least {MIN_SECRET_CHARS} \
                     (deploy/nats/passwords.sh makes 48), and the same on the NATS server"
                ))
            } else {
                Ok(())
            }
        };
        let mut methods = Vec::new();
        if let Some(t) = token {
            long_enough("token", &t)?;
            methods.push(NatsAuth::Token(t));
        }
        match (self.user, password) {
            (Some(user), Some(password)) => {
                long_enough("password", &password)?;
                methods.push(NatsAuth::UserPassword {
                    user: user.0,
                    password,
                })
            }
            (None, None) => {}
            _ => {
                return Err(format!(
                    "{at}: `user` and `password` (or `password_file`) go together; set both"
                ))
            }
        }
        if let Some(s) = seed {
            methods.push(NatsAuth::NkeySeed(s));
        }
        if let Some(c) = self.creds_file {
            methods.push(NatsAuth::CredsFile(c));
        }
        if methods.len() > 1 {
            return Err(format!(
                "{at}: more than one authentication method is set (token, user/password, \
                 nkey_seed, creds_file, or credentials in the url); keep exactly one"
            ));
        }
        Ok(methods.pop().unwrap_or_default())
    }
}

thread_local! {
    /// The identities whose `nats.credentials` entries a config load on
    /// this thread reads; `None`: all of them.
    static READ_ONLY: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Runs `load` (a config load) reading only the `nats.credentials` entries
/// of `identities`; the others are checked by key name but their secrets
/// are not read, so a process needs only its own identities' variables and
/// files (an operator's machine only the operator's password, an ingest
/// host only ingest's).
pub fn reading_credentials_of<T>(identities: &[&str], load: impl FnOnce() -> T) -> T {
    READ_ONLY.with(|r| *r.borrow_mut() = Some(identities.iter().map(|s| s.to_string()).collect()));
    let out = load();
    READ_ONLY.with(|r| *r.borrow_mut() = None);
    out
}

fn credential<'de, D: Deserializer<'de>>(
    identity: &'static str,
    d: D,
) -> Result<Option<Credential>, D::Error> {
    let wanted = READ_ONLY.with(|r| {
        r.borrow()
            .as_ref()
            .is_none_or(|ids| ids.iter().any(|i| i == identity))
    });
    if !wanted {
        UnreadAuth::deserialize(d)?;
        return Ok(Some(Credential::NotRead));
    }
    let raw = RawAuth::deserialize(d)?;
    let auth = raw
        .into_auth(&format!("nats.credentials.{identity}"))
        .map_err(serde::de::Error::custom)?;
    if matches!(auth, NatsAuth::None) {
        return Err(serde::de::Error::custom(format!(
            "nats.credentials.{identity} is empty; give `user` and `password` (or \
             `password_file`), `token`, `nkey_seed` or `creds_file`, or remove it"
        )));
    }
    Ok(Some(Credential::Read(auth)))
}

/// `nats.credentials`: one optional entry per identity of [`IDENTITIES`].
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    #[serde(default, deserialize_with = "cred_ingest")]
    ingest: Option<Credential>,
    #[serde(default, deserialize_with = "cred_incidents")]
    incidents: Option<Credential>,
    #[serde(default, deserialize_with = "cred_escalation")]
    escalation: Option<Credential>,
    #[serde(default, deserialize_with = "cred_notifier")]
    notifier: Option<Credential>,
    #[serde(default, deserialize_with = "cred_remediation")]
    remediation: Option<Credential>,
    #[serde(default, deserialize_with = "cred_chatops")]
    chatops: Option<Credential>,
    #[serde(default, deserialize_with = "cred_operator")]
    operator: Option<Credential>,
    #[serde(default, deserialize_with = "cred_admin")]
    admin: Option<Credential>,
}

impl RawCredentials {
    fn into_map(self) -> BTreeMap<&'static str, Credential> {
        let mut map = BTreeMap::new();
        if let Some(c) = self.ingest {
            map.insert("ingest", c);
        }
        if let Some(c) = self.incidents {
            map.insert("incidents", c);
        }
        if let Some(c) = self.escalation {
            map.insert("escalation", c);
        }
        if let Some(c) = self.notifier {
            map.insert("notifier", c);
        }
        if let Some(c) = self.remediation {
            map.insert("remediation", c);
        }
        if let Some(c) = self.chatops {
            map.insert("chatops", c);
        }
        if let Some(c) = self.operator {
            map.insert("operator", c);
        }
        if let Some(c) = self.admin {
            map.insert("admin", c);
        }
        map
    }
}

fn cred_ingest<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Credential>, D::Error> {
    credential("ingest", d)
}
fn cred_incidents<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Credential>, D::Error> {
    credential("incidents", d)
}
fn cred_escalation<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Credential>, D::Error> {
    credential("escalation", d)
}
fn cred_notifier<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Credential>, D::Error> {
    credential("notifier", d)
}
fn cred_remediation<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Credential>, D::Error> {
    credential("remediation", d)
}
fn cred_chatops<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Credential>, D::Error> {
    credential("chatops", d)
}
fn cred_operator<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Credential>, D::Error> {
    credential("operator", d)
}
fn cred_admin<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Credential>, D::Error> {
    credential("admin", d)
}

fn default_url() -> EnvString {
    EnvString("nats://127.0.0.1:4222".into())
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration::secs(5)
}
fn default_reconnect_max_delay() -> HumanDuration {
    HumanDuration::secs(2)
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: default_url(),
            auth: NatsAuth::None,
            credentials: BTreeMap::new(),
            tls: None,
            connect_timeout: default_connect_timeout(),
            reconnect_max_delay: default_reconnect_max_delay(),
        }
    }
}

impl NatsConfig {
    /// A config for `url`, authenticated with the credentials the URL
    /// carries (`nats://user:password@host:port`), if any.
    pub fn for_url(url: impl Into<String>) -> Self {
        let (url, auth) = split_credentials(&url.into());
        NatsConfig {
            url: EnvString(url),
            auth: auth.unwrap_or_default(),
            ..Default::default()
        }
    }

    /// The credentials `identity` connects with: its own entry in
    /// `nats.credentials`, else the shared ones.
    pub fn auth_for(&self, identity: &str) -> Result<&NatsAuth, RuntimeError> {
        match self.credentials.get(identity) {
            Some(Credential::Read(auth)) => Ok(auth),
            Some(Credential::NotRead) => Err(RuntimeError::CredentialsNotRead {
                identity: identity.to_string(),
            }),
            None => Ok(&self.auth),
        }
    }

    /// Whether `identity` has its own entry in `nats.credentials`.
    pub fn has_own_credentials(&self, identity: &str) -> bool {
        self.credentials.contains_key(identity)
    }
}

/// Splits `user:password@` (or `token@`) off every URL of a comma-separated
/// list. Returns the URLs without them and the credentials (the last ones
/// found; percent-escapes such as `%40` for `@` are decoded).
fn split_credentials(urls: &str) -> (String, Option<NatsAuth>) {
    let mut auth = None;
    let stripped: Vec<String> = urls
        .split(',')
        .map(|u| {
            let u = u.trim();
            let (scheme, rest) = match u.split_once("://") {
                Some((s, r)) => (Some(s), r),
                None => (None, u),
            };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let Some(at) = rest[..authority_end].rfind('@') else {
                return u.to_string();
            };
            let userinfo = &rest[..at];
            auth = Some(match userinfo.split_once(':') {
                Some((user, password)) => NatsAuth::UserPassword {
                    user: percent_decode(user),
                    password: Secret::new(percent_decode(password)),
                },
                None => NatsAuth::Token(Secret::new(percent_decode(userinfo))),
            });
            let host = &rest[at + 1..];
            match scheme {
                Some(s) => format!("{s}://{host}"),
                None => host.to_string(),
            }
        })
        .collect();
    (stripped.join(","), auth)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TryFrom<RawNatsConfig> for NatsConfig {
    type Error = String;
    fn try_from(r: RawNatsConfig) -> Result<Self, String> {
        let (url, in_url) = split_credentials(&r.url.0);
        let auth = RawAuth {
            token: r.token,
            token_file: r.token_file,
            user: r.user,
            password: r.password,
            password_file: r.password_file,
            nkey_seed: r.nkey_seed,
            nkey_seed_file: r.nkey_seed_file,
            creds_file: r.creds_file,
        }
        .into_auth("nats")?;
        let auth = match (auth, in_url) {
            (NatsAuth::None, Some(in_url)) => in_url,
            (auth, None) => auth,
            (_, Some(_)) => {
                return Err(
                    "nats: the url carries credentials (user:password@) and another \
                            authentication method is set; keep exactly one"
                        .into(),
                )
            }
        };
        if let Some(tls) = &r.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err(
                    "nats.tls: `cert_file` and `key_file` go together; set both or neither".into(),
                );
            }
        }
        if url.trim().is_empty() {
            return Err("nats.url is empty; e.g. nats://127.0.0.1:4222".into());
        }
        Ok(NatsConfig {
            url: EnvString(url),
            auth,
            credentials: r.credentials.into_map(),
            tls: r.tls,
            connect_timeout: r.connect_timeout,
            reconnect_max_delay: r.reconnect_max_delay,
        })
    }
}

/// Connects to NATS with the shared credentials and the default inbox
/// prefix. The client keeps retrying in the background, also on the first
/// connect, so a service can start before NATS and report "not ready"
/// until it is there. Connection events are logged and counted.
pub async fn connect(
    config: &NatsConfig,
    client_name: &str,
    metrics: &Metrics,
) -> Result<Client, RuntimeError> {
    connect_with(config, &config.auth, None, client_name, metrics, true).await
}

/// Connects as `identity` (one of [`IDENTITIES`]): with its credentials
/// ([`NatsConfig::auth_for`]) and the inbox prefix `_INBOX.<identity>`, the
/// only inbox the shipped permissions let it subscribe to. A permission
/// the server refuses is logged at ERROR naming the identity, and counted
/// (`tocsin_nats_events_total{event="permissions_violation"}`).
pub async fn connect_as(
    config: &NatsConfig,
    identity: &str,
    client_name: &str,
    metrics: &Metrics,
) -> Result<Client, RuntimeError> {
    let auth = config.auth_for(identity)?;
    connect_with(config, auth, Some(identity), client_name, metrics, true).await
}

/// [`connect_as`] for a short-lived client (the operator CLI): one attempt
/// at each server, then [`RuntimeError::Connect`] naming the URL, instead
/// of retrying (and logging each retry) for ever.
pub async fn connect_once_as(
    config: &NatsConfig,
    identity: &str,
    client_name: &str,
    metrics: &Metrics,
) -> Result<Client, RuntimeError> {
    let auth = config.auth_for(identity)?;
    connect_with(config, auth, Some(identity), client_name, metrics, false).await
}

/// The inbox prefix of `identity`: `_INBOX.<identity>`.
pub fn inbox_prefix(identity: &str) -> String {
    format!("_INBOX.{identity}")
}

async fn connect_with(
    config: &NatsConfig,
    auth: &NatsAuth,
    identity: Option<&str>,
    client_name: &str,
    metrics: &Metrics,
    retry_initial: bool,
) -> Result<Client, RuntimeError> {
    let max_delay = config.reconnect_max_delay.get();
    let mut opts = ConnectOptions::new()
        .name(client_name)
        .connection_timeout(config.connect_timeout.get())
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| {
            // 0, 50ms, 100ms, 200ms ... capped: quick to come back after a
            // server restart, without hammering a server that is down.
            if attempts <= 1 {
                Duration::ZERO
            } else {
                let exp = Duration::from_millis(50).saturating_mul(1u32 << attempts.min(16) as u32);
                exp.min(max_delay)
            }
        });
    if retry_initial {
        opts = opts.retry_on_initial_connect();
    }
    if let Some(identity) = identity {
        opts = opts.custom_inbox_prefix(inbox_prefix(identity));
    }
    opts = match auth {
        NatsAuth::None => opts,
        NatsAuth::Token(t) => opts.token(t.expose().to_string()),
        NatsAuth::UserPassword { user, password } => {
            opts.user_and_password(user.clone(), password.expose().to_string())
        }
        NatsAuth::NkeySeed(seed) => opts.nkey(seed.expose().to_string()),
        NatsAuth::CredsFile(path) => {
            opts.credentials_file(&path.0)
                .await
                .map_err(|source| RuntimeError::ReadFile {
                    what: "NATS credentials file",
                    path: path.0.clone(),
                    source,
                })?
        }
    };
    if let Some(tls) = &config.tls {
        opts = opts.require_tls(tls.required);
        if tls.handshake_first {
            opts = opts.tls_first();
        }
        if let Some(ca) = &tls.ca_file {
            opts = opts.add_root_certificates(ca.0.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            opts = opts.add_client_certificate(cert.0.clone(), key.0.clone());
        }
    }
    let who = Who {
        service: identity.unwrap_or("shared").to_string(),
        user: auth.user().to_string(),
        client: client_name.to_string(),
    };
    let metrics = metrics.clone();
    opts = opts.event_callback(move |event| {
        let (metrics, who) = (metrics.clone(), who.clone());
        async move { on_event(&metrics, &who, event) }
    });
    let url = config.url.0.clone();
    let servers: Vec<String> = url.split(',').map(|s| s.trim().to_string()).collect();
    opts.connect(servers)
        .await
        .map_err(|source| RuntimeError::Connect { url, source })
}

/// Whose connection an event is about, for log lines.
#[derive(Clone)]
struct Who {
    /// The identity (service) connecting, or `shared`.
    service: String,
    user: String,
    client: String,
}

/// Logs and counts one connection event.
fn on_event(metrics: &Metrics, who: &Who, event: Event) {
    let kind = match &event {
        Event::Connected => "connected",
        Event::Disconnected => "disconnected",
        Event::LameDuckMode => "lame_duck",
        Event::Draining => "draining",
        Event::Closed => "closed",
        Event::SlowConsumer(_) => "slow_consumer",
        Event::ServerError(e) if is_permissions_violation(&e.to_string()) => {
            "permissions_violation"
        }
        Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
            "authorization_violation"
        }
        Event::ClientError(e) if e.to_string().contains("authorization violation") => {
            "authorization_violation"
        }
        Event::ServerError(_) => "server_error",
        Event::ClientError(_) => "client_error",
    };
    metrics
        .nats_events
        .get_or_create(&crate::admin::labels(&[("event", kind)]))
        .inc();
    let (service, user) = (who.service.as_str(), who.user.as_str());
    match (kind, event) {
        (_, Event::Connected) => {
            metrics.set_nats_connected(&who.client, true);
            tracing::info!(service, user, "connected to NATS");
        }
        (_, Event::Disconnected) => {
            metrics.set_nats_connected(&who.client, false);
            tracing::warn!(service, user, "disconnected from NATS; reconnecting");
        }
        (_, Event::Closed) => {
            metrics.set_nats_connected(&who.client, false);
            tracing::info!(service, user, "NATS connection closed");
        }
        (_, Event::Draining) => tracing::info!(service, "draining NATS connection"),
        ("permissions_violation", Event::ServerError(e)) => {
            let message = refusal_message(&e.to_string(), service, user);
            tracing::error!(service, user, "{message}");
        }
        ("authorization_violation", _) => tracing::error!(
            service,
            user,
            "NATS refused the credentials of service {service} (user {user}): check \
             nats.credentials.{service} (or the shared nats: credentials) against the \
             NATS server's users and passwords"
        ),
        (_, other) => tracing::warn!(service, event = %other, "NATS event"),
    }
}

/// What to log when the server refuses a publish or subscription: its
/// words (`Permissions Violation for Publish to "X"`) and where the fix is,
/// the NATS user of this service.
fn refusal_message(server: &str, service: &str, user: &str) -> String {
    let what = server.strip_prefix("nats: ").unwrap_or(server);
    let what = what
        .replacen("Permissions Violation", "permissions violation", 1)
        .replacen(" for Publish to", " for publish to", 1)
        .replacen(" for Subscription to", " for subscription to", 1);
    format!(
        "NATS refused: {what}: check the NATS user of service {service} (user {user}); \
         Tocsin's permissions are in deploy/nats/permissions.conf (with \
         jetstream.domain, as deploy/nats/domain-permissions.sh prints them)"
    )
}

fn is_permissions_violation(message: &str) -> bool {
    message
        .to_ascii_lowercase()
        .contains("permissions violation")
}

/// Waits until the server has read everything this client sent before,
/// its subscriptions among it. `Client::flush` only writes the client's
/// buffer to the socket: a message another connection sends right after
/// can still reach the server first and find no subscriber ("no
/// responders"). The server reads one connection in order, so the answer
/// to a request sent after the subscriptions comes back only once it has
/// them; any answer will do (the account's information, an error, no
/// responders). The request is JetStream's `INFO` under `js`'s prefix
/// (`$JS.API.INFO`, or `$JS.<domain>.API.INFO` with `jetstream.domain`),
/// which every Tocsin service's user may send. An error when the server
/// does not answer within the client's request timeout, or refuses the
/// request.
pub async fn round_trip(
    js: &async_nats::jetstream::Context,
) -> Result<(), async_nats::jetstream::context::RequestError> {
    use async_nats::jetstream::context::RequestErrorKind;
    match js.request::<_, _, IgnoredAny>("INFO", &()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether the client is connected right now.
pub fn is_connected(client: &Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn load(text: &str) -> Result<NatsConfig, crate::config::ConfigError> {
        crate::config::from_str(Path::new("t.yaml"), text)
    }

    #[test]
    fn credentials_in_the_url_move_to_auth_and_out_of_the_url() {
        let c = NatsConfig::for_url("nats://admin:p%40ss@127.0.0.1:4222, nats://h2:4222");
        assert_eq!(c.url.0, "nats://127.0.0.1:4222,nats://h2:4222");
        assert!(matches!(&c.auth, NatsAuth::UserPassword { user, password }
            if user == "admin" && password.expose() == "p@ss"));
        let c = NatsConfig::for_url("tls://s3cret-token-0123456789@nats:4222");
        assert_eq!(c.url.0, "tls://nats:4222");
        assert!(matches!(&c.auth, NatsAuth::Token(t) if t.expose() == "s3cret-token-0123456789"));
        let c = NatsConfig::for_url("nats://127.0.0.1:4222");
        assert!(matches!(c.auth, NatsAuth::None));

        let err = load("url: nats://a:b@h:1\ntoken: abcdefghijklmnopq\n").unwrap_err();
        assert!(err.message.contains("keep exactly one"), "{err}");
    }

    #[test]
    fn each_identity_has_its_own_credentials_or_the_shared_ones() {
        let c = load(
            "url: nats://h:4222\nuser: shared\npassword: shared-password-0123\n\
             credentials:\n  ingest: {user: ingest, password: ingest-password-0123}\n",
        )
        .unwrap();
        assert_eq!(c.auth_for("ingest").unwrap().user(), "ingest");
        assert_eq!(c.auth_for("incidents").unwrap().user(), "shared");
        assert!(c.has_own_credentials("ingest"));
        assert!(!c.has_own_credentials("incidents"));
    }

    #[test]
    fn credential_mistakes_are_errors_that_say_where() {
        let err = load("credentials:\n  ingset: {user: a, password: b}\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.message.contains("unknown field `ingset`"), "{err}");

        let err =
            load("credentials:\n  ingest: {user: ingest, password: REPLACE_ME}\n").unwrap_err();
        assert!(
            err.message
                .contains("nats.credentials.ingest.password is 10 characters long"),
            "{err}"
        );

        let err = load("credentials:\n  ingest: {user: ingest}\n").unwrap_err();
        assert!(err.message.contains("go together"), "{err}");

        let err = load("credentials:\n  ingest: {}\n").unwrap_err();
        assert!(
            err.message.contains("nats.credentials.ingest is empty"),
            "{err}"
        );
    }

    #[test]
    fn only_the_identities_a_process_runs_as_are_read() {
        let text = "credentials:\n  ingest:\n    user: ingest\n    \
             password: ${TOCSIN_TEST_UNSET_INGEST_PASSWORD}\n  operator:\n    \
             user: operator\n    password_file: /nonexistent/operator\n";
        // Everything read: the unset variable is an error.
        let err = load(text).unwrap_err();
        assert!(
            err.message.contains("TOCSIN_TEST_UNSET_INGEST_PASSWORD"),
            "{err}"
        );
        // Only ingest: the operator's file is never opened.
        let err = reading_credentials_of(&["ingest"], || load(text)).unwrap_err();
        assert!(
            err.message.contains("TOCSIN_TEST_UNSET_INGEST_PASSWORD"),
            "{err}"
        );
        // Neither: nothing to read, and asking for them is an error, not a
        // silent fall-back to the shared credentials.
        let c = reading_credentials_of(&["escalation"], || load(text)).unwrap();
        assert!(matches!(
            c.auth_for("ingest"),
            Err(RuntimeError::CredentialsNotRead { .. })
        ));
        assert!(matches!(c.auth_for("escalation"), Ok(NatsAuth::None)));
        // Key names are still checked.
        let err = reading_credentials_of(&["escalation"], || {
            load("credentials:\n  ingest: {usr: ingest}\n")
        })
        .unwrap_err();
        assert!(err.message.contains("unknown field `usr`"), "{err}");
    }

    #[test]
    fn a_refusal_says_which_service_and_user_to_fix() {
        let m = refusal_message(
            "nats: Permissions Violation for Publish to \"tocsin.alerts.x\"",
            "notifier",
            "notifier",
        );
        assert!(
            m.starts_with(
                "NATS refused: permissions violation for publish to \"tocsin.alerts.x\": \
                 check the NATS user of service notifier (user notifier)"
            ),
            "{m}"
        );
        assert!(is_permissions_violation(
            "Permissions Violation for Subscription to \"tocsin.notify.>\""
        ));
    }
}
