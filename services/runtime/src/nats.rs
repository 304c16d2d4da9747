//! Connecting to NATS.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};
use serde::Deserialize;

use crate::{
    admin::Metrics,
    config::{one_secret, ConfigPath, EnvString, HumanDuration, Secret, SecretFile},
    RuntimeError,
};

/// `nats:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawNatsConfig")]
pub struct NatsConfig {
    /// Server URL(s), comma separated. Default `nats://127.0.0.1:4222`.
    pub url: EnvString,
    pub auth: NatsAuth,
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
    tls: Option<TlsConfig>,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: HumanDuration,
    #[serde(default = "default_reconnect_max_delay")]
    reconnect_max_delay: HumanDuration,
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
            tls: None,
            connect_timeout: default_connect_timeout(),
            reconnect_max_delay: default_reconnect_max_delay(),
        }
    }
}

impl NatsConfig {
    /// A config for `url` with no auth (tests, local runs).
    pub fn for_url(url: impl Into<String>) -> Self {
        NatsConfig {
            url: EnvString(url.into()),
            ..Default::default()
        }
    }
}

impl TryFrom<RawNatsConfig> for NatsConfig {
    type Error = String;
    fn try_from(r: RawNatsConfig) -> Result<Self, String> {
        let token = one_secret("nats.token", r.token, r.token_file)?;
        let password = one_secret("nats.password", r.password, r.password_file)?;
        let seed = one_secret("nats.nkey_seed", r.nkey_seed, r.nkey_seed_file)?;
        let mut methods = Vec::new();
        if let Some(t) = token {
            methods.push(NatsAuth::Token(t));
        }
        match (r.user, password) {
            (Some(user), Some(password)) => methods.push(NatsAuth::UserPassword {
                user: user.0,
                password,
            }),
            (None, None) => {}
            _ => {
                return Err(
                    "nats: `user` and `password` (or `password_file`) go together; set both".into(),
                )
            }
        }
        if let Some(s) = seed {
            methods.push(NatsAuth::NkeySeed(s));
        }
        if let Some(c) = r.creds_file {
            methods.push(NatsAuth::CredsFile(c));
        }
        if methods.len() > 1 {
            return Err(
                "nats: more than one authentication method is set (token, user/password, \
                        nkey_seed, creds_file); keep exactly one"
                    .into(),
            );
        }
        if let Some(tls) = &r.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err(
                    "nats.tls: `cert_file` and `key_file` go together; set both or neither".into(),
                );
            }
        }
        if r.url.0.trim().is_empty() {
            return Err("nats.url is empty; e.g. nats://127.0.0.1:4222".into());
        }
        Ok(NatsConfig {
            url: r.url,
            auth: methods.pop().unwrap_or_default(),
            tls: r.tls,
            connect_timeout: r.connect_timeout,
            reconnect_max_delay: r.reconnect_max_delay,
        })
    }
}

/// Connects to NATS. The client keeps retrying in the background, also on
/// the first connect, so a service can start before NATS and report "not
/// ready" until it is there. Connection events are logged and counted.
pub async fn connect(
    config: &NatsConfig,
    client_name: &str,
    metrics: &Metrics,
) -> Result<Client, RuntimeError> {
    let max_delay = config.reconnect_max_delay.get();
    let mut opts = ConnectOptions::new()
        .name(client_name)
        .connection_timeout(config.connect_timeout.get())
        .retry_on_initial_connect()
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
    opts = match &config.auth {
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
    let events = metrics.nats_events.clone();
    let connected = metrics.nats_connected.clone();
    opts = opts.event_callback(move |event| {
        let events = events.clone();
        let connected = connected.clone();
        async move {
            let kind = match &event {
                Event::Connected => "connected",
                Event::Disconnected => "disconnected",
                Event::LameDuckMode => "lame_duck",
                Event::Draining => "draining",
                Event::Closed => "closed",
                Event::SlowConsumer(_) => "slow_consumer",
                Event::ServerError(_) => "server_error",
                Event::ClientError(_) => "client_error",
            };
            events
                .get_or_create(&crate::admin::labels(&[("event", kind)]))
                .inc();
            match event {
                Event::Connected => {
                    connected.set(1);
                    tracing::info!("connected to NATS");
                }
                Event::Disconnected => {
                    connected.set(0);
                    tracing::warn!("disconnected from NATS; reconnecting");
                }
                Event::Closed => {
                    connected.set(0);
                    tracing::info!("NATS connection closed");
                }
                Event::Draining => tracing::info!("draining NATS connection"),
                other => tracing::warn!(event = %other, "NATS event"),
            }
        }
    });
    let url = config.url.0.clone();
    let servers: Vec<String> = url.split(',').map(|s| s.trim().to_string()).collect();
    opts.connect(servers)
        .await
        .map_err(|source| RuntimeError::Connect { url, source })
}

/// Whether the client is connected right now.
pub fn is_connected(client: &Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}
