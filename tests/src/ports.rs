//! Loopback ports for processes whose port must be known before they
//! start (a config file names it, a cluster's routes name each other).

use std::sync::atomic::{AtomicU32, Ordering};

/// How many ports this process has handed out.
static HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// A free TCP port on loopback for a process about to be started.
///
/// The port is checked free and released, so something else could take it
/// before the process listens. Ports from the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`) are what every outgoing connection's
/// local end is given, so a port from there (as binding port 0 gives) is
/// taken as soon as any test opens a connection: CI saw `tocsin up` fail
/// with "Address already in use" that way. These come from below (or
/// above) that range instead, from a start that differs by process, and
/// one process never hands the same port out twice.
pub fn free_port() -> u16 {
    let (lo, hi) = outside_ephemeral();
    let span = u32::from(hi - lo);
    if span == 0 {
        // The ephemeral range covers every unprivileged port: the kernel's pick.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind loopback")
            .port();
    }
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        let port = lo + ((start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {lo}-{hi}");
}

/// The ports `lo..hi` to hand out: the larger side of the ephemeral range,
/// above 10000 (below it are well-known services' ports).
fn outside_ephemeral() -> (u16, u16) {
    let (first, last) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().map(|s| s.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let below = (10000, first.max(10000));
    let above = (last.saturating_add(1).max(10000), u16::MAX);
    if below.1 - below.0 >= above.1 - above.0 {
        below
    } else {
        above
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's range for outgoing connections' local ports.
    fn ephemeral() -> (u16, u16) {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let mut it = text.split_whitespace().map(|s| s.parse::<u16>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    }

    /// A port handed out here is released before the process that will
    /// listen on it starts. If it came from the kernel's ephemeral range,
    /// any outgoing connection in between (a test's NATS client, an HTTP
    /// request) could be given it as its local port, and the process then
    /// fails with "Address already in use": CI saw exactly that. So ports
    /// come from outside that range, and never twice from one process.
    #[test]
    fn ports_are_outside_the_ephemeral_range_and_never_repeat() {
        let (lo, hi) = ephemeral();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..500 {
            let port = free_port();
            assert!(
                !(lo..=hi).contains(&port),
                "port {port} is in the ephemeral range {lo}-{hi}"
            );
            assert!(seen.insert(port), "port {port} handed out twice");
        }
    }
}
