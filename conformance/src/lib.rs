//! The shared conformance scenario set, runnable against any cellcheck backend.
