//! The chat-ops service alone (Slack, SMS replies, the HTTP API,
//! status.json); stateless, so any number of replicas can run.
fn main() -> std::process::ExitCode {
    tocsin::cli::main(Some(tocsin::cli::Command::Chatops))
}
