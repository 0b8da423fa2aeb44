//! Checks that .github/workflows/conformance.yml agrees with matrix/.
