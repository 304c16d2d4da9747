//! Defect 2: about 20,000 idle or slowloris connections made ingest (and,
//! through the shared file-descriptor table, `/readyz`) unreachable, with
//! nothing logged. Now idle and slow connections are closed by the server,
//! open connections are capped (the oldest idle ones make room for new
//! ones), and a good client keeps getting 200s throughout.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tocsin_tests::{http, NatsServer, TocsinHarness};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const IDLE: usize = 5_000;
const SLOWLORIS: usize = 1_000;
const MAX_CONNECTIONS: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_floods_do_not_lock_out_a_good_client() {
    // Measures this process's RSS and open files: alone.
    if !tocsin_tests::in_own_process(&format!(
        "{}::idle_and_slowloris_floods_do_not_lock_out_a_good_client",
        module_path!()
    )) {
        return;
    }
    // Both ends of every connection live in this process.
    let needed = 2 * (IDLE + SLOWLORIS) as u64 + 2_000;
    let got = rlimit::increase_nofile_limit(needed).expect("raise RLIMIT_NOFILE");
    assert!(
        got >= needed,
        "RLIMIT_NOFILE is {got}, this test needs {needed}"
    );

    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    {
        let ingest = config.ingest.as_mut().unwrap();
        ingest.max_connections = MAX_CONNECTIONS;
        // Short, so the test sees the server close them within seconds, yet
        // long enough that the flood reaches the cap even on a loaded
        // machine: under `stress -c 2` and a parallel build, 5 s was too
        // short (idle connections timed out before 2,000 were open at once).
        ingest.idle_timeout = tocsin_runtime::config::HumanDuration(Duration::from_secs(15));
        ingest.header_read_timeout = tocsin_runtime::config::HumanDuration(Duration::from_secs(16));
    }
    let tocsin = TocsinHarness::start_with(config).await;
    let url = format!("{}/api/v1/alerts", tocsin.ingest_url);
    let addr = tocsin.ingest_url.trim_start_matches("http://").to_string();
    let rss_before = tocsin_tests::rss_bytes();

    // The good client: a new connection per request (as after any server
    // close), posting until told to stop. Every answer must be 200.
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (url, token, stop) = (url.clone(), tocsin.token.clone(), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            let mut answers = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = format!(r#"[{{"labels":{{"alertname":"Good","n":"{n}"}}}}]"#);
                let status = match client
                    .post(&url)
                    .bearer_auth(&token)
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) => r.status().as_u16(),
                    Err(e) => panic!("good request {n} failed: {e}"),
                };
                answers.push(status);
            }
            answers
        })
    };

    // The attack: idle connections that never send a byte, and slowloris
    // connections that send a request head one header at a time.
    let closed = Arc::new(AtomicUsize::new(0));
    for _ in 0..IDLE {
        let s = TcpStream::connect(&addr).await.expect("connect");
        tocsin_tests::count_when_closed(s, closed.clone());
    }
    for i in 0..SLOWLORIS {
        let mut s = TcpStream::connect(&addr).await.expect("connect");
        let closed = closed.clone();
        tokio::spawn(async move {
            let head = format!("POST /api/v1/alerts HTTP/1.1\r\nHost: x\r\nX-Conn: {i}\r\n");
            if s.write_all(head.as_bytes()).await.is_err() {
                closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                // Keep trickling (never finishing the head) until the server
                // closes; the interval is what a slowloris client does.
                loop {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    if w.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        break;
                    }
                }
            });
            let mut buf = [0u8; 512];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            writer.abort();
            closed.fetch_add(1, Ordering::Relaxed);
        });
    }

    // While the flood is open the admin server answers and the count of open
    // connections stays under the cap; wait until the server has closed
    // every attacking connection.
    let client = reqwest::Client::new();
    let mut max_open = 0.0f64;
    let mut max_rss = tocsin_tests::rss_bytes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while closed.load(Ordering::Relaxed) < IDLE + SLOWLORIS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server closed only {} of {} attacking connections",
            closed.load(Ordering::Relaxed),
            IDLE + SLOWLORIS
        );
        let ready = http::get(&client, &format!("{}/readyz", tocsin.admin_url)).await;
        assert_eq!(ready.status, 200, "{}", ready.text);
        let text = tocsin.metrics().await;
        if let Some(open) = tocsin_tests::metric_value(&text, "tocsin_ingest_connections_open") {
            max_open = max_open.max(open);
        }
        max_rss = max_rss.max(tocsin_tests::rss_bytes());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let answers = good.await.expect("good client");
    let grown = max_rss.saturating_sub(rss_before);
    println!(
        "good requests: {}, max open connections: {max_open}, RSS before {} MiB, peak growth {} MiB",
        answers.len(),
        rss_before >> 20,
        grown >> 20
    );
    assert!(answers.len() >= 10, "only {} good requests", answers.len());
    assert!(answers.iter().all(|s| *s == 200), "{answers:?}");
    assert!(
        max_open <= MAX_CONNECTIONS as f64,
        "{max_open} open connections, the cap is {MAX_CONNECTIONS}"
    );
    assert!(
        grown < 200 << 20,
        "RSS grew by {} MiB under the flood",
        grown >> 20
    );

    let text = tocsin.metrics().await;
    let evicted =
        tocsin_tests::metric_value(&text, "tocsin_ingest_connections_evicted_total").unwrap_or(0.0);
    assert!(evicted > 0.0, "the cap was reached: {text}");
    let timed_out: f64 = text
        .lines()
        .filter(|l| l.starts_with("tocsin_ingest_connections_closed_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        timed_out > 0.0,
        "idle or slow connections timed out: {text}"
    );
}
