//! The remediation service alone, for deployments that run services separately.
fn main() -> std::process::ExitCode {
    tocsin::cli::main(Some(tocsin::cli::Command::Remediation))
}
