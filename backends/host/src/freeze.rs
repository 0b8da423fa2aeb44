//! Pause and resume: the cell's freezer (v1 `freezer.state`, v2 `cgroup.freeze`).

use std::time::{Duration, Instant};

use cellcheck_contract::CellError;

use crate::cell::Cell;
use crate::cgroup::CellDir;
use crate::{failure, lock};

pub(crate) fn freeze(cell: &Cell, frozen: bool) -> Result<(), CellError> {
    let op = if frozen { "pause" } else { "resume" };
    let mut st = lock(&cell.shared.st);
    if st.end.is_some() || *cell.shared.done.borrow() {
        return Err(CellError::InvalidState {
            operation: op.into(),
            state: "exited".into(),
        });
    }
    let dirs: Vec<&CellDir> = cell.dirs.iter().filter(|d| d.has("freezer")).collect();
    for d in &dirs {
        d.freeze(frozen)
            .map_err(|e| failure(format!("{op}: {e}")))?;
    }
    if frozen {
        // The write only starts the freeze; it is done when the state says so.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dirs.iter().all(|d| d.is_frozen()) {
            if Instant::now() > deadline {
                for d in &dirs {
                    let _ = d.freeze(false);
                }
                return Err(failure("pause: the cell did not freeze within 5 s"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    tracing::debug!(frozen, "freezer state reached");
    st.paused = frozen;
    Ok(())
}
