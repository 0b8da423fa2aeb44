//! Project tasks: probe the host, pick the matrix, run the conformance suite, write reports.

fn main() {}
