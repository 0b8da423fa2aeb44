//! The scenario families. Each module exposes `scenarios() -> Vec<Scenario>`; [`all`] collects
//! them in a stable order (the listing order).

use crate::harness::Scenario;

pub mod exec;
pub mod exit;
pub mod hardening;
pub mod hostile;
pub mod isolation;
pub mod lifecycle;
pub mod limits;
pub mod pause;
pub mod residue;
pub mod snapshot;
pub mod spec;
pub mod vmm;

/// Build a [`Scenario`] from an `async fn(Ctx) -> Result<(), Failure>` (or an expression using
/// `c`, the context).
#[macro_export]
#[doc(hidden)]
macro_rules! scenario {
    ($family:expr, $name:expr, [$($cap:ident),*], $f:path) => {
        $crate::harness::Scenario::new($family, $name, &[$(cellcheck_contract::Capability::$cap),*],
            |c| Box::pin($f(c)))
    };
    ($family:expr, $name:expr, [$($cap:ident),*], |$c:ident| $body:expr) => {
        $crate::harness::Scenario::new($family, $name, &[$(cellcheck_contract::Capability::$cap),*],
            |$c| Box::pin($body))
    };
}

pub fn all() -> Vec<Scenario> {
    let mut v = Vec::new();
    v.extend(lifecycle::scenarios());
    v.extend(exit::scenarios());
    v.extend(residue::scenarios());
    v.extend(isolation::scenarios());
    v.extend(spec::scenarios());
    v.extend(limits::scenarios());
    v.extend(snapshot::scenarios());
    v.extend(pause::scenarios());
    v.extend(hardening::scenarios());
    v.extend(hostile::scenarios());
    v.extend(vmm::scenarios());
    v.extend(exec::scenarios());
    v
}

/// The bytes `out N` / `err N` print: `0123456789` repeated, cut at N.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'0' + (i % 10) as u8).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_unique_and_well_formed() {
        let all = super::all();
        let mut seen = std::collections::BTreeSet::new();
        for s in &all {
            assert!(seen.insert(s.path()), "duplicate {}", s.path());
            assert!(
                s.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                s.name
            );
        }
        assert!(all.len() >= 40, "{}", all.len());
    }

    #[test]
    fn pattern_cycles() {
        assert_eq!(super::pattern(12), b"012345678901".to_vec());
    }
}
