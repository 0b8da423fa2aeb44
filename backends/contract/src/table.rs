//! The cell table every backend keeps its cells in: one answer to "is this id taken, live, or
//! going away?" for all of them.
//!
//! An id moves through three states: *reserved* (a create is under way; the id is taken but the
//! cell is not usable), *live* (committed; operations find it with [`CellTable::get`]) and *being
//! destroyed* (one caller won [`CellTable::begin_destroy`] and tears it down). The rules:
//!
//! - [`CellTable::reserve`] refuses an id in any of the three states with
//!   [`CellError::AlreadyExists`]. Dropping the [`Reservation`] without [`Reservation::commit`]
//!   frees the id again, so a failed or cancelled create needs no cleanup code of its own.
//! - Each reservation gets a new *incarnation*, a per-table increasing number. Timers of an earlier
//!   cell hold its incarnation, so they never touch a later cell that reuses the id.
//! - Of concurrent destroys exactly one gets a [`Teardown`]; the others wait until that teardown
//!   is over and then hear [`CellError::NotFound`], so whoever hears `NotFound` may rely on nothing
//!   of the cell being left. Dropping a `Teardown` (also on panic or cancellation) ends it.
//! - [`CellTable::list`] shows live cells and cells being destroyed (their resources still exist);
//!   reserved ids are not listed (nothing exists yet that a caller could use).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::CellError;

enum Slot<C> {
    Reserved {
        incarnation: u64,
    },
    Live {
        incarnation: u64,
        cell: Arc<C>,
    },
    Destroying {
        incarnation: u64,
        /// Closed (its sender dropped) when the teardown is over.
        over: watch::Receiver<()>,
    },
}

impl<C> Slot<C> {
    fn incarnation(&self) -> u64 {
        match self {
            Slot::Reserved { incarnation }
            | Slot::Live { incarnation, .. }
            | Slot::Destroying { incarnation, .. } => *incarnation,
        }
    }
}

struct State<C> {
    slots: HashMap<String, Slot<C>>,
    next_incarnation: u64,
}

impl<C> State<C> {
    fn live_count(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s, Slot::Live { .. }))
            .count()
    }
}

/// The cells of one backend instance, keyed by id. Cheap to clone: clones share the table.
pub struct CellTable<C> {
    state: Arc<Mutex<State<C>>>,
}

impl<C> Clone for CellTable<C> {
    fn clone(&self) -> Self {
        CellTable {
            state: self.state.clone(),
        }
    }
}

impl<C> Default for CellTable<C> {
    fn default() -> Self {
        CellTable {
            state: Arc::new(Mutex::new(State {
                slots: HashMap::new(),
                next_incarnation: 1,
            })),
        }
    }
}

fn lock<C>(m: &Mutex<State<C>>) -> MutexGuard<'_, State<C>> {
    // Every update below is a single map operation, so a panic elsewhere cannot leave the map
    // half-changed: keep serving instead of making every later call panic too.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C: Send + Sync + 'static> CellTable<C> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reserve `id` for a create: [`CellError::AlreadyExists`] when it is reserved, live or being
    /// destroyed. The reservation is owned (no borrow of the table), so a create can run in a
    /// task of its own.
    pub fn reserve(&self, id: &str) -> Result<Reservation<C>, CellError> {
        let mut st = lock(&self.state);
        if st.slots.contains_key(id) {
            return Err(CellError::AlreadyExists { id: id.to_string() });
        }
        let incarnation = st.next_incarnation;
        st.next_incarnation += 1;
        st.slots
            .insert(id.to_string(), Slot::Reserved { incarnation });
        Ok(Reservation {
            table: self.clone(),
            id: id.to_string(),
            incarnation,
            committed: false,
        })
    }

    /// A live cell (not reserved, not being destroyed), else `NotFound{Cell}`.
    pub fn get(&self, id: &str) -> Result<Arc<C>, CellError> {
        match lock(&self.state).slots.get(id) {
            Some(Slot::Live { cell, .. }) => Ok(cell.clone()),
            _ => Err(CellError::cell_not_found(id)),
        }
    }

    /// The incarnation of the live cell `id`, if there is one.
    pub fn incarnation(&self, id: &str) -> Option<u64> {
        match lock(&self.state).slots.get(id) {
            Some(s @ Slot::Live { .. }) => Some(s.incarnation()),
            _ => None,
        }
    }

    /// Take the live cell `id` for teardown (only the incarnation `incarnation`, when given).
    ///
    /// The winner gets a [`Teardown`]. A caller that finds the cell already being destroyed
    /// waits until that teardown is over, then gets `NotFound`. An unknown id, a reserved one, or
    /// another incarnation: `NotFound` at once.
    pub async fn begin_destroy(
        &self,
        id: &str,
        incarnation: Option<u64>,
    ) -> Result<Teardown<C>, CellError> {
        let mut over = {
            let mut st = lock(&self.state);
            let found = st.slots.get(id).map(|s| {
                let live = matches!(s, Slot::Live { .. });
                let over = match s {
                    Slot::Destroying { over, .. } => Some(over.clone()),
                    _ => None,
                };
                (s.incarnation(), live, over)
            });
            match found {
                Some((inc, true, _)) if incarnation.is_none_or(|i| i == inc) => {
                    let (tx, rx) = watch::channel(());
                    let destroying = Slot::Destroying {
                        incarnation: inc,
                        over: rx,
                    };
                    let Some(Slot::Live { cell, .. }) = st.slots.insert(id.to_string(), destroying)
                    else {
                        unreachable!("seen live under the same lock")
                    };
                    return Ok(Teardown {
                        table: self.clone(),
                        id: id.to_string(),
                        incarnation: inc,
                        cell,
                        _over: tx,
                    });
                }
                Some((inc, false, Some(over))) if incarnation.is_none_or(|i| i == inc) => over,
                _ => return Err(CellError::cell_not_found(id)),
            }
        };
        // Only the sender's drop ever wakes this (nothing is sent): Err means the teardown is over.
        while over.changed().await.is_ok() {}
        Err(CellError::cell_not_found(id))
    }

    /// Ids of live cells and cells being destroyed, sorted.
    pub fn list(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.state)
            .slots
            .iter()
            .filter(|(_, s)| !matches!(s, Slot::Reserved { .. }))
            .map(|(k, _)| k.clone())
            .collect();
        ids.sort();
        ids
    }

    /// How many cells are live (for [`crate::TeardownReport::remaining_cells`]).
    pub fn live_count(&self) -> usize {
        lock(&self.state).live_count()
    }

    /// Whether no id is reserved, live or being destroyed (e.g. to remove a state root).
    pub fn is_empty(&self) -> bool {
        lock(&self.state).slots.is_empty()
    }

    /// Take every live cell out of the table, for a backend's `Drop` to tear down. Reserved ids
    /// and cells being destroyed stay: their owners remove them.
    pub fn drain(&self) -> Vec<Arc<C>> {
        let mut st = lock(&self.state);
        let ids: Vec<String> = st
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Live { .. }))
            .map(|(k, _)| k.clone())
            .collect();
        ids.into_iter()
            .filter_map(|id| match st.slots.remove(&id) {
                Some(Slot::Live { cell, .. }) => Some(cell),
                _ => None,
            })
            .collect()
    }

    /// A timer for one incarnation of a cell (its TTL, its timeout): after `after`, calls
    /// `f(owner, cell)` only if `owner` still exists and the same incarnation of `id` is still
    /// live. The task holds only weak references to `owner` and the table, so a dropped backend is
    /// neither kept alive nor called. `f` runs in the spawned task; a TTL reaper passes
    /// `Some(incarnation)` on to [`CellTable::begin_destroy`], which settles a destroy that raced
    /// the check. Must be called inside a tokio runtime (it spawns a task there).
    pub fn reap_after<O, F, Fut>(
        &self,
        owner: &Arc<O>,
        id: &str,
        incarnation: u64,
        after: Duration,
        f: F,
    ) -> tokio::task::JoinHandle<()>
    where
        O: Send + Sync + 'static,
        F: FnOnce(Arc<O>, Arc<C>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let owner: Weak<O> = Arc::downgrade(owner);
        let state = Arc::downgrade(&self.state);
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let (Some(owner), Some(state)) = (owner.upgrade(), state.upgrade()) else {
                return;
            };
            let table = CellTable { state };
            let cell = match lock(&table.state).slots.get(&id) {
                Some(Slot::Live {
                    incarnation: i,
                    cell,
                }) if *i == incarnation => cell.clone(),
                _ => return,
            };
            drop(table);
            f(owner, cell).await;
        })
    }
}

/// An id taken for a create. [`Reservation::commit`] makes the cell live; dropping it uncommitted
/// frees the id (a failed or cancelled create).
pub struct Reservation<C> {
    table: CellTable<C>,
    id: String,
    incarnation: u64,
    committed: bool,
}

impl<C> Reservation<C> {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// This create's incarnation (give it to the cell's timers).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The cell is up: from now on `get`, `list` and `begin_destroy` see it.
    pub fn commit(mut self, cell: Arc<C>) {
        self.committed = true;
        lock(&self.table.state).slots.insert(
            std::mem::take(&mut self.id),
            Slot::Live {
                incarnation: self.incarnation,
                cell,
            },
        );
    }
}

impl<C> Drop for Reservation<C> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut st = lock(&self.table.state);
        if matches!(st.slots.get(&self.id), Some(Slot::Reserved { incarnation }) if *incarnation == self.incarnation)
        {
            st.slots.remove(&self.id);
        }
    }
}

/// The right to tear one cell down. Finishing or dropping it removes the id from the table and
/// wakes every caller waiting in [`CellTable::begin_destroy`].
pub struct Teardown<C> {
    table: CellTable<C>,
    id: String,
    incarnation: u64,
    cell: Arc<C>,
    /// Dropped after the slot is removed (fields drop after `Drop::drop`): that wakes the waiters.
    _over: watch::Sender<()>,
}

impl<C> Teardown<C> {
    pub fn cell(&self) -> &Arc<C> {
        &self.cell
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The teardown is complete: remove the id and return how many cells are still live.
    pub fn finish(self) -> usize {
        let mut st = lock(&self.table.state);
        Self::remove(&mut st, &self.id, self.incarnation);
        st.live_count()
        // `self` drops here: the second removal finds nothing, then the waiters wake.
    }

    fn remove(st: &mut State<C>, id: &str, incarnation: u64) {
        if matches!(st.slots.get(id), Some(Slot::Destroying { incarnation: i, .. }) if *i == incarnation)
        {
            st.slots.remove(id);
        }
    }
}

impl<C> Drop for Teardown<C> {
    fn drop(&mut self) {
        Self::remove(&mut lock(&self.table.state), &self.id, self.incarnation);
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
