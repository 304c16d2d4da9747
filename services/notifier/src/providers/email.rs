//! Email over SMTP with lettre: plain, STARTTLS or implicit TLS, optional
//! authentication, multipart text + HTML. The `Message-ID` is derived from
//! the delivery id, so a message sent again after a crash carries the same
//! id and mail systems can fold the two.
//!
//! The SMTP transport (and its connection pool, which spawns a task) is
//! built on first use, inside the runtime: building it while the config
//! loads (`tocsin check-config`, or before the runtime starts) panics.

use lettre::{
    message::{header::ContentType, Mailbox, MultiPart, SinglePart},
    transport::smtp::{
        authentication::Credentials,
        client::{Tls, TlsParameters},
    },
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
};
use tocsin_proto::notify::ProviderRef;

use futures::future::BoxFuture;

use super::{Outgoing, Provider, Rendered, SendError};
use crate::config::{EmailConfig, SmtpTls};

pub struct Email {
    /// Everything needed to build the transport; built once, on first use.
    settings: Settings,
    transport: tokio::sync::OnceCell<AsyncSmtpTransport<Tokio1Executor>>,
    from: Mailbox,
    timeout: std::time::Duration,
}

struct Settings {
    host: String,
    port: u16,
    tls: Tls,
    credentials: Option<Credentials>,
}

/// The three rendered parts.
#[derive(Debug, Clone)]
pub struct Parts {
    pub subject: String,
    pub text: String,
    pub html: String,
}

impl Email {
    pub fn new(cfg: &EmailConfig) -> Result<Email, String> {
        let from: Mailbox = cfg
            .from
            .0
            .parse()
            .map_err(|e| format!("email: from {:?} is not an address: {e}", cfg.from.0))?;
        let host = cfg.host.0.clone();
        let tls_mode = cfg.tls.unwrap_or(SmtpTls::Starttls);
        let port = cfg.port.unwrap_or(match tls_mode {
            SmtpTls::None => 25,
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
        });
        let params = || -> Result<TlsParameters, String> {
            let mut b = TlsParameters::builder(host.clone());
            if let Some(ca) = &cfg.ca_file {
                let pem = std::fs::read(&ca.0)
                    .map_err(|e| format!("email: cannot read ca_file {}: {e}", ca.0.display()))?;
                let cert = lettre::transport::smtp::client::Certificate::from_pem(&pem)
                    .map_err(|e| format!("email: ca_file {}: {e}", ca.0.display()))?;
                b = b.add_root_certificate(cert);
            }
            b.build().map_err(|e| format!("email: TLS set-up: {e}"))
        };
        let tls = match tls_mode {
            SmtpTls::None => Tls::None,
            SmtpTls::Starttls => Tls::Required(params()?),
            SmtpTls::Tls => Tls::Wrapper(params()?),
        };
        let credentials = match &cfg.username {
            Some(user) => {
                let pass = cfg
                    .password()
                    .map_err(|e| format!("email: {e}"))?
                    .ok_or("email: `username` is set but neither `password` nor `password_file`")?;
                Some(Credentials::new(user.0.clone(), pass.expose().to_string()))
            }
            None => None,
        };
        Ok(Email {
            settings: Settings {
                host,
                port,
                tls,
                credentials,
            },
            transport: tokio::sync::OnceCell::new(),
            from,
            timeout: cfg
                .guard
                .timeout
                .get()
                .max(std::time::Duration::from_secs(1)),
        })
    }

    async fn transport(&self) -> &AsyncSmtpTransport<Tokio1Executor> {
        self.transport
            .get_or_init(|| async {
                let s = &self.settings;
                let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host)
                    .port(s.port)
                    .tls(s.tls.clone())
                    .timeout(Some(self.timeout));
                if let Some(c) = &s.credentials {
                    b = b.credentials(c.clone());
                }
                b.build()
            })
            .await
    }

    /// The message (exposed for tests).
    pub fn message(&self, out: &Outgoing, parts: &Parts) -> Result<(Message, String), SendError> {
        let to: Mailbox = out.address.parse().map_err(|e| {
            SendError::permanent(format!("{:?} is not an email address: {e}", out.address))
        })?;
        let domain = self.from.email.domain().to_string();
        let message_id = format!("<{}@{}>", out.short_id(), domain);
        let subject: String = parts.subject.lines().next().unwrap_or_default().to_string();
        let mut builder = Message::builder();
        if let Some(ProviderRef::Email {
            message_id: first, ..
        }) = &out.reference
        {
            // A status update answers the page's email: same thread.
            builder = builder.in_reply_to(first.clone()).references(first.clone());
        }
        let msg = builder
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(message_id.clone()))
            .multipart(
                MultiPart::alternative()
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_PLAIN)
                            .body(parts.text.clone()),
                    )
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_HTML)
                            .body(parts.html.clone()),
                    ),
            )
            .map_err(|e| SendError::permanent(format!("cannot build the email: {e}")))?;
        Ok((msg, message_id))
    }

    pub async fn send_parts(
        &self,
        out: &Outgoing,
        parts: &Parts,
    ) -> Result<ProviderRef, SendError> {
        let (msg, message_id) = self.message(out, parts)?;
        match self.transport().await.send(msg).await {
            Ok(_) => Ok(ProviderRef::Email {
                message_id,
                to: out.address.clone(),
                subject: parts.subject.clone(),
            }),
            // 5xx answers, and client-side refusals (no common login
            // mechanism, an address lettre cannot encode) will not change.
            Err(e) if e.is_permanent() || e.is_client() => {
                Err(SendError::permanent(format!("SMTP: {e}")))
            }
            // No answer after the message went out may have delivered it.
            Err(e) if e.is_timeout() => Err(SendError::Retry {
                reason: format!("SMTP: {e}"),
                retry_after: None,
                maybe_arrived: true,
                rate_limited: false,
            }),
            Err(e) => Err(SendError::retry(format!("SMTP: {e}"))),
        }
    }
}

impl Provider for Email {
    fn name(&self) -> &str {
        "email"
    }

    fn timeout(&self) -> std::time::Duration {
        self.timeout
    }

    fn send<'a>(
        &'a self,
        out: &'a Outgoing,
        r: &'a Rendered,
    ) -> BoxFuture<'a, Result<ProviderRef, SendError>> {
        Box::pin(async move {
            match r {
                Rendered::Email(parts) => self.send_parts(out, parts).await,
                Rendered::Text(_) => Err(SendError::permanent("internal: email rendered as text")),
            }
        })
    }

    /// Notes follow the page in its thread.
    fn takes_status_updates(&self, sent: &ProviderRef) -> bool {
        matches!(sent, ProviderRef::Email { to, .. } if !to.is_empty())
    }
}
