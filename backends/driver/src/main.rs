//! Serves a built-in backend over the cellcheck driver protocol on stdin/stdout.

fn main() {}
