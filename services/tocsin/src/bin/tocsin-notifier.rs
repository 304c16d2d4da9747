//! The notifier service alone, for deployments that run services separately
//! (several replicas share the work).
fn main() -> std::process::ExitCode {
    tocsin::cli::main(Some(tocsin::cli::Command::Notifier))
}
