//! Email over STARTTLS and implicit TLS with a login, against a real SMTP
//! server (aiosmtpd) presenting a certificate the notifier is told to trust
//! (`ca_file`); a wrong password is refused for good, not retried.

use std::time::Duration;

use tocsin_notifier::NotifierConfig;
use tocsin_proto::notify::Channel;
use tocsin_tests::{
    notifier::{page, publish_pages, Replica},
    smtp::{SinkTls, SmtpSink},
    NatsServer,
};

fn config(sink: &SmtpSink, tls: &str, password: &str, data: &std::path::Path) -> NotifierConfig {
    serde_yaml_ng::from_str(&format!(
        r#"data_dir: {data}
retry: {{initial: 100ms, max: 500ms}}
email:
  host: localhost
  port: {port}
  tls: {tls}
  ca_file: {ca}
  username: pager
  password: {password}
  from: "Tocsin <tocsin@example.com>"
  guard: {{timeout: 5s, rate_per_second: 0}}
"#,
        data = data.display(),
        port = sink.port(),
        ca = sink.ca_file().display(),
    ))
    .expect("email config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_implicit_tls_with_a_login() {
    for (mode, name) in [(SinkTls::Starttls, "starttls"), (SinkTls::Implicit, "tls")] {
        let nats = NatsServer::start().await;
        let sink = SmtpSink::start_tls(mode, Some(("pager", "s3cret-pass"))).await;
        let data = tempfile::tempdir().unwrap();
        let replica = Replica::start(&nats, config(&sink, name, "s3cret-pass", data.path())).await;
        let js = async_nats::jetstream::new(nats.client().await);
        publish_pages(&js, &[page(3, Channel::Email)]).await;
        let mails = sink.wait_for_count(1, Duration::from_secs(20)).await;
        assert_eq!(mails.len(), 1, "{name}: {}", sink.log());
        assert_eq!(mails[0].rcpt_tos, ["alice@example.com"]);
        assert!(mails[0].subject.contains("INC-3"), "{}", mails[0].subject);
        assert!(!mails[0].html.is_empty() && !mails[0].text.is_empty());
        // Counted once the outcome is recorded, just after the server's answer.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while replica.count("email", "sent") == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(replica.count("email", "sent"), 1, "{name}");
        replica.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_fails_without_retrying() {
    let nats = NatsServer::start().await;
    let sink = SmtpSink::start_tls(SinkTls::Starttls, Some(("pager", "s3cret-pass"))).await;
    let data = tempfile::tempdir().unwrap();
    let replica = Replica::start(&nats, config(&sink, "starttls", "wrong", data.path())).await;
    let js = async_nats::jetstream::new(nats.client().await);
    publish_pages(&js, &[page(4, Channel::Email)]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while replica.count("email", "failed") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failure recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tocsin_tests::notifier::settled(&js, Duration::from_secs(30)).await;
    let m = replica.metrics.encode();
    assert!(
        !m.contains("tocsin_notifier_retries_total{channel=\"email\"}"),
        "{m}"
    );
    assert!(sink.messages().is_empty());
    replica.stop().await;
}
