//! OCI runtime backends (runc, crun, runsc) through one bundle generator.
