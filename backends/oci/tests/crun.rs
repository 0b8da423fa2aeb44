//! crun: the same trivial-bundle preflight; where crun refuses the host (hybrid cgroups) the
//! backend must say so with crun's own words and create nothing.

mod common;

use cellcheck_contract::{Availability, Backend, CellError};
use cellcheck_oci::{OciBackend, OciConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_is_functional_and_leaves_nothing() {
    let fx = cellcheck_fixtures::ensure().unwrap();
    let b = OciBackend::crun(OciConfig::from_fixtures(&fx));
    match b.preflight().await {
        Availability::Available { evidence } => {
            assert!(evidence.contains("exited 0"), "{evidence}");
            let id = common::id("crun");
            b.create(&common::doc(&id, &["/bin/true"])).await.unwrap();
            assert_eq!(b.wait(&id).await.unwrap().code(), Some(0));
            b.destroy(&id).await.unwrap();
        }
        Availability::Unavailable { reason } => {
            eprintln!("crun unavailable: {reason}");
            assert!(!reason.trim().is_empty());
            let id = common::id("crun");
            let e = b
                .create(&common::doc(&id, &["/bin/true"]))
                .await
                .unwrap_err();
            assert!(!matches!(e, CellError::InvalidSpec { .. }), "{e:?}");
            common::assert_no_residue(&b, &id);
        }
    }
    common::assert_clean_root(&b);
}
