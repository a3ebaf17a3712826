//! `op-dbus-stage`: see the library's `cli` module.

fn main() {
    std::process::exit(installer::cli::main());
}
