fn main() {
    std::process::exit(ckpt::cli::main());
}
