//! Unit tests of the cell table: reservations, lookups, teardown and concurrent use.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::ResourceKind;

fn not_found(id: &str) -> CellError {
    CellError::NotFound {
        kind: ResourceKind::Cell,
        id: id.into(),
    }
}

fn live(t: &CellTable<u32>, id: &str, v: u32) -> u64 {
    let r = t.reserve(id).unwrap();
    let i = r.incarnation();
    r.commit(Arc::new(v));
    i
}

#[test]
fn reserve_refuses_reserved_live_and_destroying_ids() {
    let t = CellTable::<u32>::new();
    let r = t.reserve("a").unwrap();
    assert_eq!(
        t.reserve("a").err(),
        Some(CellError::AlreadyExists { id: "a".into() })
    );
    r.commit(Arc::new(1));
    assert!(matches!(
        t.reserve("a"),
        Err(CellError::AlreadyExists { .. })
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let td = rt.block_on(t.begin_destroy("a", None)).unwrap();
    assert!(matches!(
        t.reserve("a"),
        Err(CellError::AlreadyExists { .. })
    ));
    assert_eq!(td.finish(), 0);
    assert!(t.reserve("a").is_ok());
}

#[test]
fn a_reservation_is_neither_live_nor_listed_and_frees_its_id_when_dropped() {
    let t = CellTable::<u32>::new();
    let r = t.reserve("a").unwrap();
    assert_eq!(t.get("a").err(), Some(not_found("a")));
    assert!(t.list().is_empty());
    assert_eq!(t.live_count(), 0);
    assert!(!t.is_empty());
    drop(r);
    assert!(t.is_empty());
    let r = t.reserve("a").unwrap();
    r.commit(Arc::new(7));
    assert_eq!(*t.get("a").unwrap(), 7);
    assert_eq!(t.list(), vec!["a".to_string()]);
}

#[test]
fn incarnations_increase_per_table() {
    let t = CellTable::<u32>::new();
    let a = t.reserve("a").unwrap().incarnation();
    let b = t.reserve("a").unwrap().incarnation();
    let c = t.reserve("b").unwrap().incarnation();
    assert!(a < b && b < c, "{a} {b} {c}");
    assert_eq!(t.incarnation("a"), None);
    let i = live(&t, "a", 1);
    assert_eq!(t.incarnation("a"), Some(i));
}

#[tokio::test]
async fn destroy_of_unknown_reserved_or_other_incarnation_is_not_found_at_once() {
    let t = CellTable::<u32>::new();
    assert_eq!(t.begin_destroy("x", None).await.err(), Some(not_found("x")));
    let _r = t.reserve("r").unwrap();
    assert_eq!(t.begin_destroy("r", None).await.err(), Some(not_found("r")));
    let i = live(&t, "a", 1);
    assert_eq!(
        t.begin_destroy("a", Some(i + 100)).await.err(),
        Some(not_found("a"))
    );
    // The live cell was not touched by the stale incarnation.
    assert_eq!(*t.get("a").unwrap(), 1);
    let td = t.begin_destroy("a", Some(i)).await.unwrap();
    assert_eq!(td.incarnation(), i);
    // A stale incarnation does not wait on a teardown of another one either.
    assert_eq!(
        t.begin_destroy("a", Some(i + 100)).await.err(),
        Some(not_found("a"))
    );
    assert_eq!(td.finish(), 0);
}

#[tokio::test]
async fn a_cell_being_destroyed_is_listed_but_not_live() {
    let t = CellTable::<u32>::new();
    live(&t, "a", 1);
    live(&t, "b", 2);
    let td = t.begin_destroy("a", None).await.unwrap();
    assert_eq!(**td.cell(), 1);
    assert_eq!(td.id(), "a");
    assert_eq!(t.get("a").err(), Some(not_found("a")));
    assert_eq!(t.list(), vec!["a".to_string(), "b".to_string()]);
    assert_eq!(t.live_count(), 1);
    assert_eq!(td.finish(), 1);
    assert_eq!(t.list(), vec!["b".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loser_of_concurrent_destroys_waits_until_the_teardown_is_over() {
    let t = CellTable::<u32>::new();
    live(&t, "a", 1);
    let td = t.begin_destroy("a", None).await.unwrap();
    let losers: Vec<_> = (0..4)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move {
                let r = t.begin_destroy("a", None).await;
                // What the loser may rely on once it hears NotFound: the id is gone.
                (r.err(), t.list())
            })
        })
        .collect();
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert!(
        losers.iter().all(|h| !h.is_finished()),
        "a loser returned while the teardown was still under way"
    );
    assert_eq!(td.finish(), 0);
    for h in losers {
        let (err, listed) = h.await.unwrap();
        assert_eq!(err, Some(not_found("a")));
        assert!(listed.is_empty(), "{listed:?}");
    }
}

#[tokio::test]
async fn a_dropped_teardown_also_ends_it_and_wakes_the_waiters() {
    let t = CellTable::<u32>::new();
    live(&t, "a", 1);
    let td = t.begin_destroy("a", None).await.unwrap();
    let t2 = t.clone();
    let waiter = tokio::spawn(async move { t2.begin_destroy("a", None).await.err() });
    tokio::task::yield_now().await;
    // A teardown that panics or is cancelled drops its Teardown.
    let t3 = t.clone();
    let _ = std::thread::spawn(move || {
        let _keep = t3;
        let _td = td;
        panic!("teardown failed");
    })
    .join();
    assert_eq!(waiter.await.unwrap(), Some(not_found("a")));
    assert!(t.is_empty());
    assert!(t.reserve("a").is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_many_concurrent_destroys_exactly_one_wins() {
    for round in 0..20 {
        let t = CellTable::<u32>::new();
        live(&t, "a", round);
        let wins = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (t, wins) = (t.clone(), wins.clone());
                tokio::spawn(async move {
                    match t.begin_destroy("a", None).await {
                        Ok(td) => {
                            wins.fetch_add(1, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            td.finish();
                        }
                        Err(e) => assert_eq!(e, not_found("a")),
                    }
                })
            })
            .collect();
        for h in tasks {
            h.await.unwrap();
        }
        assert_eq!(wins.load(Ordering::SeqCst), 1);
        assert!(t.is_empty());
    }
}

#[tokio::test]
async fn drain_takes_the_live_cells_only() {
    let t = CellTable::<u32>::new();
    live(&t, "a", 1);
    live(&t, "b", 2);
    live(&t, "c", 3);
    let r = t.reserve("r").unwrap();
    let td = t.begin_destroy("c", None).await.unwrap();
    let mut got: Vec<u32> = t.drain().iter().map(|c| **c).collect();
    got.sort();
    assert_eq!(got, vec![1, 2]);
    assert_eq!(t.list(), vec!["c".to_string()]);
    assert_eq!(td.finish(), 0);
    drop(r);
    assert!(t.is_empty());
}

#[test]
fn an_old_reservation_or_teardown_never_removes_a_newer_incarnation() {
    let t = CellTable::<u32>::new();
    let r = t.reserve("a").unwrap();
    // Drained while reserved is impossible in a backend; simulate a stale slot owner.
    let stale = Reservation {
        table: t.clone(),
        id: "a".into(),
        incarnation: r.incarnation() + 10,
        committed: false,
    };
    drop(stale);
    assert!(matches!(
        t.reserve("a"),
        Err(CellError::AlreadyExists { .. })
    ));
    r.commit(Arc::new(1));
    assert_eq!(*t.get("a").unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn reap_after_fires_for_its_incarnation_only() {
    struct Owner(AtomicUsize);
    let t = CellTable::<u32>::new();
    let owner = Arc::new(Owner(AtomicUsize::new(0)));
    let hit = |o: Arc<Owner>, c: Arc<u32>| async move {
        o.0.fetch_add(*c as usize, Ordering::SeqCst);
    };

    // Fires: the same incarnation is live.
    let i = live(&t, "a", 1);
    t.reap_after(&owner, "a", i, Duration::from_secs(5), hit)
        .await
        .unwrap();
    assert_eq!(owner.0.load(Ordering::SeqCst), 1);

    // Does not fire: the cell was destroyed and the id reused by a new incarnation.
    let h = t.reap_after(&owner, "a", i, Duration::from_secs(5), hit);
    t.begin_destroy("a", None).await.unwrap().finish();
    live(&t, "a", 100);
    h.await.unwrap();
    assert_eq!(owner.0.load(Ordering::SeqCst), 1);

    // Does not fire and does not keep the owner alive: the owner is gone.
    let j = t.incarnation("a").unwrap();
    let h = t.reap_after(&owner, "a", j, Duration::from_secs(5), hit);
    let weak = Arc::downgrade(&owner);
    drop(owner);
    assert!(weak.upgrade().is_none());
    h.await.unwrap();
}
