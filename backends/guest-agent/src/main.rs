//! The agent that runs as init inside a cellcheck microVM guest.

fn main() {}
