//! Email over SMTP with lettre: plain, STARTTLS or implicit TLS, optional
//! authentication, multipart text + HTML. The `Message-ID` is derived from
//! the delivery id, so a message sent again after a crash carries the same
//! id and mail systems can fold the two.

use lettre::{
    message::{header::ContentType, Mailbox, MultiPart, SinglePart},
    transport::smtp::{
        authentication::Credentials,
        client::{Tls, TlsParameters},
    },
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
};
use tocsin_proto::notify::ProviderRef;

use super::{Outgoing, SendError};
use crate::config::{EmailConfig, SmtpTls};

pub struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

/// The three rendered parts.
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
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .tls(tls)
            .timeout(Some(
                cfg.guard
                    .timeout
                    .get()
                    .max(std::time::Duration::from_secs(1)),
            ));
        if let Some(user) = &cfg.username {
            let pass = cfg
                .password()
                .map_err(|e| format!("email: {e}"))?
                .ok_or("email: `username` is set but neither `password` nor `password_file`")?;
            b = b.credentials(Credentials::new(user.0.clone(), pass.expose().to_string()));
        }
        Ok(Email {
            transport: b.build(),
            from,
        })
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

    pub async fn send(&self, out: &Outgoing, parts: &Parts) -> Result<ProviderRef, SendError> {
        let (msg, message_id) = self.message(out, parts)?;
        match self.transport.send(msg).await {
            Ok(_) => Ok(ProviderRef::Email {
                message_id,
                to: out.address.clone(),
            }),
            // 5xx answers, and client-side refusals (no common login
            // mechanism, an address lettre cannot encode) will not change.
            Err(e) if e.is_permanent() || e.is_client() => {
                Err(SendError::permanent(format!("SMTP: {e}")))
            }
            Err(e) => Err(SendError::retry(format!("SMTP: {e}"))),
        }
    }
}
