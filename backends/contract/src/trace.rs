//! What every backend records in the span of an operation when it fails: one debug event with
//! the error and its kind, so a failing trial's trace says how each operation ended.

use std::future::Future;

use crate::CellError;

/// `r`, with a failure recorded in the current span.
pub fn failed<T>(r: Result<T, CellError>) -> Result<T, CellError> {
    if let Err(e) = &r {
        tracing::debug!(error = %e, kind = e.kind(), "failed");
    }
    r
}

/// `op`'s outcome, with a failure recorded in the span it runs in.
pub async fn traced<T>(op: impl Future<Output = Result<T, CellError>>) -> Result<T, CellError> {
    failed(op.await)
}
