//! The host reference backend: Linux namespaces, a cgroup leaf per cell, strict spawn hygiene.
