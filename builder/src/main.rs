//! `op-dbus-image`: see the library's `cli` module.

fn main() {
    std::process::exit(builder::cli::main());
}
