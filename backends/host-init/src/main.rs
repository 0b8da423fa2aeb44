//! The in-cell init the host backend starts: sets up the cell's namespaces and root, runs the workload, reports its end.

fn main() {}
