fn main() -> std::process::ExitCode {
    tocsin::cli::main(None)
}
