//! The `tokengate` binary.
fn main() {}
